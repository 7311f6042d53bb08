"""What a job reads: inputs -> work items, each with the key it is stored under. docs/batch.md §2.

Keys: a folder's images are keyed by their path relative to the folder (a/img.jpg, b/img.jpg and b/img.png are three
images); a file given directly by its name; a glob's matches relative to the glob's fixed leading folder; a list
file's lines as written; a table's rows by the id column, else the path as written, else `<table name>#<row>`.
Hidden files and folders (a leading dot) are not searched, symlinked folders are not followed, and nothing inside
the output store is ever read as input. A dataset folder as `vitx data export` writes it (images/, annotations/,
masks/) contributes its images/ only.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vitx_fast.data.images import IMAGE_EXTENSIONS
from vitx_fast.data.voc import dataset_layout

LIST_SUFFIXES = (".txt", ".lst", ".list")
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
IMAGE_COLUMNS = ("image", "path", "bytes", "file", "filename")


class InputError(ValueError):
    """Inputs that cannot make a job (no images, two images with one key, a table without its column)."""


@dataclass(frozen=True)
class WorkItem:
    """One image of a job. source: the file read (absolute path) or '<table>#row=<i>' when `data` holds the bytes;
    missing: the reason when the input itself does not exist (recorded as a failure, the job goes on)."""

    key: str
    source: str
    data: bytes | None = None
    missing: str | None = None


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def _walk(root: str, store: str) -> list[str]:
    """Image files under `root`, sorted: hidden entries, symlinked folders and the store are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and os.path.realpath(os.path.join(dirpath, d)) != store)
        found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and _is_image_name(f)]
    return sorted(found)


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if glob.has_magic(p):
            break
        fixed.append(p)
    return os.path.join(*fixed) if fixed else "."


def _key(path: str, root: str) -> str:
    return PurePosixPath(Path(os.path.relpath(path, root))).as_posix()


def discover(inputs: list[str], store: str, image_column: str | None = None, id_column: str | None = None,
             notes: list[str] | None = None) -> list[WorkItem]:
    """Expand the job's inputs into work items with unique keys (InputError on a clash, naming both sources)."""
    store = os.path.realpath(store)
    notes = notes if notes is not None else []
    items: list[WorkItem] = []
    for inp in map(str, inputs):
        if os.path.exists(inp) and _inside(inp, store):
            raise InputError(f"{inp} is inside the output store {store}; the store is never read as input")
        suffix = os.path.splitext(inp)[1].lower()
        if os.path.isdir(inp):
            layout = dataset_layout(inp)  # a `vitx data export` folder: its images, not its masks
            found = [WorkItem(_key(f, inp), os.path.abspath(f)) for f in _walk(layout[0] if layout else inp, store)]
            if not found:
                notes.append(f"{inp}: no images found")
            items += found
        elif glob.has_magic(inp) and not os.path.exists(inp):
            root = _glob_root(inp)
            matches = sorted(glob.glob(inp, recursive=True))
            files = []
            for m in matches:
                files += _walk(m, store) if os.path.isdir(m) else [m] if _is_image_name(m) else []
            files = [f for f in files if not _inside(f, store)]
            if not files:
                notes.append(f"{inp}: matched no images")
            items += [WorkItem(_key(f, root), os.path.abspath(f)) for f in files]
        elif suffix in LIST_SUFFIXES and os.path.isfile(inp):
            items += _list_file(inp, store)
        elif suffix in TABLE_SUFFIXES and os.path.isfile(inp):
            items += table_items(inp, image_column, id_column)
        elif os.path.lexists(inp):
            items.append(WorkItem(os.path.basename(inp), os.path.abspath(inp)))
        else:
            items.append(WorkItem(os.path.basename(inp.rstrip("/")) or inp, os.path.abspath(inp),
                                  missing=f"{inp}: no such file or folder"))
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise InputError(f"two inputs have the key {it.key!r} ({seen[it.key]} and {it.source}); give their common "
                             "folder as the input so that keys are relative paths, or an id column")
        seen[it.key] = it.source
    if not items:
        raise InputError("no images found in " + " ".join(map(str, inputs)))
    return items


def _list_file(path: str, store: str) -> list[WorkItem]:
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            full = entry if os.path.isabs(entry) else os.path.join(base, entry)
            if _inside(full, store):
                continue
            out.append(WorkItem(PurePosixPath(Path(os.path.normpath(entry))).as_posix(), os.path.abspath(full)))
    return out


def table_items(path: str, image_column: str | None, id_column: str | None) -> list[WorkItem]:
    """Rows of a Parquet / CSV table: the image column holds paths (relative to the table's folder), bytes, or
    {bytes, path} structs (the Hugging Face datasets layout)."""
    import pyarrow as pa

    table = _read_table(path)
    names = table.column_names
    col = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    if col is None or col not in names:
        raise InputError(f"{path}: no image column {image_column or ' / '.join(IMAGE_COLUMNS)!r}; columns: "
                         f"{', '.join(names)} (choose one with --image-column)")
    idc = id_column or ("id" if "id" in names and col != "id" else None)
    if idc is not None and idc not in names:
        raise InputError(f"{path}: no id column {idc!r}; columns: {', '.join(names)}")
    values = table.column(col)
    kind = values.type
    if pa.types.is_struct(kind):
        fields = {kind.field(i).name for i in range(kind.num_fields)}
        if not fields & {"bytes", "path"}:
            raise InputError(f"{path}: column {col!r} is a struct without 'bytes' or 'path' fields")
    elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
              or pa.types.is_large_binary(kind)):
        raise InputError(f"{path}: column {col!r} holds {kind}; it must hold paths (strings) or image bytes")
    ids = table.column(idc).to_pylist() if idc else None
    base = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    out = []
    for i, v in enumerate(values.to_pylist()):
        data, where = (v.get("bytes"), v.get("path")) if isinstance(v, dict) else \
            (v, None) if isinstance(v, bytes) else (None, v)
        key = str(ids[i]) if ids is not None and ids[i] is not None else where if where and data is None \
            else f"{name}#{i}"
        if data is not None:
            out.append(WorkItem(key, f"{os.path.abspath(path)}#row={i}", bytes(data)))
        elif where:
            out.append(WorkItem(key, where if os.path.isabs(where) else os.path.join(base, where)))
        else:
            out.append(WorkItem(key, f"{os.path.abspath(path)}#row={i}", missing=f"{name} row {i}: empty image cell"))
    return out


def _read_table(path: str):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if path.lower().endswith((".csv", ".tsv")):
            opts = pcsv.ParseOptions(delimiter="\t" if path.lower().endswith(".tsv") else ",")
            # every column as a string: ids like 007 keep their zeros
            return pcsv.read_csv(path, parse_options=opts,
                                 convert_options=pcsv.ConvertOptions(strings_can_be_null=False,
                                                                     auto_dict_encode=False,
                                                                     column_types=_all_strings(path, opts)))
        return pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read table {path}: {str(exc).splitlines()[0]}") from None


def _all_strings(path: str, opts) -> dict:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    with pcsv.open_csv(path, parse_options=opts) as reader:
        return {name: pa.string() for name in reader.schema.names}
