"""Attention Rollout, reference path (docs/methods/rollout.md §1): the full (T, T) product over blocks.

    a^l = renorm((discard(fuse_h(A^l)) + I) / 2);   R = a^{L-1} ... a^0;   map = R[0, P:]
"""
from __future__ import annotations

import torch

from vitx_fast.engine.chains import identity_mix, matrix_chain
from vitx_fast.methods.base import MethodResult, ReferenceImplementation


def fuse_heads(attn: torch.Tensor, how: str) -> torch.Tensor:
    """attn: (B, H, T, T) -> (B, T, T)."""
    if how == "mean":
        return attn.mean(dim=1)
    if how == "max":
        return attn.amax(dim=1)
    return attn.amin(dim=1)


def discard_smallest(fused: torch.Tensor, ratio: float, protect_first: bool = True) -> torch.Tensor:
    """Zero the int(T*T*ratio) smallest entries of each (T, T) matrix (torch.topk order), keeping flat index 0
    when `protect_first` (vit-explain's rollout protects only (CLS, CLS)). fused: (B, T, T)."""
    if ratio <= 0:
        return fused
    B, T, _ = fused.shape
    flat = fused.reshape(B, T * T).clone()
    k = int(T * T * ratio)
    for b in range(B):  # per image, as vit-explain's flat[0, ...] but indexed per sample
        _, idx = flat[b].topk(k, -1, largest=False)
        if protect_first:
            idx = idx[idx != 0]
        flat[b, idx] = 0
    return flat.view(B, T, T)


def rollout_step(attn: torch.Tensor, head_fusion: str, discard_ratio: float, renorm: str) -> torch.Tensor:
    """One block's rollout matrix from its probabilities (B, H, T, T) -> (B, T, T)."""
    return identity_mix(discard_smallest(fuse_heads(attn, head_fusion), discard_ratio), renorm)


def rollout_matrices(attentions: list[torch.Tensor], head_fusion: str, discard_ratio: float, renorm: str
                     ) -> torch.Tensor:
    """attentions: L x (B, H, T, T) post-softmax, block order -> joint (B, T, T) = a^{L-1} ... a^0."""
    return matrix_chain([rollout_step(a, head_fusion, discard_ratio, renorm) for a in attentions])


class RolloutReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        with torch.no_grad():
            rec = adapter.forward(images)
        joint = rollout_matrices([b.attn.probs for b in rec.blocks], opts["head_fusion"],
                                 float(opts["discard_ratio"]), opts["renorm"])
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        return MethodResult(maps=joint[:, 0, P:].reshape(-1, h, w))
