"""Shared pieces of the metrics: map preparation, the two pixel spaces, target resolution and the chunked forward
that scores many perturbed copies of a batch under a memory budget.

Shapes: images (B, C, H, W) normalised as the model expects; maps (B, h, w) raw at any resolution (token grid or
image size). Every metric reads softmax probabilities except ROAD accuracy, which reads the argmax.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from vitx_fast.postprocess import normalize, upsample

#: bytes of activations one forward chunk may use (estimate); override per call with ``memory_budget=``.
DEFAULT_MEMORY_BUDGET = 1 << 30
#: on CPU, forwards (and imputation solves) larger than this get slower per image (caches), so chunks stop here
CPU_MAX_BATCH = 32
MINMAX_EPS = 1e-12


def check_inputs(images: torch.Tensor, maps: torch.Tensor, name: str) -> torch.Tensor:
    """Validate (B, C, H, W) images and (B, h, w) maps (a (B, 1, h, w) map is squeezed); return the maps."""
    if images.dim() != 4:
        raise ValueError(f"{name}: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise ValueError(f"{name}: maps must be (B, h, w), got shape {tuple(maps.shape)}")
    if maps.shape[0] != images.shape[0]:
        raise ValueError(f"{name}: {maps.shape[0]} maps for {images.shape[0]} images")
    if not images.is_floating_point():
        raise TypeError(f"{name}: images must be a floating tensor, got {images.dtype}")
    return maps


def prepare_maps(maps: torch.Tensor, size, mode: str = "bilinear", order: str = "upsample_first",
                 dtype=None, eps: float = MINMAX_EPS) -> torch.Tensor:
    """(B, h, w) raw maps -> (B, H, W) in [0, 1].

    order="upsample_first" (the default): resize to `size` with `mode` (bilinear: align_corners=False), then
    per-image min-max (m - min) / (max - min + 1e-12). order="minmax_first": min-max at h x w, then resize (T-TAME and
    vitcam, whose resize of a [0, 1] map may then overshoot slightly with bicubic). A map already at `size` is not
    resized. A constant map becomes 0 everywhere. eps: the min-max denominator's epsilon (T-TAME's maps use 1e-10).
    """
    m = maps.to(dtype) if dtype is not None else (maps if maps.is_floating_point() else maps.float())
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    same = tuple(m.shape[-2:]) == size
    if order == "upsample_first":
        return normalize(m if same else upsample(m, size, mode), eps=eps)
    if order == "minmax_first":
        m = normalize(m, eps=eps)
        return m if same else upsample(m, size, mode)
    raise ValueError(f"unknown order {order!r}")


def resolve_norm(model, images: torch.Tensor, mean=None, std=None, name: str = "metric"):
    """(1, C, 1, 1) mean and std of the model's input normalisation: the arguments, else the timm model's
    `pretrained_cfg`. Needed only where a metric works in [0, 1] pixel space."""
    if mean is None or std is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean") if mean is None else mean
        std = cfg.get("std") if std is None else std
    if mean is None or std is None:
        raise ValueError(f"{name}: this convention works in pixel space and needs the input normalisation; pass "
                         f"mean=... and std=... (the model has no pretrained_cfg with mean/std)")
    c = images.shape[1]
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).reshape(-1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).reshape(-1)
    if mean.numel() == 1:
        mean = mean.expand(c)
    if std.numel() == 1:
        std = std.expand(c)
    return mean.reshape(1, c, 1, 1), std.reshape(1, c, 1, 1)


def to_pixel(images, mean, std):
    """Normalised -> [0, 1] pixel space."""
    return images * std + mean


def to_normalised(pixels, mean, std):
    """[0, 1] pixel space -> normalised."""
    return (pixels - mean) / std


@contextlib.contextmanager
def eval_mode(model):
    """Score in eval mode; restore the caller's mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def resolve_metric_targets(targets, probs: torch.Tensor, name: str) -> torch.Tensor:
    """None -> top-1 of `probs` (B, K); an int, list or (B,) tensor -> (B,) long on probs' device."""
    b, k = probs.shape
    if targets is None:
        return probs.argmax(-1)
    t = torch.as_tensor(targets, device=probs.device)
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise TypeError(f"{name}: targets must be class indices")
    t = t.long()
    if t.dim() == 0:
        t = t.expand(b).clone()
    if t.shape != (b,):
        raise ValueError(f"{name}: targets must be (B,) = ({b},), got shape {tuple(t.shape)}")
    if ((t < 0) | (t >= k)).any():
        raise ValueError(f"{name}: target out of range for a model with {k} classes")
    return t


def per_image_bytes(model, images: torch.Tensor) -> int:
    """Rough peak activation bytes of one image in a no-grad forward (timm ViT layout if recognisable)."""
    elem = images.element_size()
    inp = images[0].numel() * elem
    pe = getattr(model, "patch_embed", None)
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    blocks = getattr(model, "blocks", None)
    if pe is not None and dim and blocks is not None and len(blocks) > 0:
        try:
            grid = pe.dynamic_feat_size(images.shape[-2:]) if getattr(pe, "dynamic_img_size", False) else pe.grid_size
            tokens = int(grid[0]) * int(grid[1]) + int(getattr(model, "num_prefix_tokens", 1))
            heads = int(getattr(blocks[0].attn, "num_heads", 1))
            mlp = int(getattr(getattr(blocks[0], "mlp", None), "fc1", torch.nn.Linear(dim, 4 * dim)).out_features)
            # residual stream + qkv + mlp hidden + attention probabilities (unfused path) of one block
            return inp + elem * tokens * (6 * dim + mlp + 2 * heads * tokens)
        except (AttributeError, TypeError):
            pass
    return 32 * inp


def chunk_size(model, images: torch.Tensor, batch_size: int | None = None, memory_budget: int | None = None) -> int:
    """Images per forward: `batch_size` if given, else what fits in `memory_budget` bytes (inputs + activations),
    at most CPU_MAX_BATCH on CPU."""
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return int(batch_size)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    n = max(1, budget // max(1, per_image_bytes(model, images)))
    return min(n, CPU_MAX_BATCH) if images.device.type == "cpu" else n


@torch.no_grad()
def score_perturbed(model, n: int, build: Callable[[int, int], torch.Tensor], targets: torch.Tensor, chunk: int,
                    argmax: bool = False):
    """Softmax probability of `targets[j]` for n inputs built lazily.

    build(start, stop) -> (stop - start, C, H, W), the perturbed inputs j in [start, stop); targets: (n,) long.
    Returns probs (n,) and, if argmax, the predicted class (n,). Only `chunk` inputs exist at a time.
    """
    probs, preds = [], []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        logits = model(build(s, e))
        p = torch.softmax(logits, dim=-1)
        probs.append(p.gather(1, targets[s:e, None].to(p.device))[:, 0])
        if argmax:
            preds.append(logits.argmax(-1))
    probs = torch.cat(probs) if probs else torch.empty(0)
    return (probs, torch.cat(preds)) if argmax else probs


@torch.no_grad()
def clean_probs(model, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """Softmax over classes of the clean images, (B, K)."""
    return torch.cat([torch.softmax(model(images[s:s + chunk]), -1) for s in range(0, images.shape[0], chunk)])
