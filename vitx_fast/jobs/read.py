"""Reading a result store back: `vx.read_results(path)`, `vx.read_errors(path)`, `check_store(path)`."""
from __future__ import annotations

import os

import numpy as np

from vitx_fast.jobs.schema import ERRORS, RESULTS, UNIT
from vitx_fast.jobs.store import StoreError, read_manifest, shard_files


def _table(path: str, kind: str, schema, columns=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isdir(path) or read_manifest(path) is None:
        raise StoreError(f"{path} is not a result store (no manifest.json)")
    cols = list(columns) if columns is not None else schema.names
    unknown = [c for c in cols if c not in schema.names]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; the {kind} columns are {', '.join(schema.names)}")
    parts = [pq.read_table(f, columns=cols) for f in shard_files(path, kind)]
    return pa.concat_tables(parts) if parts else schema.empty_table().select(cols)


def _grids(column, heights, widths, dtype) -> list:
    """A list<...> column -> one numpy (h, w) array per row (views on one flat buffer; None for null rows)."""
    out = []
    for chunk in column.chunks:
        flat = chunk.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        offsets = chunk.offsets.to_numpy()
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for i in range(len(chunk)):
            out.append(flat[offsets[i]:offsets[i + 1]] if valid[i] else None)
    return [None if a is None else a.reshape(int(h), int(w)) for a, h, w in zip(out, heights, widths, strict=True)]


def read_results(path, columns=None):
    """The store's results as a pandas DataFrame, one row per (image, method, target); see docs/batch.md §3 for the
    columns. `map` holds numpy float32 (map_height, map_width) arrays, `heatmap` uint8 (H, W) arrays or None.
    columns: a subset to read (the map's size columns are added when `map` is asked for)."""
    cols = list(columns) if columns is not None else RESULTS.names
    need = list(dict.fromkeys(cols + (["map_height", "map_width"] if "map" in cols else [])
                              + (["heatmap_height", "heatmap_width"] if "heatmap" in cols else [])))
    table = _table(path, "results", RESULTS, need)
    grids = {}
    if "map" in cols:
        grids["map"] = _grids(table["map"], table["map_height"].to_pylist(), table["map_width"].to_pylist(),
                              np.float32)
    if "heatmap" in cols:
        grids["heatmap"] = _grids(table["heatmap"], [h or 0 for h in table["heatmap_height"].to_pylist()],
                                  [w or 0 for w in table["heatmap_width"].to_pylist()], np.uint8)
    df = table.drop_columns(list(grids)).to_pandas()
    for name, values in grids.items():
        df[name] = values
    return df[[c for c in need if c in df.columns]]


def read_errors(path, history: bool = False):
    """Failed units as a pandas DataFrame (image, method, stage, error, ...). By default the latest error of every
    unit that the store still lacks; history=True: every error row ever recorded."""
    df = _table(path, "errors", ERRORS).to_pandas()
    if history or df.empty:
        return df
    done = _table(path, "results", RESULTS, list(UNIT)).to_pandas().drop_duplicates()
    merged = df.merge(done.assign(_done=True), on=list(UNIT), how="left")
    open_ = df[merged["_done"].isna().to_numpy()]
    return open_.sort_values("created", kind="stable").drop_duplicates(list(UNIT), keep="last").reset_index(drop=True)


def check_store(path) -> list[str]:
    """Problems of a store (empty when sound): a unit stored twice, a unit with missing or repeated ranks, a map
    whose length is not map_height * map_width, temporary files left behind."""
    import pyarrow.compute as pc

    problems = []
    t = _table(path, "results", RESULTS, list(UNIT) + ["rank", "num_targets", "map_height", "map_width", "map"])
    lengths = pc.list_value_length(t["map"]).to_numpy(zero_copy_only=False)
    sizes = (t["map_height"].to_numpy() * t["map_width"].to_numpy())
    if (lengths != sizes).any():
        problems.append(f"{int((lengths != sizes).sum())} map(s) whose length is not map_height * map_width")
    df = t.select(list(UNIT) + ["rank", "num_targets"]).to_pandas()
    dup = df.duplicated(list(UNIT) + ["rank"])
    if dup.any():
        problems.append(f"{int(dup.sum())} row(s) stored twice, e.g. {tuple(df[dup].iloc[0][list(UNIT)])}")
    g = df.groupby(list(UNIT), sort=False).agg(n=("rank", "nunique"), want=("num_targets", "first"))
    short = g[g["n"] != g["want"]]
    if len(short):
        problems.append(f"{len(short)} unit(s) with missing ranks, e.g. {short.index[0]}")
    for d in ("", "results", "errors"):
        left = [f for f in os.listdir(os.path.join(os.fspath(path), d)) if f.startswith(".tmp-")]
        if left:
            problems.append(f"temporary files left in {os.path.join(os.fspath(path), d)}: {left[:3]}")
    return problems
