"""`vitx data export`: the generated benchmark as an ImageNet-style folder with Pascal VOC boxes."""
from __future__ import annotations

from pathlib import Path

from vitx_fast.cli._common import ensure_writable


def add_parser(sub):
    data = sub.add_parser("data", help="bundled benchmark data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    x = dsub.add_parser("export", help="write the generated benchmark as an ImageNet-style folder with VOC XML")
    x.add_argument("--out", required=True)
    x.add_argument("--split", default="test", choices=("train", "test"))
    x.add_argument("--n", type=int, default=100)
    x.add_argument("--objects", type=int, default=1, choices=(1, 2))
    x.add_argument("--seed", type=int, default=0)
    x.set_defaults(func=cmd_data_export)


def cmd_data_export(args) -> int:
    from vitx_fast.data.voc import export_benchmark

    out = Path(args.out)
    ensure_writable(out)
    export_benchmark(out, split=args.split, n=args.n, objects=args.objects, seed=args.seed)
    print(f"wrote {args.n} {args.split} images ({args.objects} object(s) each) to {out}")
    return 0
