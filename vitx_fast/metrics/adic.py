"""Average Drop / Increase in Confidence (Chattopadhyay et al. 2018) under the three conventions of the papers.
See docs/metrics.md §4.

Per image, Y = softmax probability of the target on the clean image, O = the same on the explanation image:
drop = 100 * max(0, Y - O) / Y (0 where Y = 0, T-TAME's nan_to_num), increase = 100 * 1[O > Y] (strict). The
table values AD and IC are the means over images.

convention "ttame" (T-TAME's AD/IC at 100 / 50 / 15 % kept): target = the clean top-1; map = min-max at h x w (eps
    1e-10, T-TAME's normalizeMinMax), then bilinear to H x W; M_q zeroes the entries below the per-image
    torch.quantile(M, q) (linear), q = 1 - keep / 100, the others keep their soft value;
    E = normalise(M_q * unnormalise(x)), i.e. multiplied in [0, 1] pixel space.
convention "vitcam" (ViT-ReciproCAM notebook, also inside ADCC): target = the ground-truth label (None: top-1);
    map = min-max at h x w, then PIL bicubic to H x W; E = x * M in normalised space.
convention "openvino" (ADCC paper / openvino_xai): target = the requested class, else the prediction; map =
    bilinear to H x W, then min-max; E = normalise(unnormalise(x) * M).
"""
from __future__ import annotations

import torch

from vitx_fast.metrics._common import (
    check_inputs,
    chunk_size,
    clean_probs,
    eval_mode,
    prepare_maps,
    resolve_metric_targets,
    resolve_norm,
    score_perturbed,
    to_normalised,
    to_pixel,
)

CONVENTIONS = ("ttame", "vitcam", "openvino")
TTAME_KEEP = (100, 50, 15)
TTAME_MINMAX_EPS = 1e-10  # T-TAME's normalizeMinMax; with 1e-12 the quantile ties of the soft masks round differently
CLEAN_SCORES = ("target", "top1")


def explanation_maps(maps: torch.Tensor, size, convention: str) -> torch.Tensor:
    """(B, h, w) raw maps -> the (B, H, W) multiplier M of the convention (before T-TAME's quantile masking)."""
    if convention == "ttame":  # T-TAME's inference maps (docs/methods/tame.md §1.3): min-max, eps 1e-10
        return prepare_maps(maps, size, "bilinear", order="minmax_first", eps=TTAME_MINMAX_EPS)
    if convention == "vitcam":
        return prepare_maps(maps, size, "bicubic_pil", order="minmax_first")
    if convention == "openvino":
        return prepare_maps(maps, size, "bilinear", order="upsample_first")
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def quantile_mask(m: torch.Tensor, q: float) -> torch.Tensor:
    """T-TAME's M_q: entries of each (H, W) map below torch.quantile(map, q) (linear interpolation) set to 0, the
    entries at or above it keep their soft value. m: (B, H, W)."""
    if q == 0:
        return m
    thr = m.flatten(1).quantile(q, dim=1)
    return m.masked_fill(m < thr[:, None, None], 0)


def explanation_images(images, m, convention, mean=None, std=None, model=None):
    """E of the convention from the normalised images (B, C, H, W) and the multiplier m (B, H, W)."""
    if convention == "vitcam":
        return images * m[:, None]
    mu, sd = resolve_norm(model, images, mean, std, f"average_drop_increase(convention={convention!r})")
    return to_normalised(to_pixel(images, mu, sd) * m[:, None], mu, sd)


def clean_reference(probs0: torch.Tensor, tg: torch.Tensor, clean_score: str = "target") -> torch.Tensor:
    """Y of the drop: the clean probability of the target, or ("top1") the clean top-1 probability."""
    if clean_score == "target":
        return probs0.gather(1, tg[:, None])[:, 0]
    if clean_score == "top1":
        return probs0.amax(1)
    raise ValueError(f"clean_score must be 'target' or 'top1', got {clean_score!r}")


