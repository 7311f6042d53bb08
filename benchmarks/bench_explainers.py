"""End-to-end explainer benchmark (issue: fast paths): images/s and peak memory per method and backend, as ratios to a
plain forward of the same model in the same run, plus peers (OpenVINO XAI's torch ViTReciproCAM, pytorch-grad-cam's
GradCAM) when installed (`pip install -e .[bench]`). Writes benchmarks/results/explainers.{csv,md}.

    python benchmarks/bench_explainers.py                      # ViT-S/16 and ViT-B/16 at 224, batch 1 and 8
    python benchmarks/bench_explainers.py --quick              # ViT-S/16, batch 1 and 8, fast backends only
"""
import argparse
import sys
from pathlib import Path

import torch

from vitx_fast import bench


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.quick:
        rows = bench.run(models=("vit_small_patch16_224",), batches=(1, 8), backends=("fused",), reps=args.reps)
        name = "explainers_quick"
    else:
        rows = bench.run(reps=args.reps)
        # ReciproCAM at 384 px (N = 576): memory of the fast path against a plain forward
        rows += bench.run(models=("vit_base_patch16_384",), batches=(8,), methods=("reciprocam",),
                          backends=("fused",), peers=False, reps=1)
        name = "explainers"
    print(bench.to_markdown(rows))
    csv_path, md_path = bench.write(rows, args.out, name)
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
