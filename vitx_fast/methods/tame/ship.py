"""Build the shipped T-TAME explainer for the bundled demo model and measure it.

    nice -n 10 python -m vitx_fast.methods.tame.ship

Trains on the bundled benchmark's train split with the demo model frozen (`train_tame`), writes
`vitx_fast/methods/tame/weights/demo_tame.safetensors` (float32, ~130 kB), then measures AD/IC at 100/50/15%
(docs/metrics.md §4) on test scenes and stores the figures in the checkpoint's `info["evaluation"]`. Same arguments and
thread count -> the same weights.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from vitx_fast.methods.tame import checkpoint as ckpt

PERCENTS = (0.0, 0.5, 0.85)  # quantile thresholds: AD/IC at 100%, 50% and 15% kept


@torch.no_grad()
def ad_ic(model, images: torch.Tensor, maps: torch.Tensor, mean, std, percents=PERCENTS, batch: int = 100) -> dict:
    """AD and IC (T-TAME paper protocol, the authors' get_masked_inputs / get_AD / get_IC).

    images: (N, 3, H, W) normalised; maps: (N, h, w) maps of the top-1 class. Each map is min-max normalised
    (eps 1e-10), bilinearly upsampled to H x W, thresholded at its own torch.quantile q (values below -> 0, the rest
    keep their soft value), multiplied with the image in [0, 1] pixel space and re-normalised. Y / O = softmax
    probability of the clean top-1 class on x / on the masked x.
    AD = 100/N sum max(0, Y - O)/Y, IC = 100/N sum 1[O > Y].
    """
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    ys, os_ = [], {q: [] for q in percents}
    for i in range(0, len(images), batch):
        x, m = images[i:i + batch], maps[i:i + batch].unsqueeze(1).to(images.dtype)
        probs = model(x).softmax(-1)
        y_prob, y = probs.max(-1)
        flat = m.flatten(1)
        lo, hi = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
        m = (m - lo) / (hi - lo + 1e-10)
        m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False).float()
        raw = x * std_t + mean_t
        masked = []
        for q in percents:
            thr = m.flatten(1).quantile(q, dim=1).view(-1, 1, 1, 1)
            masked.append(((m.masked_fill(m < thr, 0).to(x.dtype) * raw) - mean_t) / std_t)
        out = model(torch.cat(masked)).softmax(-1)  # one 3B forward
        for j, q in enumerate(percents):
            os_[q].append(out[j * len(x):(j + 1) * len(x)].gather(1, y[:, None])[:, 0])
        ys.append(y_prob)
    Y = torch.cat(ys)
    res = {}
    for q in percents:
        O = torch.cat(os_[q])
        label = f"{round(100 * (1 - q))}%"
        res[label] = {"AD": float(torch.nan_to_num((Y - O).clip(min=0) / Y).sum() * (100 / len(Y))),
                      "IC": float(((O - Y) > 0).sum() * (100 / len(Y)))}
    return res


def evaluate(model, explainer, n: int = 500, seed: int = 0, baselines: bool = True) -> dict:
    """AD/IC of the explainer (top-1 maps) on `n` one-digit test scenes; with a centred-Gaussian and a random map
    as reference points."""
    import vitx_fast as vx
    from vitx_fast.data import make_benchmark

    bench = make_benchmark(split="test", n=n, objects=1, seed=seed)
    images = bench.images.to(next(model.parameters()).dtype)
    maps = torch.cat([vx.explain(model, images[i:i + 100], method="tame", explainer=explainer).maps
                      for i in range(0, n, 100)])
    out = {"n": n, "split": "test", "seed": seed, "tame": ad_ic(model, images, maps, bench.mean, bench.std)}
    if baselines:
        h, w = maps.shape[-2:]
        g = torch.Generator().manual_seed(seed)
        out["random"] = ad_ic(model, images, torch.rand(n, h, w, generator=g), bench.mean, bench.std)
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        centre = torch.exp(-(xx ** 2 + yy ** 2) / 0.5).expand(n, h, w)
        out["centre"] = ad_ic(model, images, centre, bench.mean, bench.std)
    return out


def format_table(result: dict) -> str:
    """Markdown table of evaluate()'s output."""
    cols = [f"{m} {p}" for p in ("100%", "50%", "15%") for m in ("AD", "IC")]
    lines = ["| maps | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in result.items():
        if isinstance(res, dict):
            lines.append(f"| {name} | " + " | ".join(f"{res[p][m]:.2f}" for p in ("100%", "50%", "15%")
                                                    for m in ("AD", "IC")) + " |")
    return "\n".join(lines) + f"\n(n = {result['n']} {result['split']} images, seed {result['seed']})"


def main(argv=None) -> int:
    from vitx_fast.methods.tame.train import train_tame
    from vitx_fast.models.demo import load_demo_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6000, help="training scenes (bench train split)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="folder for the epoch checkpoints (default: a temporary folder)")
    p.add_argument("--out", default=str(ckpt.SHIPPED))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_demo_model()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ex = train_tame(model, "bench", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        bench_n=args.n, out=args.work or tmp, resume=args.work is not None)
    train_s = time.time() - t0
    ex = ex.float()
    result = evaluate(model, ex, n=args.eval_n)
    ex.info = dict(ex.info, evaluation=result)
    ckpt.save_explainer(args.out, ex)
    print(format_table(result))
    print(f"trained in {train_s:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
