"""Insertion / deletion AUC (Petsiuk et al. 2018; openvino_xai `InsertionDeletionAUC`). See docs/metrics.md
§7.

Pixels of the image-resolution map are ranked by a stable descending sort (ties keep raster order). With S steps,
n_i = int(i * H * W / S) for i = 0..S. Deletion replaces the top n_i pixels of x by the baseline; insertion copies
the top n_i pixels of x onto the baseline image. s_i is the softmax probability of the target and
AUC = (sum_i s_i - (s_0 + s_S) / 2) / S (trapezoid on [0, 1]).

convention="vitcam" reproduces ViT-ReciproCAM's `dauc_iauc` for compatibility only (not comparable with the above):
(H/32) x (W/32) cells, one per step, ranked by the raw h x w map; see `vitcam_dauc_iauc`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitx_fast.metrics._common import (
    check_inputs,
    chunk_size,
    clean_probs,
    eval_mode,
    prepare_maps,
    resolve_metric_targets,
    resolve_norm,
    score_perturbed,
)

BASELINES = ("black", "mean", "blur")


def rise_blur_kernel(klen: int = 11, nsig: float = 5.0) -> torch.Tensor:
    """RISE's `gkern(klen, nsig)`: scipy.ndimage.gaussian_filter of a centred unit impulse on a klen x klen grid
    (mode "reflect", truncate 4). Returns (klen, klen) float64."""
    from scipy.ndimage import gaussian_filter

    inp = torch.zeros(klen, klen, dtype=torch.float64).numpy()
    inp[klen // 2, klen // 2] = 1
    return torch.from_numpy(gaussian_filter(inp, nsig))


def baseline_images(images: torch.Tensor, baseline: str, mean=None, std=None, model=None) -> torch.Tensor:
    """The canvas that deleted pixels take and insertion starts from, (B, C, H, W) in normalised space.

    black: 0 in [0, 1] pixel space, i.e. -mean/std (openvino_xai fills the raw image with 0); mean: 0 in normalised
    space (the dataset-mean colour); blur: RISE's blur of the normalised image (11 x 11 `gkern(11, 5)`, zero padding).
    """
    if baseline == "black":
        mu, sd = resolve_norm(model, images, mean, std, "insertion_deletion(baseline='black')")
        return ((0 - mu) / sd).expand_as(images).clone()
    if baseline == "mean":
        return torch.zeros_like(images)
    if baseline == "blur":
        k = rise_blur_kernel().to(images.dtype).to(images.device)
        c = images.shape[1]
        return F.conv2d(images, k.expand(c, 1, *k.shape), padding=k.shape[-1] // 2, groups=c)
    raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")


def step_counts(hw: int, steps: int) -> list[int]:
    """n_i = int(i * hw / steps), i = 0..steps."""
    return [int(i * hw / steps) for i in range(steps + 1)]


def trapezoid_auc(curve: torch.Tensor) -> torch.Tensor:
    """(..., S + 1) scores at equally spaced points of [0, 1] -> (...,) (sum - (first + last) / 2) / S."""
    s = curve.shape[-1] - 1
    return (curve.sum(-1) - (curve[..., 0] + curve[..., -1]) / 2) / s


@torch.no_grad()
def insertion_deletion(model, images: torch.Tensor, maps: torch.Tensor, targets=None, steps: int = 30, *,
                       baseline: str = "black", mean=None, std=None, convention: str = "petsiuk",
                       batch_size: int | None = None, memory_budget: int | None = None) -> dict:
    """Insertion and deletion AUC per image.

    model: classifier on normalised images (B, C, H, W) -> logits. maps: (B, h, w) raw; upsampled bilinearly to
    H x W, then min-max (only the ranking matters). targets: scored class (None: the clean top-1). steps: S (default
    30, openvino_xai's). baseline: "black" (default; needs mean/std, or a timm model's pretrained_cfg), "mean" or
    "blur" (see `baseline_images`).

    Returns: "insertion" (B,) (higher is better), "deletion" (B,) (lower is better), "delta" (B,) = insertion -
    deletion, "insertion_curve" / "deletion_curve" (B, S + 1), "counts" (S + 1,) pixels inserted/deleted per step,
    "targets", "prob", "prediction" (B,). Deletion at step 0 and insertion at step S are the clean image, and
    insertion at step 0 equals deletion at step S (the baseline); each is scored once.
    convention: "petsiuk" (default, above) or "vitcam" (`vitcam_dauc_iauc`; steps and baseline do not apply).
    """
    if convention == "vitcam":
        return vitcam_dauc_iauc(model, images, maps, targets, batch_size=batch_size, memory_budget=memory_budget)
    if convention != "petsiuk":
        raise ValueError(f"convention must be 'petsiuk' or 'vitcam', got {convention!r}")
    maps = check_inputs(images, maps, "insertion_deletion")
    if steps < 1:
        raise ValueError(f"insertion_deletion: steps must be >= 1, got {steps}")
    b, c, h, w = images.shape
    base = baseline_images(images, baseline, mean, std, model)
    m01 = prepare_maps(maps, (h, w), dtype=images.dtype)
    # rank of every pixel in the stable descending order: pixel is among the top n iff rank < n
    order = torch.sort(m01.reshape(b, h * w), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    rank = rank.reshape(b, 1, h, w)
    counts = step_counts(h * w, steps)
    inner = counts[1:-1]  # steps 1..S-1 differ between the curves; 0 and S are the clean and baseline images
    n_inner = len(inner) * b
    n = 2 * n_inner + b  # (curve, step, image) for the inner steps, then the B baseline images
    src = torch.arange(n, device=images.device) % b
    kk = torch.zeros(n, dtype=torch.long, device=images.device)  # pixels inserted / deleted, per input
    kk[:2 * n_inner] = torch.tensor(inner, dtype=torch.long, device=images.device).repeat_interleave(b).repeat(2)
    is_del = torch.arange(n, device=images.device) < n_inner
    chunk = chunk_size(model, images, batch_size, memory_budget)

    def build(s, e):
        idx = src[s:e]
        top = rank[idx] < kk[s:e, None, None, None]
        # deletion: the baseline on the top pixels; insertion (and the k = 0 baseline inputs): x on the top pixels
        return torch.where(top == is_del[s:e, None, None, None], base[idx], images[idx])

    with eval_mode(model):
        probs0 = clean_probs(model, images, chunk)
        tg = resolve_metric_targets(targets, probs0, "insertion_deletion")
        probs = score_perturbed(model, n, build, tg[src], chunk)
    p0 = probs0.gather(1, tg[:, None])[:, 0]
    p_base = probs[2 * n_inner:]
    mid = probs[:2 * n_inner].reshape(2, len(inner), b)
    deletion = torch.cat([p0[:, None], mid[0].t(), p_base[:, None]], dim=1)
    insertion = torch.cat([p_base[:, None], mid[1].t(), p0[:, None]], dim=1)
    ins, dele = trapezoid_auc(insertion), trapezoid_auc(deletion)
    return {"insertion": ins, "deletion": dele, "delta": ins - dele, "insertion_curve": insertion,
            "deletion_curve": deletion, "counts": torch.tensor(counts), "targets": tg, "prob": p0,
            "prediction": probs0.argmax(-1)}



def vitcam_cell_masks(maps: torch.Tensor, size) -> torch.Tensor:
    """Cumulative removal masks of vitcam's `dauc_iauc`: (B, n, H, W) bool, step j = the first j + 1 ranked cells.

    maps: (B, h, w) raw token maps. The image is cut into (H/32) x (W/32) cells (7 x 7 at 224) of dy x dx pixels;
    entry s of the flattened map, in descending order (torch.sort), addresses cell (s // wc, s % wc), and the cell
    covers rows s_y .. min(s_y + dy, H - 1) inclusive (so neighbouring cells overlap by one pixel). Only the first
    n = hc * wc ranked entries are used; entries s >= n address rows below the image and change nothing.
    """
    b = maps.shape[0]
    hgt, wid = size
    hc, wc = int(hgt / 32), int(wid / 32)
    dx, dy = int(wid / wc), int(hgt / hc)
    n = hc * wc
    order = maps.reshape(b, -1).sort(dim=1, descending=True).indices[:, :n]  # (B, n)
    ci, cj = order // wc, order % wc
    ys, xs = ci * dy, cj * dx
    ye = torch.clamp((ci + 1) * dy, max=hgt - 1)
    xe = torch.clamp((cj + 1) * dx, max=wid - 1)
    rows = torch.arange(hgt, device=maps.device)
    cols = torch.arange(wid, device=maps.device)
    in_r = (rows >= ys[..., None]) & (rows <= ye[..., None])  # (B, n, H)
    in_c = (cols >= xs[..., None]) & (cols <= xe[..., None])  # (B, n, W)
    cells = in_r[..., :, None] & in_c[..., None, :]
    return cells.cummax(dim=1).values


def _unit_trapezoid_mean(curve):
    """sklearn.metrics.auc(arange(n), y) / n: unit-spaced trapezoid divided by the number of points."""
    return (curve[:, 1:] + curve[:, :-1]).sum(1) / 2 / curve.shape[1]


@torch.no_grad()
def vitcam_dauc_iauc(model, images: torch.Tensor, maps: torch.Tensor, targets=None, *, batch_size: int | None = None,
                     memory_budget: int | None = None) -> dict:
    """ViT-ReciproCAM's `dauc_iauc` (compat; `src/vit_recipro_cam_metric.py`), per image.

    maps: (B, h, w) raw token maps (vitcam ranks the 196-entry 14 x 14 map). Deletion multiplies the normalised image
    by the cumulative cell mask (0 in normalised space); insertion starts from the per-channel mean of the normalised
    image and copies the cells in. Curves: deletion [p(x), after 1, .., after n], insertion [after 1, .., after n,
    p(x)], n = (H/32)(W/32). AUC = unit-spacing trapezoid / (n + 1); the paper's table is 100 x the mean.
    targets: the ground-truth labels in the protocol (None: the clean top-1).

    Returns "insertion", "deletion", "delta" (B,), "insertion_curve" / "deletion_curve" (B, n + 1), "targets",
    "prob", "prediction".
    """
    maps = check_inputs(images, maps, "insertion_deletion(convention='vitcam')")
    b, c, hgt, wid = images.shape
    if hgt < 32 or wid < 32:
        raise ValueError(f"the vitcam protocol cuts the image into 32-pixel cells; got {hgt} x {wid}")
    cum = vitcam_cell_masks(maps, (hgt, wid))  # (B, n, H, W)
    n = cum.shape[1]
    base = images.mean(dim=(2, 3), keepdim=True)
    src = torch.arange(2 * n * b, device=images.device) // n % b  # input j: (curve, image, step)
    step = torch.arange(2 * n * b, device=images.device) % n
    chunk = chunk_size(model, images, batch_size, memory_budget)

    def build(s, e):
        idx, st = src[s:e], step[s:e]
        m = cum[idx, st][:, None].to(images.dtype)
        x = images[idx]
        deletion = (torch.arange(s, e, device=images.device) < n * b)[:, None, None, None]
        return torch.where(deletion, x * (1 - m), base[idx] * (1 - m) + x * m)

    with eval_mode(model):
        probs0 = clean_probs(model, images, chunk)
        tg = resolve_metric_targets(targets, probs0, "insertion_deletion(convention='vitcam')")
        probs = score_perturbed(model, 2 * n * b, build, tg[src], chunk).reshape(2, b, n)
    p0 = probs0.gather(1, tg[:, None])[:, 0]
    deletion = torch.cat([p0[:, None], probs[0]], dim=1)
    insertion = torch.cat([probs[1], p0[:, None]], dim=1)
    ins, dele = _unit_trapezoid_mean(insertion), _unit_trapezoid_mean(deletion)
    return {"insertion": ins, "deletion": dele, "delta": ins - dele, "insertion_curve": insertion,
            "deletion_curve": deletion, "targets": tg, "prob": p0, "prediction": probs0.argmax(-1)}
