"""`vitx info`: versions, devices, the native module and the method x backend matrix with reasons."""
from __future__ import annotations

from vitx_fast.cli._common import CLIError, load_model


def add_parser(sub):
    i = sub.add_parser("info", help="versions, devices, methods and backends")
    i.add_argument("--model", help="also check every method x backend against this model ('demo' or a timm name)")
    i.add_argument("--checkpoint", help="local weights for --model")
    i.add_argument("--random-weights", action="store_true",
                   help="accepted for symmetry: info never downloads weights (the layout is what it checks)")
    i.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from vitx_fast.engine.adapter import UnsupportedModelError
    from vitx_fast.info import collect, render

    model = load_model(args.model, args.checkpoint, pretrained=False)[0] if args.model else None
    try:
        print(render(collect(model)))
    except UnsupportedModelError as exc:
        raise CLIError(str(exc)) from None
    return 0
