"""AGCAM reference path (docs/methods/agcam.md §1).

map_c = Σ_l Σ_h ReLU(G^l_{h,0,P:}) ⊙ sigmoid(s^l_{h,0,P:}), with s^l the pre-softmax scaled CLS-row scores and
G^l = ∂y_c/∂A^l the gradient w.r.t. the post-softmax attention, taken with every attention input detached (the
authors' modified `Attention.forward` starts with `x = x.detach()`).
"""
from __future__ import annotations

import torch

from vitx_fast.methods.base import MethodResult, ReferenceImplementation
from vitx_fast.postprocess import normalize, upsample


def agcam_rows(adapter, images: torch.Tensor, targets: torch.Tensor, detach_attn_input: bool = True):
    """Per-layer CLS rows of the scores and of the attention gradient.

    images: (B, C, H, W); targets: (B,) long. Returns (scores, grads), each (B, L, H, T): s^l = pre-softmax scaled
    logits of query 0, G^l = ∂(Σ_b y_{b, c_b})/∂A^l[:, :, 0, :] (images are independent, so per-image G is unchanged).
    """
    # the probabilities become leaves: ∂y/∂A^l is all AGCAM needs, and it then works with frozen parameters too
    rec = adapter.forward(images, detach_attn_input=detach_attn_input,
                          probs_hook=lambda i, p: p.detach().requires_grad_(True))
    probs = [b.attn.probs for b in rec.blocks]
    y = rec.output.gather(1, targets.view(-1, 1).to(rec.output.device)).sum()
    grads = torch.autograd.grad(y, probs, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(probs, grads, strict=True)]
    scores = torch.stack([b.attn.logits[:, :, 0, :] for b in rec.blocks], dim=1).detach()
    grads = torch.stack([g[:, :, 0, :] for g in grads], dim=1)
    return scores, grads


def agcam_combine(scores: torch.Tensor, grads: torch.Tensor, P: int, grid: tuple[int, int], head_fusion: str,
                  layer_fusion: str) -> torch.Tensor:
    """scores, grads: (B, L, H, T) -> maps (B, h, w): fuse ReLU(G) * sigmoid(s) over heads, then layers."""
    cam = torch.relu(grads[..., P:]) * torch.sigmoid(scores[..., P:])  # (B, L, H, N)
    cam = cam.sum(dim=2) if head_fusion == "sum" else cam.mean(dim=2)
    cam = cam.sum(dim=1) if layer_fusion == "sum" else cam.mean(dim=1)
    return cam.reshape(cam.shape[0], *grid)


def agcam_postprocess(maps: torch.Tensor, opts) -> torch.Tensor:
    """Post-processing of raw maps (..., h, w) (docs/methods/agcam.md §2): optional bilinear resize, then optional
    min-max (eps 1e-12)."""
    if opts["upsample"] is not None:
        size = opts["upsample"] if isinstance(opts["upsample"], int) else tuple(opts["upsample"])
        maps = upsample(maps, size, mode="bilinear")
    if opts["normalize"] == "minmax":
        maps = normalize(maps, eps=1e-12)
    return maps


class AGCAMReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        with torch.enable_grad():
            scores, grads = agcam_rows(adapter, images, targets, detach_attn_input=True)
        grid = adapter.grid_for(*images.shape[-2:])
        maps = agcam_combine(scores, grads, adapter.num_prefix_tokens, grid, opts["head_fusion"],
                             opts["layer_fusion"])
        return MethodResult(maps=agcam_postprocess(maps.detach(), opts))
