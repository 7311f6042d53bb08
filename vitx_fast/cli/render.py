"""`vitx render`: overlays and a grid per image from a result store, drawn on the original image."""
from __future__ import annotations

import os
import sys

import numpy as np

from vitx_fast.cli._common import CLIError


def add_parser(sub):
    r = sub.add_parser("render", help="draw a result store: an overlay per map and a grid per image",
                       description="For every image of STORE: DIR/<key>.<method>.c<class>.png (the map over the "
                                   "original image, on the region the model saw) and DIR/<key>.grid.png (the image "
                                   "and every overlay, labelled).")
    r.add_argument("store", help="a result store written by `vitx explain`")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--method", nargs="+", help="only these methods")
    r.add_argument("--image", nargs="+", help="only these image keys")
    r.add_argument("--limit", type=int, default=None, help="at most this many images (sorted by key)")
    r.add_argument("--max-targets", type=int, default=3, help="overlays per (image, method) at most (best ranks)")
    r.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity")
    r.set_defaults(func=cmd_render)


def draw(image: np.ndarray, grid_map, region, alpha: float) -> np.ndarray:
    """image (H, W, 3) uint8, grid_map (h, w) -> the overlay on the model's region of the image (H, W, 3) uint8."""
    from vitx_fast.imaging import blend

    return blend(image, np.asarray(grid_map, np.float32), alpha=alpha, region=region)


def safe_relpath(key: str) -> str:
    """An image key as a relative path that cannot leave the output folder."""
    parts = [("_" if p == ".." else p) for p in key.replace("\\", "/").split("/") if p not in ("", ".")]
    return os.path.join(*parts) if parts else "_"


class _Sources:
    """Original images by their `source` (a file, or '<table>#row=<i>' for bytes held in a table)."""

    def __init__(self):
        self.tables: dict[str, object] = {}

    def read(self, source: str, key: str):
        from vitx_fast.data.images import read_image

        path, sep, row = source.rpartition("#row=")
        if sep and row.isdigit() and os.path.isfile(path):
            from vitx_fast.jobs.inputs import table_items

            if path not in self.tables:
                self.tables[path] = {it.source: it.data for it in table_items(path, None, None)}
            return read_image(self.tables[path].get(source) or b"", name=key)
        return read_image(source, name=key)


def render_store(store: str, out: str, methods=None, images=None, limit=None, max_targets: int = 3,
                 alpha: float = 0.5) -> tuple[int, list[str]]:
    """Draw the store; returns (images drawn, problems)."""
    from vitx_fast import viz
    from vitx_fast.data.images import ImageDecodeError, save_image
    from vitx_fast.imaging import model_view
    from vitx_fast.jobs import read_results
    from vitx_fast.jobs.store import read_manifest

    df = read_results(store, columns=["image", "method", "options_digest", "model_id", "target_spec", "rank",
                                      "target", "probability", "map", "source"])
    if methods:
        df = df[df["method"].isin(methods)]
    if images:
        df = df[df["image"].isin(images)]
    df = df[df["rank"] < max_targets]
    models = (read_manifest(store) or {}).get("models", {})
    keys = sorted(df["image"].unique())[:limit]
    sources, problems = _Sources(), []
    for key in keys:
        rows = df[df["image"] == key].sort_values(["method", "model_id", "target_spec", "options_digest", "rank"])
        try:
            img = np.asarray(sources.read(rows["source"].iloc[0], key))
        except ImageDecodeError as exc:
            problems.append(f"{key}: cannot draw, the original image is unreadable ({exc})")
            continue
        units = rows.groupby(["method", "model_id", "target_spec", "options_digest"], sort=False).ngroups
        tiles, labels = [img], ["image"]
        base = os.path.join(out, safe_relpath(key))
        os.makedirs(os.path.dirname(base) or out, exist_ok=True)
        for r in rows.itertuples():
            cfg = (models.get(r.model_id) or {}).get("data_config")
            tile = draw(img, r.map, model_view(img.shape[1], img.shape[0], cfg), alpha)
            unique = units > len(rows["method"].unique())  # one method with several option sets or models
            tag = f"{r.method}-{r.options_digest[:6]}" if unique else r.method
            save_image(tile, f"{base}.{tag}.c{r.target}.png")
            tiles.append(tile)
            p = "" if r.probability != r.probability else f" p={r.probability:.2f}"
            labels.append(f"{tag} c={r.target}{p}")
        save_image(viz.labeled_row(tiles, labels), f"{base}.grid.png")
    return len(keys) - len(problems), problems


def cmd_render(args) -> int:
    from vitx_fast.jobs import StoreError
    from vitx_fast.jobs.store import read_manifest

    if not os.path.isdir(args.store) or read_manifest(args.store) is None:
        raise CLIError(f"{args.store} is not a result store (no manifest.json); write one with `vitx explain`")
    if args.max_targets < 1 or (args.limit is not None and args.limit < 1):
        raise CLIError("--max-targets and --limit must be >= 1")
    try:
        os.makedirs(args.out, exist_ok=True)
        n, problems = render_store(args.store, args.out, args.method, args.image, args.limit, args.max_targets,
                                   args.alpha)
    except (StoreError, OSError) as exc:
        raise CLIError(f"cannot render {args.store} to {args.out}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    for p in problems:
        print(p, file=sys.stderr)
    print(f"drew {n} image(s) from {args.store} -> {args.out}")
    return 1 if problems else 0
