"""Train the bundled demo ViT on the generated digit-scene benchmark.

    nice -n 10 python -m vitx_fast.models.train_demo --out vitx_fast/models/weights

Reproducible: the training pool is generated deterministically (sample i depends only on the seeds and i, so
the pool is the same for any number of worker processes), and torch is seeded; bitwise equality of the
weights additionally needs the same thread count and library build.

Training scenes use the held-in 75% of the handwritten digits with training-only augmentation (stronger
warps, blended same-class digits, digits rendered from matplotlib's fonts; per batch, random translations and RGB
channel orders); 12% of the pool are two-digit scenes trained with a half/half soft target so that both digits
rank high. Test digits are never seen. The defaults train the shipped checkpoint (0.45 M parameters, 6,000 steps
at batch 128, about 45 minutes on one core of a 2-core machine): 97.5% one-object test accuracy.
Curriculum: the first ``--curriculum`` steps mix in easy scenes (one training digit, white on black first,
then coloured, smaller and off-centre) whose share falls linearly from 100% to 0; from scratch, a ViT leaves
chance level far sooner on them than on the cluttered colour scenes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F

ARCH = dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10,
            class_token=True, global_pool="token")


def _chunk(args):
    objects, start, n, seed = args
    from vitx_fast.data.generate import TRAIN_AUGMENT, generate_raw

    d = generate_raw("train", n, objects, seed, None, cfg=TRAIN_AUGMENT, start=start, stream=1)
    return d["raw"], d["labels"]


def build_pool(n1, n2, seed, workers, chunk=1000):
    """Training pool: n1 one-digit and n2 two-digit scenes -> (raw uint8 (N,64,64,3), soft targets (N,10))."""
    jobs = [(1, s, min(chunk, n1 - s), seed) for s in range(0, n1, chunk)]
    jobs += [(2, s, min(chunk, n2 - s), seed) for s in range(0, n2, chunk)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            parts = pool.map(_chunk, jobs)
    else:
        parts = [_chunk(j) for j in jobs]
    raws, targets = [], []
    for raw, lab in parts:
        t = np.zeros((len(lab), 10), np.float32)
        for j in range(lab.shape[1]):
            t[np.arange(len(lab)), lab[:, j]] += 1.0 / lab.shape[1]
        raws.append(raw)
        targets.append(t)
    return np.concatenate(raws), np.concatenate(targets)


def build_model(arch=None):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**(arch or ARCH))


def _param_groups(model, wd):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model, bench, batch=500):
    """Top-1 accuracy (one object) or both-digits-in-top-2 rate (two objects)."""
    model.eval()
    logits = torch.cat([model(bench.images[i:i + batch]) for i in range(0, len(bench), batch)])
    if bench.labels.ndim == 1:
        return float((logits.argmax(1).numpy() == bench.labels).mean())
    top2 = np.sort(logits.topk(2, dim=1).indices.numpy(), axis=1)
    return float((top2 == np.sort(bench.labels, axis=1)).all(1).mean())


def _shift(x, gen, max_shift):
    """Random per-sample translation by up to max_shift pixels (edge-replicated)."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    xp = F.pad(x, (max_shift,) * 4, mode="replicate")
    off = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=gen)
    return torch.stack([xp[i, :, off[i, 0]:off[i, 0] + H, off[i, 1]:off[i, 1] + W] for i in range(B)])


def _permute_channels(x, gen):
    """Random RGB channel order per sample: objects stay brighter than their surroundings, colours vary."""
    order = torch.argsort(torch.rand(x.shape[0], 3, generator=gen), dim=1)
    return torch.gather(x, 1, order[:, :, None, None].expand_as(x))


