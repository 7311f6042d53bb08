"""`vitx explain`: a batch job into a Parquet result store (vitx_fast.jobs; docs/batch.md)."""
from __future__ import annotations

import sys

from vitx_fast.cli._common import CLIError

MAX_LISTED = 20


def add_parser(sub):
    e = sub.add_parser(
        "explain", help="explain images into a result store (batched, resumable, local or Ray)",
        description="Explain images, folders, globs, list files (.txt: one path a line) or tables (.parquet/.csv "
                    "with an image column of paths or bytes) into the result store STORE (Parquet). Re-running "
                    "the same command resumes: units the store holds are skipped. Read the results with "
                    "vitx_fast.read_results(STORE); draw them with `vitx render STORE --out DIR`.")
    e.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs, list files or tables")
    e.add_argument("--out", required=True, metavar="STORE", help="the result store (a new or existing store folder)")
    e.add_argument("--method", nargs="+", default=["reciprocam"], help="method names, or 'all' (default reciprocam)")
    e.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE",
                   help="a method option, e.g. rollout.head_fusion=max or reciprocam.official=true (repeatable)")
    e.add_argument("--target", default="top1", help="top1 (default), topK (e.g. top5), all, or class indices 3,5")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    e.add_argument("--model", default="demo", help="'demo' (bundled) or a timm model name")
    e.add_argument("--checkpoint", help="local weights (.safetensors / .pth) for --model")
    e.add_argument("--random-weights", action="store_true", help="a timm model without pretrained weights")
    e.add_argument("--executor", default="local", choices=("local", "ray"))
    e.add_argument("--address", help="ray: an existing cluster to join (default: a local Ray for the job)")
    e.add_argument("--actors", type=int, default=1, help="ray: actors in the pool, each with the model loaded once")
    e.add_argument("--cpus-per-actor", type=float, default=None, help="ray: CPUs reserved per actor")
    e.add_argument("--ray-cpus", type=int, default=None, help="ray: CPUs of the local Ray (default: all)")
    e.add_argument("--image-column", help="tables: the column with image paths or bytes (default image/path/bytes)")
    e.add_argument("--id-column", help="tables: the column with each image's key (default: 'id' if present)")
    e.add_argument("--heatmap", action="store_true",
                   help="also store each map min-max normalised and upsampled to the input size, as uint8")
    e.add_argument("--decode-workers", type=int, default=2, help="local: decoding threads ahead of the model")
    e.add_argument("--shard-rows", type=int, default=8192, help="rows buffered before a result shard is committed")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    from vitx_fast.jobs import InputError, JobSpec, JobSpecError, StoreError, run

    try:
        spec = JobSpec.from_cli(args)
        result = run(spec, progress=not args.quiet)
    except (JobSpecError, InputError, StoreError) as exc:
        raise CLIError(str(exc)) from None
    except Exception as exc:
        if type(exc).__module__.startswith("ray"):  # a Ray failure: one line, the cause first
            raise CLIError(f"ray executor failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1]}") \
                from None
        raise
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for image, reason in result.failures[:MAX_LISTED]:
        print(f"failed {image}: {reason}", file=sys.stderr)
    if len(result.failures) > MAX_LISTED:
        print(f"... and {len(result.failures) - MAX_LISTED} more (vitx_fast.read_errors({spec.store!r}))",
              file=sys.stderr)
    print(result.summary())
    return 0 if result.ok else 1
