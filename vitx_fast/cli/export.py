"""`vitx export`: write the model and an explanation method as one ONNX graph."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def add_parser(subparsers):
    """Add the `export` subcommand to an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "export", help="write the model and an explanation method as one ONNX graph (logits and maps)",
        description="One ONNX graph with a dynamic-batch input `images` (B, 3, H, W), preprocessed as the model "
                    "expects (the mean and std are stored in the graph's metadata), and the outputs `logits` (B, C) "
                    "and `maps` (B, h, w) (B, C, h, w with --target all). The gradient methods' backward is part of "
                    "the graph: onnxruntime needs no autograd.")
    p.add_argument("--model", default="demo", help="'demo' (bundled) or a timm model name")
    p.add_argument("--checkpoint", help="local weights (.safetensors / .pth) for --model")
    p.add_argument("--random-weights", action="store_true", help="a timm model without pretrained weights")
    p.add_argument("--method", default="reciprocam", help="reciprocam, rollout, gae, agcam, daam, lrp, tame")
    p.add_argument("--target", default="top1", choices=("top1", "all", "input"),
                   help="top1: the predicted class; all: every class (reciprocam, tame); input: a second input "
                        "`classes` (B,) int64 chooses the class per image")
    p.add_argument("--upsample", nargs="?", const="bilinear", default=None, metavar="MODE",
                   help="resize the maps to the input size inside the graph (bilinear, or nearest / bicubic / "
                        "bicubic_pil)")
    p.add_argument("--normalize", action="store_true", help="min-max normalise each map inside the graph")
    p.add_argument("--flow", action="store_true", help="daam: also output `flow` (B, L, h, w), the per-block maps")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. head_fusion=max or explainer=tame.safetensors (repeatable)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    p.add_argument("--batch-size", dest="static_batch", type=int, default=None, metavar="B",
                   help="a fixed batch size B instead of a dynamic batch (default: dynamic)")
    p.add_argument("--static-batch", dest="static_batch", type=int, help=argparse.SUPPRESS)  # the older spelling
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.set_defaults(func=cmd_export)
    return p


def _value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(items: list[str]) -> dict:
    from vitx_fast.cli._common import CLIError

    opts = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--option expects KEY=VALUE, got {item!r}")
        opts[key.strip().replace("-", "_")] = _value(val.strip())
    return opts


def cmd_export(args) -> int:
    from vitx_fast.cli._common import CLIError, load_model
    from vitx_fast.engine.adapter import UnsupportedModelError
    from vitx_fast.onnx_export import OnnxExportError, check_method, export_onnx

    options = parse_options(args.option)
    try:  # before loading (possibly downloading) the model
        check_method(args.method)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = Path(args.out)
    blocker = next((d for d in out.parents if d.exists() and not d.is_dir()), None)
    if blocker is not None:
        raise CLIError(f"cannot write {out}: {blocker} is not a folder")
    model, cfg = load_model(args.model, args.checkpoint, pretrained=False if args.random_weights else None)
    meta = {k: ",".join(map(str, cfg[k])) for k in ("mean", "std", "input_size", "classes") if cfg.get(k)}
    meta["model"] = args.model
    made = [d for d in [out.parent, *out.parent.parents] if not d.exists()]
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(f"cannot create the folder {out.parent}: {exc.strerror or exc}") from None
        path = export_onnx(model.float(), out, args.method, target=args.target, upsample=args.upsample or False,
                           normalize=args.normalize, flow=args.flow, opset=args.opset,
                           dynamic_batch=args.static_batch is None,
                           batch_size=1 if args.static_batch is None else args.static_batch, metadata=meta,
                           **options)
    except (ValueError, TypeError, OSError, UnsupportedModelError, OnnxExportError, ImportError) as exc:
        for d in made:  # folders made for this export go again (export_onnx left no file in them)
            with contextlib.suppress(OSError):
                d.rmdir()
        raise CLIError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    size = path.stat().st_size / 2**20
    inputs = "images" + (", classes" if args.target == "input" else "")
    outputs = "logits, maps" + (", flow" if args.flow else "")
    print(f"wrote {path} ({size:.1f} MiB): {args.method}, inputs [{inputs}] -> outputs [{outputs}]")
    return 0
