"""T-TAME reference path (docs/methods/tame.md §1): norm1 outputs from the instrumented forward, the authors' NCHW
attention mechanism with BatchNorm in eval mode, the full fuser."""
from __future__ import annotations

import copy

import torch

from vitx_fast.methods.base import MethodResult, ReferenceImplementation
from vitx_fast.methods.tame.checkpoint import resolve_explainer
from vitx_fast.methods.tame.module import reference_features


def select_classes(c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """c: (B, C, h, w); targets (B,) -> (B, h, w), (B, K) -> (B, K, h, w)."""
    if targets.dim() == 1:
        return c[torch.arange(c.shape[0], device=c.device), targets]
    return c.gather(1, targets[:, :, None, None].expand(-1, -1, *c.shape[-2:]))


class TTAMEReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        ex = resolve_explainer(opts["explainer"])
        ex = copy.deepcopy(ex).to(device=images.device, dtype=images.dtype).eval()  # the caller's copy keeps its mode
        grid = adapter.grid_for(*images.shape[-2:])
        with torch.no_grad():
            feats, _ = reference_features(adapter, images, ex.layers)
            _, c = ex(feats, grid)
        return MethodResult(maps=select_classes(c, targets))
