"""T-TAME fast path (docs/methods/tame.md §5): one native backbone pass for features and logits, eval BatchNorm
folded into the branch weights, and only the requested fuser rows (all of them for target="all")."""
from __future__ import annotations

import torch

from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.methods.tame.checkpoint import resolve_explainer
from vitx_fast.methods.tame.module import capture_features, fast_scores


class TTAMEFast(Implementation):
    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        ex = resolve_explainer(opts["explainer"])
        grid = adapter.grid_for(*images.shape[-2:])
        with torch.no_grad():
            feats, logits = capture_features(adapter, images, ex.layers)
            targets = resolve(logits)
            rows = targets[:, None] if targets.dim() == 1 else targets  # target="all" -> the full fuser GEMM
            maps = fast_scores(ex.attn_mech, feats, adapter.num_prefix_tokens, grid, rows)
        if targets.dim() == 1:
            maps = maps[:, 0]
        return MethodResult(maps=maps, targets=targets, logits=logits)
