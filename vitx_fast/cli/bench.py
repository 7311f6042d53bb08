"""`vitx bench`: speed and memory per method and backend, as ratios to a plain forward (vitx_fast/bench.py)."""
from __future__ import annotations

from pathlib import Path

from vitx_fast.cli._common import CLIError, ensure_writable, parse_methods


def add_parser(sub):
    b = sub.add_parser("bench", help="speed and memory per method and backend, as ratios to a plain forward "
                                     "(each case warmed up and timed in alternation with the forward)")
    b.add_argument("--model", nargs="+", default=["vit_small_patch16_224"], help="timm model names (random weights)")
    b.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    b.add_argument("--img-size", type=int, default=None)
    b.add_argument("--method", nargs="+", help="methods (default: all)")
    b.add_argument("--backend", nargs="+", help="backends (default: all)")
    b.add_argument("--reps", type=int, default=5, help="timed alternations per case, after the warm-up (>= 1)")
    b.add_argument("--reference-reps", type=int, default=2, help="timed alternations of the reference backend")
    b.add_argument("--warmup", type=int, default=1, help="warm-up runs per case (at least 1 is always run)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--no-memory", action="store_true", help="skip the per-case peak-memory processes")
    b.add_argument("--no-peers", action="store_true", help="skip peer libraries")
    b.add_argument("--out", help="folder for CSV and markdown results")
    b.add_argument("--name", default="bench", help="file stem of the results")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    from vitx_fast import bench

    if args.reps < 1 or args.reference_reps < 1:
        raise CLIError("--reps and --reference-reps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_methods(args.method) if args.method else None
    rows = bench.run(models=args.model, batches=args.batch, methods=methods, backends=args.backend,
                     img_size=args.img_size, peers=not args.no_peers, reps=args.reps,
                     reference_reps=args.reference_reps, warmup=args.warmup, memory=not args.no_memory,
                     progress=not args.quiet)
    print(bench.to_markdown(rows))
    if args.out:
        ensure_writable(Path(args.out))
        csv_path, md_path = bench.write(rows, args.out, args.name)
        print(f"wrote {csv_path} and {md_path}")
    return 0
