"""End-to-end explainer benchmark (issue #14): time and peak memory per method and backend as ratios to a plain
forward of the same model, each case warmed up and timed in alternation with that forward (median and p20-p80),
peak memory in a fresh process per case, the autograd forward+backward floor, GAE with 5 classes per image, and
the peers (OpenVINO XAI's torch ViTReciproCAM, pytorch-grad-cam's GradCAM) or the reason they are missing.
Writes benchmarks/results/explainers.{csv,md} (vitx_fast/bench.py describes the measurement).

    python benchmarks/bench_explainers.py                      # ViT-S/16 and ViT-B/16 at 224, batch 1 and 8
    python benchmarks/bench_explainers.py --quick              # ViT-B/16, batch 8, fast backends only
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from vitx_fast import bench


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reference-reps", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    load = os.getloadavg()
    if args.quick:
        rows = bench.run(models=("vit_base_patch16_224",), batches=(8,), backends=("fused", "cpp"), reps=args.reps,
                         memory=not args.no_memory)
        name = "explainers_quick"
    else:
        rows = bench.run(models=args.models, batches=args.batches, reps=args.reps, reference_reps=args.reference_reps,
                         memory=not args.no_memory)
        # ReciproCAM at 384 px (N = 576): memory of the fast path against a plain forward
        rows += bench.run(models=("vit_base_patch16_384",), batches=(8,), methods=("reciprocam",),
                          backends=("fused",), peers=False, multi_class=False, reps=args.reps,
                          memory=not args.no_memory)
        name = "explainers"
    after = os.getloadavg()
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; load average "
              f"{load[0]:.2f} before and {after[0]:.2f} after the run (a shared machine: compare the ratios, which "
              f"pair each case with forwards timed in alternation, rather than the absolute times).")
    print(header + "\n\n" + bench.to_markdown(rows))
    csv_path, md_path = bench.write(rows, args.out, name, header=header)
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
