"""Gradient Attention Rollout (jacobgil/vit-explain `vit_grad_rollout.py`; compat only), specs/rollout_lrp.md §1.2.

Per block: F = max(mean_h(A * dA), 0) (clamp after the head mean); discard the int(T*T*ratio) smallest entries of F
(index 0 NOT protected); a = (F + I) / 2; renormalise; R = a^{L-1} ... a^0; map = R[0, P:].

Reference quirks, each behind an option:
- `pairing="jacobgil"`: vit-explain zips forward-ordered attentions with backward-ordered gradients, pairing block l
  with the gradient of block L-1-l (vit-explain issue #6). `"correct"` pairs each block with its own gradient.
- `renorm="jacobgil"`: `a / a.sum(-1)` without keepdim divides a[i, j] by row j's sum (vit-explain issue #16).
- `grad_wrt="logits"`: vit-explain takes `grad_input[0]` of a legacy `register_backward_hook` on timm's `attn_drop`.
  In eval mode (and for p = 0) dropout returns its input tensor itself, so the hook lands on the softmax's backward
  node and captures d y / d S for the scaled pre-softmax scores S, not d y / d A. `"probs"` (default) is the d y / d A
  of the spec; `"logits"` reproduces what vit-explain actually computes on timm models.
"""
from __future__ import annotations

import torch

from vitx_fast.methods.base import Method, MethodResult
from vitx_fast.methods.gae import attention_grads
from vitx_fast.methods.registry import register_method
from vitx_fast.methods.rollout import discard_smallest, fuse_heads


@register_method
class GradRollout(Method):
    name = "grad_rollout"
    summary = "Gradient Attention Rollout (jacobgil/vit-explain; compatibility baseline)"
    options = {"discard_ratio": 0.9, "pairing": "correct", "renorm": "jacobgil", "grad_wrt": "probs"}
    choices = {"pairing": ("correct", "jacobgil"), "renorm": ("jacobgil", "row"), "grad_wrt": ("probs", "logits")}
    # vit-explain's `VITAttentionGradRollout` exactly, bugs included
    presets = {"jacobgil": {"discard_ratio": 0.9, "pairing": "jacobgil", "renorm": "jacobgil", "grad_wrt": "logits"}}

    def validate_options(self, opts):
        r = opts["discard_ratio"]
        if isinstance(r, bool) or not (isinstance(r, (int, float)) and 0.0 <= float(r) < 1.0):
            raise ValueError(f"grad_rollout: discard_ratio must be in [0, 1), got {r!r}")

    def refusals(self, adapter, opts):
        return super().refusals(adapter, opts) + self.require_class_token(adapter)


def grad_rollout_matrix(attns: list[torch.Tensor], grads: list[torch.Tensor], discard_ratio: float, renorm: str
                        ) -> torch.Tensor:
    """attns, grads: L x (B, H, T, T), already paired -> joint (B, T, T) = a^{L-1} ... a^0."""
    B, _, T, _ = attns[0].shape
    eye = torch.eye(T, dtype=attns[0].dtype, device=attns[0].device)
    result = eye.expand(B, T, T)
    for a, g in zip(attns, grads):
        fused = fuse_heads(a * g, "mean").clamp(min=0)
        fused = discard_smallest(fused, discard_ratio, protect_first=False)
        m = (fused + eye) / 2
        if renorm == "row":
            m = m / m.sum(dim=-1, keepdim=True)
        else:  # vit-explain's broadcast: a[i, j] / sum_k a[j, k]
            m = m / m.sum(dim=-1).unsqueeze(-2)
        result = m @ result
    return result


@GradRollout.instance.register("reference")
def grad_rollout_reference(adapter, images, targets, opts) -> MethodResult:
    rec, grads = attention_grads(adapter, images, targets, wrt=opts["grad_wrt"])
    attns = [b.attn.probs.detach() for b in rec.blocks]
    if opts["pairing"] == "jacobgil":
        grads = grads[::-1]  # block l gets the gradient of block L-1-l
    joint = grad_rollout_matrix(attns, grads, float(opts["discard_ratio"]), opts["renorm"])
    P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    return MethodResult(maps=joint[:, 0, P:].reshape(-1, h, w))
