"""Attention Rollout fast path (docs/methods/rollout.md §5): head-fused matrices per block, then a row-vector chain
from the top block down (L GEMVs instead of L T^3 products); never holds more than one block's per-head attention."""
from __future__ import annotations

import torch

from vitx_fast.engine.chains import row_chain
from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.methods.rollout.reference import rollout_step


class RolloutFast(Implementation):
    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        with torch.no_grad():
            x = adapter.embed(images)
            mats = []
            for i in range(adapter.depth):
                rec = adapter.block(i, x)
                mats.append(rollout_step(rec.attn.probs, opts["head_fusion"], float(opts["discard_ratio"]),
                                         opts["renorm"]))
                x = rec.z
            logits = adapter.head(x) if adapter.has_head else None
            r = row_chain(mats)  # e0^T a^{L-1} ... a^0
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        maps = r[:, P:].reshape(-1, h, w)
        targets = resolve(logits)
        if targets.dim() == 2:
            maps = maps.unsqueeze(1).expand(-1, targets.shape[1], h, w).contiguous()
        return MethodResult(maps=maps, targets=targets, logits=logits)
