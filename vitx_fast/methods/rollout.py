"""Attention Rollout (Abnar & Zuidema; jacobgil/vit-explain semantics), specs/rollout_lrp.md §1."""
from __future__ import annotations

import torch

from vitx_fast.methods.base import Method, MethodResult
from vitx_fast.methods.registry import register_method


@register_method
class Rollout(Method):
    name = "rollout"
    summary = "Attention Rollout: product of head-fused, identity-mixed attention matrices (class-agnostic)"
    options = {"head_fusion": "mean", "discard_ratio": 0.0, "renorm": "row"}
    choices = {"head_fusion": ("mean", "max", "min"), "renorm": ("row", "jacobgil")}
    # vit-explain's settings as presets
    presets = {
        "jacobgil": {"head_fusion": "mean", "discard_ratio": 0.9, "renorm": "jacobgil"},
        "jacobgil_cli": {"head_fusion": "max", "discard_ratio": 0.9, "renorm": "jacobgil"},
    }
    class_agnostic = True

    def validate_options(self, opts):
        r = opts["discard_ratio"]
        if not (isinstance(r, (int, float)) and 0.0 <= float(r) < 1.0):
            raise ValueError(f"rollout: discard_ratio must be in [0, 1), got {r!r}")

    def refusals(self, adapter, opts):
        return super().refusals(adapter, opts) + self.require_class_token(adapter)


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


def rollout_matrices(attentions: list[torch.Tensor], head_fusion: str, discard_ratio: float, renorm: str) -> torch.Tensor:
    """attentions: L x (B, H, T, T) post-softmax, block order -> joint (B, T, T) = a^{L-1} ... a^0."""
    B, _, T, _ = attentions[0].shape
    eye = torch.eye(T, dtype=attentions[0].dtype, device=attentions[0].device)
    result = eye.expand(B, T, T)
    for attn in attentions:
        fused = discard_smallest(fuse_heads(attn, head_fusion), discard_ratio)
        a = (fused + eye) / 2
        if renorm == "row":
            a = a / a.sum(dim=-1, keepdim=True)
        else:  # vit-explain: a / a.sum(dim=-1) broadcasts the row sums over columns (vit-explain issue #16)
            a = a / a.sum(dim=-1).unsqueeze(-2)
        result = a @ result
    return result


@Rollout.instance.register("reference")
def rollout_reference(adapter, images, targets, opts) -> MethodResult:
    with torch.no_grad():
        rec = adapter.forward(images)
    joint = rollout_matrices([b.attn.probs for b in rec.blocks], opts["head_fusion"], float(opts["discard_ratio"]),
                             opts["renorm"])
    P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    maps = joint[:, 0, P:].reshape(-1, h, w)
    return MethodResult(maps=maps)
