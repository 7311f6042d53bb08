"""Gradient Attention Rollout, reference path (docs/methods/grad_rollout.md §1): jacobgil/vit-explain's
`vit_grad_rollout.py`, a compatibility baseline.

Per block: F = max(mean_h(A * dA), 0) (clamp after the head mean); discard the int(T*T*ratio) smallest entries of F
(index 0 NOT protected); a = (F + I) / 2; renormalise; R = a^{L-1} ... a^0; map = R[0, P:].

Reference quirks, each behind an option:
- `pairing="jacobgil"`: vit-explain zips forward-ordered attentions with backward-ordered gradients, pairing block l
  with the gradient of block L-1-l (vit-explain issue #6). `"correct"` pairs each block with its own gradient.
- `renorm="jacobgil"`: `a / a.sum(-1)` without keepdim divides a[i, j] by row j's sum (vit-explain issue #16).
- `grad_wrt="logits"`: vit-explain takes `grad_input[0]` of a legacy `register_backward_hook` on timm's `attn_drop`.
  In eval mode (and for p = 0) dropout returns its input tensor itself, so the hook lands on the softmax's backward
  node and captures d y / d S for the scaled pre-softmax scores S, not d y / d A. `"probs"` (default) is the d y / d A
  of the method's definition; `"logits"` reproduces what vit-explain actually computes on timm models.
"""
from __future__ import annotations

import torch

from vitx_fast.engine.chains import identity_mix, matrix_chain
from vitx_fast.methods.base import MethodResult, ReferenceImplementation
from vitx_fast.methods.gae.reference import attention_grads
from vitx_fast.methods.rollout.reference import discard_smallest, fuse_heads


def grad_rollout_matrix(attns: list[torch.Tensor], grads: list[torch.Tensor], discard_ratio: float, renorm: str
                        ) -> torch.Tensor:
    """attns, grads: L x (B, H, T, T), already paired -> joint (B, T, T) = a^{L-1} ... a^0."""
    mats = []
    for a, g in zip(attns, grads, strict=True):
        fused = fuse_heads(a * g, "mean").clamp(min=0)
        mats.append(identity_mix(discard_smallest(fused, discard_ratio, protect_first=False), renorm))
    return matrix_chain(mats)


class GradRolloutReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        rec, grads = attention_grads(adapter, images, targets, wrt=opts["grad_wrt"])
        attns = [b.attn.probs.detach() for b in rec.blocks]
        if opts["pairing"] == "jacobgil":
            grads = grads[::-1]  # block l gets the gradient of block L-1-l
        joint = grad_rollout_matrix(attns, grads, float(opts["discard_ratio"]), opts["renorm"])
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        return MethodResult(maps=joint[:, 0, P:].reshape(-1, h, w))
