"""`vitx`: explain images, build the demo gallery, report what is available, export the bundled benchmark."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class CLIError(Exception):
    """A one-line error for the user; the CLI prints it and exits non-zero."""


# ---------------------------------------------------------------- model loading
def load_model(name: str, checkpoint: str | None = None, pretrained: bool | None = None):
    """Return (model, data_config) for 'demo' or a timm model name, optionally with a local checkpoint."""
    import timm

    if name == "demo":
        from vitx_fast.models.demo import demo_data_config, load_demo_model

        model = load_demo_model()
        if checkpoint:
            _load_checkpoint(model, checkpoint)
        return model, demo_data_config()
    if not timm.is_model(name):
        raise CLIError(f"unknown timm model {name!r} (see timm.list_models('vit*'))")
    use_pretrained = (checkpoint is None) if pretrained is None else pretrained
    try:
        if checkpoint:
            state = _read_state_dict(checkpoint)
            kwargs = {}
            head = state.get("head.weight")
            if head is not None:
                kwargs["num_classes"] = head.shape[0]
            elif not any(k.startswith("head.") for k in state):
                kwargs["num_classes"] = 0
            model = timm.create_model(name, pretrained=False, **kwargs)
            _load_checkpoint(model, checkpoint, state)
        else:
            model = timm.create_model(name, pretrained=use_pretrained)
    except CLIError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm / hub errors become one line
        hint = " (no network? pass --checkpoint FILE)" if use_pretrained and not checkpoint else ""
        raise CLIError(f"cannot create {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}{hint}") from None
    model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, cfg


def _read_state_dict(path: str) -> dict:
    import torch

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"checkpoint not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CLIError(f"checkpoint {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_checkpoint(model, path: str, state: dict | None = None) -> None:
    state = state if state is not None else _read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:2]
        raise CLIError(f"checkpoint {path} does not fit the architecture: {first[0] if first else exc}") from None


# ---------------------------------------------------------------- images
def find_images(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """(image files, missing paths): folders are searched recursively; a missing path is reported, not fatal, unless
    nothing is left."""
    out: list[Path] = []
    missing: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS and q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            missing.append(p)
    if not out:
        if missing:
            raise CLIError(f"no such file or folder: {' '.join(map(str, missing))}")
        raise CLIError(f"no images found in {' '.join(paths)}")
    return out, missing


def make_transform(cfg: dict):
    import timm.data

    return timm.data.create_transform(**{k: cfg[k] for k in ("input_size", "interpolation", "mean", "std",
                                                              "crop_pct", "crop_mode") if k in cfg})


def display_image(img, cfg: dict):
    """The RGB image the model sees, as uint8 (H, W, 3), for overlays."""
    import numpy as np
    import torchvision.transforms as T

    size = cfg["input_size"][-2:]
    crop_pct = cfg.get("crop_pct", 1.0) or 1.0
    scale = int(size[0] / crop_pct)
    tf = T.Compose([T.Resize(scale), T.CenterCrop(size)]) if crop_pct < 1.0 else T.Resize(tuple(size))
    return np.asarray(tf(img.convert("RGB")))


def _ensure_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vitx-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def _save_npz(path: Path, **arrays) -> None:
    import numpy as np

    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _methods(arg: list[str] | None) -> list[str]:
    import vitx_fast as vx

    available = vx.list_methods()
    if not arg:
        return ["reciprocam"]
    if arg == ["all"]:
        return available
    for m in arg:
        if m not in available:
            raise CLIError(f"unknown method {m!r}; available: {', '.join(available)}")
    return arg


# ---------------------------------------------------------------- commands
def cmd_explain(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    import vitx_fast as vx
    from vitx_fast import viz

    methods = _methods(args.method)
    out = Path(args.out)
    _ensure_writable(out)
    files, missing = find_images(args.paths)
    target = _parse_target(args.target)
    model, cfg = load_model(args.model, args.checkpoint, pretrained=False if args.random_weights else None)
    _check_target(target, model)
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
        except Exception as exc:  # noqa: BLE001 - an unreadable image is reported and skipped
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
        _save_npz(out / f"{f.stem}.npz", **arrays)
    n_ok = files_total - failed
    print(f"explained {n_ok} of {files_total} image(s) with {', '.join(methods)} -> {out}")
    return 0 if n_ok > 0 else 1


def _check_target(target, model) -> None:
    """Class indices of --target against the model's classes, before any image is read."""
    n = getattr(model, "num_classes", None)
    if target is None or target == "all" or not n:
        return
    vals = [target] if isinstance(target, int) else target[0]
    bad = [v for v in vals if not 0 <= v < n]
    if bad:
        raise CLIError(f"--target: class index {bad[0]} out of range for a model with {n} classes (0..{n - 1})")


def _parse_target(t: str | None):
    if t is None or t == "top1":
        return None
    if t == "all":
        return "all"
    try:
        vals = [int(v) for v in t.split(",")]
    except ValueError:
        raise CLIError(f"--target must be top1, all, or class indices like 3 or 3,5; got {t!r}") from None
    return vals[0] if len(vals) == 1 else [vals]


def cmd_info(args) -> int:
    from vitx_fast.info import collect, render
    from vitx_fast.models.timm_adapter import UnsupportedModelError

    model = load_model(args.model, args.checkpoint, pretrained=False)[0] if args.model else None
    try:
        print(render(collect(model)))
    except UnsupportedModelError as exc:
        raise CLIError(str(exc)) from None
    return 0


