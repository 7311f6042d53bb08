"""End-to-end explainer benchmark (issue #14): time and peak memory of every method as ratios to a plain
`inference_mode` forward of the same model measured in the same run. Every function is warmed up; each timed call
follows its own timed forward (median, p20-p80, median of the paired ratios); peak memory is measured in a fresh
process per row, the plain forward included; rows for the autograd forward+backward floor, GAE with 5 classes per
image, and the peers (OpenVINO XAI's ViTReciproCAM, pytorch-grad-cam's GradCAM) or why they are missing.
Writes benchmarks/results/explainers.{csv,md}; vitx_fast/bench.py describes the measurement, and `vitx bench`
takes the same flags.

    python benchmarks/bench_explainers.py                          # ViT-B/16 (random weights), 224 px, batch 8,
                                                                   # float32, CPU, 5 rounds
    python benchmarks/bench_explainers.py --reference              # also the reference backend
    python benchmarks/bench_explainers.py --model vit_tiny_patch16_224 --batch-size 128 --method gae \\
        --name explainers_gae_memory                               # the memory target: peak <= 2 x forward + 0.5 GB
"""
import argparse
import shlex
import sys
from pathlib import Path

from vitx_fast import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(ap, out_default=str(Path(__file__).parent / "results"), name_default="explainers")
    args = ap.parse_args(argv)
    command = "python benchmarks/bench_explainers.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        bench.run_from_args(args, title="Explainer benchmark", command=command.strip())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
