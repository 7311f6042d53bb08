"""`vitx demo`: explain bundled benchmark images with every method and write an HTML gallery."""
from __future__ import annotations

from pathlib import Path

from vitx_fast.cli._common import ensure_writable


def add_parser(sub):
    d = sub.add_parser("demo", help="explain bundled benchmark images with every method; write a gallery")
    d.add_argument("--out", default="gallery")
    d.add_argument("--n", type=int, default=4, help="one-object images")
    d.add_argument("--n-double", type=int, default=2, help="two-object images")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from vitx_fast.demo import build_gallery

    out = Path(args.out)
    ensure_writable(out)
    index = build_gallery(out, n_single=args.n, n_double=args.n_double, quiet=args.quiet)
    print(f"gallery written: {index.resolve()}")
    return 0
