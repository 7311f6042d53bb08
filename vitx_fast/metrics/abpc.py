"""ABPC, area between perturbation curves (AGCAM protocol, `ABPC.py`). See docs/metrics.md §3.

For frac = i / (steps - 1), k = int(H * W * frac) map pixels are removed: MoRF the top-k of `topk(map + 1, k)`,
LeRF the top-k of `topk(-map - 1, k)` (ties as torch.topk resolves them, one topk call per step as the reference
does). Removal multiplies the *normalised* image by a 0/1 mask shared by the channels, so a removed pixel becomes 0
in normalised space (the mean colour). The score is the softmax probability of the target (the ground-truth label
in the AGCAM protocol), AUC is the plain mean over the steps, ABPC = AUC_LeRF - AUC_MoRF.
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
    score_perturbed,
)


def abpc_keep_masks(maps01: torch.Tensor, steps: int = 11) -> torch.Tensor:
    """(B, H, W) [0, 1] maps -> keep masks (2, steps, B, H * W) bool: [0] MoRF, [1] LeRF; step i removes
    k = int(H * W * (i / (steps - 1))) pixels."""
    b, h, w = maps01.shape
    flat = maps01.reshape(b, h * w)
    keys = (flat + 1.0, flat * -1.0 - 1.0)  # the reference's exact expressions (they decide ties and rounding)
    keep = torch.ones(2, steps, b, h * w, dtype=torch.bool, device=maps01.device)
    for i in range(steps):
        k = int(h * w * (i / (steps - 1)))
        if k == 0:
            continue
        for o, key in enumerate(keys):
            idx = torch.topk(key, k, dim=1).indices
            keep[o, i].scatter_(1, idx, False)
    return keep


@torch.no_grad()
def abpc(model, images: torch.Tensor, maps: torch.Tensor, targets=None, steps: int = 11, *,
         batch_size: int | None = None, memory_budget: int | None = None) -> dict:
    """Area between the LeRF and MoRF perturbation curves, per image.

    model: classifier on normalised images (B, C, H, W) -> logits. maps: (B, h, w) raw; upsampled bilinearly to
    H x W, then min-max. targets: the explained class (the AGCAM protocol passes the ground-truth label on every
    image, misclassified ones included); None uses the clean top-1. steps: number of fractions 0, 1/(steps-1), .., 1.

    Returns: "abpc" (B,) = auc_lerf - auc_morf (higher is better), "auc_morf" (B,), "auc_lerf" (B,) (plain means
    over the steps), "morf_curve" / "lerf_curve" (B, steps) probabilities, "fractions" (steps,), "targets" (B,),
    "prob" (B,) and "prediction" (B,) of the clean image. The table value is the mean of "abpc" over images.
    The first and last steps are the clean and the fully removed image on both curves; each is scored once.
    """
    maps = check_inputs(images, maps, "abpc")
    if steps < 2:
        raise ValueError(f"abpc: steps must be >= 2, got {steps}")
    b, c, h, w = images.shape
    m01 = prepare_maps(maps, (h, w), dtype=images.dtype)
    keep = abpc_keep_masks(m01, steps)[:, 1:-1]  # (2, steps - 2, B, HW): the steps that differ between curves
    inner = keep.shape[1]
    n = 2 * inner * b
    flat_keep = keep.reshape(n, 1, h, w)
    src = torch.arange(n + b, device=images.device) % b  # input j < n: (order, step, image); then B removed images
    chunk = chunk_size(model, images, batch_size, memory_budget)
    with eval_mode(model):
        probs0 = clean_probs(model, images, chunk)
        tg = resolve_metric_targets(targets, probs0, "abpc")

        def build(s, e):
            x = images[src[s:e]].clone()
            k = min(e, n) - s
            if k > 0:
                x[:k] *= flat_keep[s:s + k].to(images.dtype)
            x[max(k, 0):] = 0  # frac = 1: every pixel removed
            return x

        probs = score_perturbed(model, n + b, build, tg[src], chunk)
    p0 = probs0.gather(1, tg[:, None])[:, 0]
    p_all = probs[n:]
    mid = probs[:n].reshape(2, inner, b)
    morf = torch.cat([p0[:, None], mid[0].t(), p_all[:, None]], dim=1)
    lerf = torch.cat([p0[:, None], mid[1].t(), p_all[:, None]], dim=1)
    auc_morf, auc_lerf = morf.mean(1), lerf.mean(1)
    return {"abpc": auc_lerf - auc_morf, "auc_morf": auc_morf, "auc_lerf": auc_lerf, "morf_curve": morf,
            "lerf_curve": lerf, "fractions": torch.tensor([i / (steps - 1) for i in range(steps)]), "targets": tg,
            "prob": p0, "prediction": probs0.argmax(-1)}
