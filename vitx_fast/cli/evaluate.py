"""`vitx evaluate`: every method on every metric, on the bundled benchmark or a VOC folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from vitx_fast.cli._common import CLIError, ensure_writable, load_model, parse_methods


def add_parser(sub):
    v = sub.add_parser("evaluate", help="every method on every metric; a table, CSV and plots")
    v.add_argument("--model", default="demo", help="'demo' (bundled) or a timm model name")
    v.add_argument("--checkpoint", help="local weights for --model")
    v.add_argument("--random-weights", action="store_true", help="a timm model without pretrained weights")
    v.add_argument("--method", dest="methods", nargs="+", help="method names, or 'all' (default: all)")
    v.add_argument("--methods", dest="methods", nargs="+", help=argparse.SUPPRESS)  # the older spelling
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


def cmd_evaluate(args) -> int:
    import copy

    import torch

    from vitx_fast import evaluate as ev

    methods = parse_methods(args.methods or ["all"])
    methods = [m for m in methods if m != "grad_rollout" or args.methods]
    bad = sorted(set(args.metrics) - set(ev.METRICS))
    if bad:
        raise CLIError(f"unknown metric(s) {bad}; available: {', '.join(ev.METRICS)}")
    out = Path(args.out)
    ensure_writable(out)
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
