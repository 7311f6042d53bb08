"""`vitx bench`: time and peak memory per method, as ratios to a plain forward measured in the same run
(vitx_fast/bench.py describes the measurement; benchmarks/bench_explainers.py takes the same flags)."""
from __future__ import annotations

from pathlib import Path

from vitx_fast.cli._common import CLIError, ensure_writable


def add_parser(sub):
    from vitx_fast import bench

    b = sub.add_parser("bench", help="time and peak memory per method as ratios to a plain forward (warmed up, "
                                     "each call paired with a forward; memory in a fresh process per row)",
                       description=bench.__doc__.split("\n\n")[0])
    bench.add_arguments(b)  # also a hidden --batch, the older spelling of --batch-size
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from vitx_fast import bench

    if args.out:
        ensure_writable(Path(args.out))
    try:
        bench.run_from_args(args, title="vitx bench")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return 0