class EasyScenes:
    """Curriculum scenes built on the fly in torch: one training digit (bilinear-upsampled, thresholded) in a
    bright colour on a dark uniform background, no clutter. ``difficulty`` in [0, 1] grows the position,
    size and rotation ranges towards those of the benchmark."""

    def __init__(self, gen, size=64):
        from vitx_fast.data.generate import _digits, source_split

        imgs, y = _digits()
        idx = source_split()["train"]
        self.digits = F.pad(torch.from_numpy(imgs[idx]), (2, 2, 2, 2))[:, None]  # (M, 1, 12, 12)
        self.labels = torch.from_numpy(y[idx])
        self.gen, self.size = gen, size

    def sample(self, n, difficulty):
        g = self.gen
        i = torch.randint(0, len(self.labels), (n,), generator=g)
        u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
        h = u(0.66 - 0.24 * difficulty, 0.7)                  # digit height as a canvas fraction
        w = h * u(0.75, 1.05)
        rot = torch.deg2rad(u(-12.0, 12.0) * difficulty)
        ty, tx = (u(-1, 1) * (1 - h) * difficulty, u(-1, 1) * (1 - w) * difficulty)
        # affine_grid maps output coords to input coords; the 8x8 digit spans 8/12 of the padded input
        k = 8.0 / 12.0
        cos, sin = torch.cos(rot), torch.sin(rot)
        theta = torch.stack([torch.stack([cos * k / w, sin * k / w, -(cos * tx + sin * ty) * k / w], 1),
                             torch.stack([-sin * k / h, cos * k / h, (sin * tx - cos * ty) * k / h], 1)], 1)
        grid = F.affine_grid(theta, (n, 1, self.size, self.size), align_corners=False)
        v = F.grid_sample(self.digits[i], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        t = u(0.3, 0.5).view(n, 1, 1, 1)
        a = ((v - t + 0.08) / 0.16).clamp(0, 1)
        a = a * a * (3 - 2 * a)
        # colours fade in with difficulty: white on black first (a ViT leaves chance much sooner on it)
        fg = 1.0 - difficulty * 0.45 * torch.rand(n, 3, 1, 1, generator=g)
        bg = difficulty * 0.3 * torch.rand(n, 3, 1, 1, generator=g)
        x = bg + a * (fg - bg)
        target = F.one_hot(self.labels[i], 10).float()
        return x, target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "weights"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", dest="batch", type=int, default=128)
    ap.add_argument("--batch", dest="batch", type=int, help=argparse.SUPPRESS)  # the older spelling
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--smoothing", type=float, default=0.1)
    ap.add_argument("--pool1", type=int, default=60000, help="one-digit training scenes")
    ap.add_argument("--pool2", type=int, default=8000, help="two-digit training scenes")
    ap.add_argument("--shift", type=int, default=4)
    ap.add_argument("--curriculum", type=int, default=800, help="steps over which easy scenes are phased out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--pool-cache", default=None, help="optional .npz to cache the generated pool")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    raw, target = load_pool(args)
    print(f"pool {raw.shape} in {time.time() - t0:.0f}s", flush=True)
    train(args, raw, target, t0)
    print(f"saved to {args.out} after {time.time() - t0:.0f}s", flush=True)


def load_pool(args) -> tuple[np.ndarray, np.ndarray]:
    """The generated training pool (raw uint8 (N, 64, 64, 3), soft targets (N, 10)), cached in --pool-cache."""
    if args.pool_cache and os.path.exists(args.pool_cache):
        z = np.load(args.pool_cache)
        return z["raw"], z["target"]
    raw, target = build_pool(args.pool1, args.pool2, args.seed, args.workers)
    if args.pool_cache:
        np.savez(args.pool_cache, raw=raw, target=target)
    return raw, target


def channel_stats(raw: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a subsample of the pool, in [0, 1], rounded to 4 digits (the model's config)."""
    sample = raw[:: max(1, len(raw) // 5000)].reshape(-1, 3).astype(np.float64) / 255.0
    return [round(float(v), 4) for v in sample.mean(0)], [round(float(v), 4) for v in sample.std(0)]


def train(args, raw: np.ndarray, target: np.ndarray, t0: float) -> None:
    """AdamW with warm-up and cosine decay over --steps batches; evaluates and saves every --eval-every steps."""
    from vitx_fast.data.generate import make_benchmark

    mean, std = channel_stats(raw)
    norm = (torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1))
    raw_t = torch.from_numpy(raw).permute(0, 3, 1, 2)  # uint8 view (N, 3, 64, 64)
    target_t = torch.from_numpy(target)
    val = make_benchmark("test", 1000, 1, seed=999, mean=mean, std=std)

    model = build_model()
    opt = torch.optim.AdamW(_param_groups(model, args.wd), lr=args.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    easy = EasyScenes(gen)
    perm, pos, t1, ema = torch.randperm(len(raw), generator=gen), 0, time.time(), None
    for step in range(args.steps):
        if pos + args.batch > len(perm):
            perm, pos = torch.randperm(len(raw), generator=gen), 0
        idx = perm[pos:pos + args.batch]
        pos += args.batch
        x, y = training_batch(args, step, raw_t[idx].float().div_(255.0), target_t[idx], easy, gen, norm)
        loss = train_step(model, opt, sched, x, y)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if (step + 1) % 100 == 0 and (step + 1) % args.eval_every:
            print(f"step {step + 1} loss {ema:.3f} {(time.time() - t1) / (step + 1):.2f}s/step", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = evaluate(model, val)
            print(f"step {step + 1} loss {ema:.3f} val_acc {acc:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{(time.time() - t1) / (step + 1):.2f}s/step elapsed {time.time() - t0:.0f}s", flush=True)
            _save(model, args, mean, std, time.time() - t0, step + 1, acc)


def training_batch(args, step: int, x: torch.Tensor, y: torch.Tensor, easy, gen, norm):
    """One augmented, normalised batch: curriculum easy scenes first, random channel order, shifts, smoothed labels.
    x: (b, 3, 64, 64) in [0, 1]; y: (b, 10) soft targets."""
    n_easy = int(round(args.batch * max(0.0, 1.0 - step / args.curriculum))) if args.curriculum else 0
    if n_easy:  # curriculum: replace part of the batch by easy scenes whose difficulty grows
        xe, ye = easy.sample(n_easy, min(1.0, step / args.curriculum))
        x, y = torch.cat([xe, x[n_easy:]]), torch.cat([ye, y[n_easy:]])
    x = _permute_channels(x, gen)
    x = _shift((x - norm[0]) / norm[1], gen, args.shift)
    return x, y * (1 - args.smoothing) + args.smoothing / 10


def train_step(model, opt, sched, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimiser step on soft-target cross-entropy, gradients clipped at norm 1; returns the loss."""
    model.train()
    loss = torch.sum(-y * F.log_softmax(model(x), dim=1), dim=1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def _save(model, args, mean, std, train_time, step, val_acc):
    """Write weights + config atomically (called at every evaluation: the last one is the final model)."""
    from safetensors.torch import save_file

    os.makedirs(args.out, exist_ok=True)
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    tmp = os.path.join(args.out, "demo_vit.safetensors.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(args.out, "demo_vit.safetensors"))
    config = {"architecture": "timm.models.vision_transformer.VisionTransformer", "arch": ARCH,
              "input_size": [3, ARCH["img_size"], ARCH["img_size"]], "mean": mean, "std": std,
              "classes": [str(c) for c in range(10)],
              "num_params": int(sum(p.numel() for p in model.parameters())),
              "training": {k.replace("_", "-"): v for k, v in vars(args).items() if k not in ("out", "pool_cache")}
              | {"wall_time_s": round(train_time, 1), "torch": torch.__version__, "steps_done": step,
                 "val_acc_seed999_n1000": val_acc}}
    tmp = os.path.join(args.out, "demo_vit.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "demo_vit.json"))


if __name__ == "__main__":
    main()