def drop_increase(y: torch.Tensor, o: torch.Tensor):
    """Per-image drop 100 * max(0, Y - O) / Y (0 where Y = 0) and increase 100 * 1[O > Y]."""
    drop = torch.nan_to_num((y - o).clamp(min=0) / y) * 100
    return drop, (o > y).to(y.dtype) * 100


@torch.no_grad()
def average_drop_increase(model, images: torch.Tensor, maps: torch.Tensor, targets=None, keep=None, *,
                          convention: str = "ttame", mean=None, std=None, clean_score: str = "target",
                          batch_size: int | None = None, memory_budget: int | None = None) -> dict:
    """Average Drop and Increase in Confidence, per image.

    model: classifier on normalised images (B, C, H, W) -> logits. maps: (B, h, w) raw. targets: the scored class
    (None: the clean top-1; the vitcam protocol passes the ground-truth label). keep: percent of the map kept, T-TAME
    only: a number (e.g. 15) or a sequence (default (100, 50, 15), i.e. q = 0, 0.5, 0.85); other conventions use the
    whole map. convention: "ttame" (default), "vitcam" or "openvino" (module docstring). mean / std: the input
    normalisation for the pixel-space conventions (default: the timm model's pretrained_cfg). clean_score: Y is the
    probability of the target ("target", default) or the clean top-1 probability ("top1", the aimagelab/ADCC code's
    `average_drop`, which reads O at the target but Y at the top-1).

    Returns "average_drop" and "increase_in_confidence" in percent, (B, K) for a sequence `keep` (column j for
    keep[j]) and (B,) otherwise; "prob" (B,) = Y, "explanation_prob" (same shape as the drops) = O, "targets",
    "prediction" (B,), and "keep" (K,) for T-TAME.
    """
    maps = check_inputs(images, maps, "average_drop_increase")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if clean_score not in CLEAN_SCORES:
        raise ValueError(f"clean_score must be one of {CLEAN_SCORES}, got {clean_score!r}")
    if convention != "ttame" and keep not in (None, 100):
        raise ValueError(f"keep applies to convention='ttame' only (the {convention} convention uses the whole map)")
    scalar = keep is not None and not isinstance(keep, (list, tuple, torch.Tensor))
    keeps = [100] if convention != "ttame" else [keep] if scalar else list(TTAME_KEEP if keep is None else keep)
    if any(not 0 < float(k) <= 100 for k in keeps):
        raise ValueError(f"keep must be percentages in (0, 100], got {keeps}")
    b, c, h, w = images.shape
    m = explanation_maps(maps.to(images.dtype), (h, w), convention)
    # (keep, image) inputs, built per chunk
    qs = [(100 - float(k)) / 100 for k in keeps]
    chunk = chunk_size(model, images, batch_size, memory_budget)
    n = len(qs) * b
    src = torch.arange(n, device=images.device) % b
    masks = torch.stack([quantile_mask(m, q) for q in qs]).reshape(n, h, w)

    def build(s, e):
        return explanation_images(images[src[s:e]], masks[s:e], convention, mean, std, model)

    if convention != "vitcam":
        resolve_norm(model, images, mean, std, f"average_drop_increase(convention={convention!r})")
    with eval_mode(model):
        probs0 = clean_probs(model, images, chunk)
        tg = resolve_metric_targets(targets, probs0, "average_drop_increase")
        o = score_perturbed(model, n, build, tg[src], chunk).reshape(len(qs), b).t()
    y = clean_reference(probs0, tg, clean_score)
    drop, inc = drop_increase(y[:, None], o)
    out = {"prob": y, "targets": tg, "prediction": probs0.argmax(-1)}
    if convention == "ttame" and not scalar:
        out.update(average_drop=drop, increase_in_confidence=inc, explanation_prob=o,
                   keep=torch.tensor([float(k) for k in keeps]))
    else:
        out.update(average_drop=drop[:, 0], increase_in_confidence=inc[:, 0], explanation_prob=o[:, 0])
    return out
