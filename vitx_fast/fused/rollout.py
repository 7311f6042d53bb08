"""Attention Rollout fast path (specs/rollout_lrp.md §1.3): head-fused matrices per block, then a row-vector chain
from the top block down (L GEMVs instead of L T^3 products); never holds more than one block's per-head attention."""
from __future__ import annotations

import torch

from vitx_fast.methods.base import MethodResult
from vitx_fast.methods.rollout import Rollout, discard_smallest, fuse_heads


@Rollout.instance.register("fused", resolves_targets=True)
def rollout_fused(adapter, images, resolve, opts) -> MethodResult:
    with torch.no_grad():
        x = adapter.embed(images)
        T = x.shape[1]
        eye = torch.eye(T, dtype=x.dtype, device=x.device)
        mats = []
        for i in range(adapter.depth):
            rec = adapter.block(i, x)
            a = (discard_smallest(fuse_heads(rec.attn.probs, opts["head_fusion"]), float(opts["discard_ratio"]))
                 + eye) / 2
            # "row" renormalises rows; vit-explain's broadcast divides column j by row j's sum
            a = a / (a.sum(-1, keepdim=True) if opts["renorm"] == "row" else a.sum(-1).unsqueeze(-2))
            mats.append(a)
            x = rec.z
        logits = adapter.head(x) if adapter.has_head else None
        r = torch.zeros(x.shape[0], 1, T, dtype=x.dtype, device=x.device)
        r[:, 0, 0] = 1
        for a in reversed(mats):  # e0^T a^{L-1} ... a^0
            r = torch.bmm(r, a)
    P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    maps = r[:, 0, P:].reshape(-1, h, w)
    targets = resolve(logits)
    if targets.dim() == 2:
        maps = maps.unsqueeze(1).expand(-1, targets.shape[1], h, w).contiguous()
    return MethodResult(maps=maps, targets=targets, logits=logits)
