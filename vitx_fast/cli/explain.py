"""`vitx explain`: explain image files and folders with one or more methods."""
from __future__ import annotations

import sys
from pathlib import Path

from vitx_fast.cli._common import CLIError, check_target, ensure_writable, load_model, parse_methods, parse_target
from vitx_fast.data.images import display_image, image_files, make_transform


def add_parser(sub):
    e = sub.add_parser("explain", help="explain images or folders of images")
    e.add_argument("paths", nargs="+", help="image files or folders")
    e.add_argument("--model", default="demo", help="'demo' (bundled) or a timm model name")
    e.add_argument("--checkpoint", help="local weights (.safetensors / .pth) for --model")
    e.add_argument("--random-weights", action="store_true", help="a timm model without pretrained weights")
    e.add_argument("--method", nargs="+", help="method names, or 'all' (default: reciprocam)")
    e.add_argument("--target", help="top1 (default), all, or class index(es) like 3 or 3,5")
    e.add_argument("--out", default="vitx-out", help="output folder")
    e.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_explain)


def find_images(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """(image files, missing paths): folders are searched recursively; a missing path is reported, not fatal, unless
    nothing is left."""
    out: list[Path] = []
    missing: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(image_files(p))
        elif p.exists():
            out.append(p)
        else:
            missing.append(p)
    if not out:
        if missing:
            raise CLIError(f"no such file or folder: {' '.join(map(str, missing))}")
        raise CLIError(f"no images found in {' '.join(paths)}")
    return out, missing


def save_npz(path: Path, **arrays) -> None:
    import os

    import numpy as np

    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def cmd_explain(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    import vitx_fast as vx
    from vitx_fast import viz

    methods = parse_methods(args.method)
    out = Path(args.out)
    ensure_writable(out)
    files, missing = find_images(args.paths)
    target = parse_target(args.target)
    model, cfg = load_model(args.model, args.checkpoint, pretrained=False if args.random_weights else None)
    check_target(target, model)
    transform = make_transform(cfg)
    for p in missing:
        print(f"skipped {p}: no such file or folder", file=sys.stderr)
    failed = len(missing)
    files_total = len(files) + len(missing)
    for f in tqdm(files, desc="explain", unit="img", disable=args.quiet):
        stem = out / f.stem
        if (stem.parent / (f.stem + ".npz")).exists() and not args.overwrite:
            continue  # resumable: finished images are kept
        try:
            with Image.open(f) as im:
                im.load()
                rgb = im.convert("RGB")
        except Exception as exc:
            tqdm.write(f"skipped {f}: unreadable image ({type(exc).__name__}: {str(exc).splitlines()[0]})",
                       file=sys.stderr)
            failed += 1
            continue
        x = transform(rgb).unsqueeze(0).to(next(model.parameters()).dtype)
        shown = display_image(rgb, cfg)
        tiles, labels, arrays, logits = [shown], ["image"], {}, None
        for m in methods:
            try:
                exp = vx.explain(model, x, method=m, target=target)
            except (ValueError, TypeError, NotImplementedError) as exc:
                tqdm.write(f"{f.name}: {m} skipped: {exc}", file=sys.stderr)
                continue
            logits = exp.logits
            maps = exp.maps[0] if exp.maps.dim() == 3 else exp.maps[0, 0]
            arrays[m] = exp.maps[0].detach().float().cpu().numpy()
            arrays[f"{m}_targets"] = exp.targets[0].cpu().numpy()
            ov = viz.overlay(shown, maps)
            viz.save_png(ov, out / f"{f.stem}_{m}.png")
            tiles.append(ov)
            labels.append(f"{m} c={int(exp.targets.flatten()[0])}")
            if exp.flow is not None:
                flow = exp.flow[0] if exp.flow.dim() == 4 else exp.flow[0, 0]
                arrays[f"{m}_flow"] = flow.detach().float().cpu().numpy()
                strip = [viz.overlay(shown, flow[b]) for b in range(flow.shape[0])]
                viz.save_png(viz.labeled_row(strip, [f"block {b}" for b in range(len(strip))]),
                             out / f"{f.stem}_{m}_flow.png")
        if logits is None:  # every method refused: no .npz, so that a later run retries this image
            failed += 1
            continue
        arrays["logits"] = logits[0].float().cpu().numpy()
        viz.save_png(viz.labeled_row(tiles, labels), out / f"{f.stem}_grid.png")
        save_npz(out / f"{f.stem}.npz", **arrays)
    n_ok = files_total - failed
    print(f"explained {n_ok} of {files_total} image(s) with {', '.join(methods)} -> {out}")
    return 0 if n_ok > 0 else 1