def cmd_demo(args) -> int:
    from vitx_fast.demo import build_gallery

    out = Path(args.out)
    _ensure_writable(out)
    index = build_gallery(out, n_single=args.n, n_double=args.n_double, quiet=args.quiet)
    print(f"gallery written: {index.resolve()}")
    return 0


def cmd_data_export(args) -> int:
    from vitx_fast.data import export_benchmark

    out = Path(args.out)
    _ensure_writable(out)
    export_benchmark(out, split=args.split, n=args.n, objects=args.objects, seed=args.seed)
    print(f"wrote {args.n} {args.split} images ({args.objects} object(s) each) to {out}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from vitx_fast import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = _methods(args.method) if args.method else None
    rows = bench.run(models=args.model, batches=args.batch, methods=methods, backends=args.backend,
                     img_size=args.img_size, peers=not args.no_peers, reps=args.reps, progress=not args.quiet)
    print(bench.to_markdown(rows))
    if args.out:
        _ensure_writable(Path(args.out))
        csv_path, md_path = bench.write(rows, args.out, args.name)
        print(f"wrote {csv_path} and {md_path}")
    return 0


def cmd_evaluate(args) -> int:
    import copy

    import torch

    from vitx_fast import evaluate as ev

    methods = _methods(args.methods or ["all"])
    methods = [m for m in methods if m != "grad_rollout" or args.methods]
    bad = sorted(set(args.metrics) - set(ev.METRICS))
    if bad:
        raise CLIError(f"unknown metric(s) {bad}; available: {', '.join(ev.METRICS)}")
    out = Path(args.out)
    _ensure_writable(out)
    model, cfg = load_model(args.model, args.checkpoint, pretrained=False if args.random_weights else None)
    models = [("trained" if args.model == "demo" else args.model, model)]
    if args.random_baseline:
        rnd = copy.deepcopy(model)
        torch.manual_seed(0)
        rnd.init_weights()  # timm's own initialisation: the same architecture, untrained
        models.append(("random weights", rnd.eval()))
    if args.data == "bundled":
        datasets = [ev.bundled(n=args.n, objects=k, seed=args.seed) for k in args.objects]
    else:
        size = tuple(cfg["input_size"][-2:])
        try:
            datasets = [ev.folder(args.data, size, cfg["mean"], cfg["std"])]
        except (OSError, ValueError) as exc:
            raise CLIError(f"cannot read {args.data}: {exc}") from None
    rows, curves = [], {}
    for data in datasets:
        for label, m in models:
            r, c = ev.evaluate(m, data, methods, args.metrics, batch_size=args.batch_size, progress=not args.quiet,
                               label=label)
            rows += r
            curves.update({f"{k} {data.name}": v for k, v in c.items()})
    print(ev.table(rows))
    paths = ev.write_results(rows, curves, out, args.name)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitx", description="Exact, fast explanations for timm Vision Transformers")
    sub = p.add_subparsers(dest="command", required=True)

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

    d = sub.add_parser("demo", help="explain bundled benchmark images with every method; write a gallery")
    d.add_argument("--out", default="gallery")
    d.add_argument("--n", type=int, default=4, help="one-object images")
    d.add_argument("--n-double", type=int, default=2, help="two-object images")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="speed and memory per method and backend, as ratios to a plain forward")
    b.add_argument("--model", nargs="+", default=["vit_small_patch16_224"], help="timm model names (random weights)")
    b.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    b.add_argument("--img-size", type=int, default=None)
    b.add_argument("--method", nargs="+", help="methods (default: all)")
    b.add_argument("--backend", nargs="+", help="backends (default: all)")
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--no-peers", action="store_true", help="skip peer libraries")
    b.add_argument("--out", help="folder for CSV and markdown results")
    b.add_argument("--name", default="bench", help="file stem of the results")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("evaluate", help="every method on every metric; a table, CSV and plots")
    v.add_argument("--model", default="demo", help="'demo' (bundled) or a timm model name")
    v.add_argument("--checkpoint", help="local weights for --model")
    v.add_argument("--random-weights", action="store_true", help="a timm model without pretrained weights")
    v.add_argument("--methods", nargs="+", help="methods (default: all)")
    v.add_argument("--data", default="bundled", help="'bundled' or an ImageNet-style folder with VOC XML boxes")
    v.add_argument("--metrics", nargs="+", default=["localization", "abpc", "adic", "road", "insertion_deletion"])
    v.add_argument("--n", type=int, default=100, help="bundled images per variant")
    v.add_argument("--objects", nargs="+", type=int, default=[1, 2], choices=(1, 2), help="bundled variants")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--random-baseline", action="store_true",
                   help="also evaluate the same architecture with random weights (a sanity baseline)")
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--out", default="evaluation", help="output folder")
    v.add_argument("--name", default="evaluation", help="file stem of the results")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_evaluate)

    from vitx_fast.tame.cli import add_parser as add_train_tame

    add_train_tame(sub)

    from vitx_fast.onnx_cli import add_parser as add_export

    add_export(sub)

    i = sub.add_parser("info", help="versions, devices, methods and backends")
    i.add_argument("--model", help="also check every method x backend against this model ('demo' or a timm name)")
    i.add_argument("--checkpoint", help="local weights for --model")
    i.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="bundled benchmark data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    x = dsub.add_parser("export", help="write the generated benchmark as an ImageNet-style folder with VOC XML")
    x.add_argument("--out", required=True)
    x.add_argument("--split", default="test", choices=("train", "test"))
    x.add_argument("--n", type=int, default=100)
    x.add_argument("--objects", type=int, default=1, choices=(1, 2))
    x.add_argument("--seed", type=int, default=0)
    x.set_defaults(func=cmd_data_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"vitx: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitx: interrupted (finished outputs are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
