"""Chefer LRP reference path (docs/methods/lrp.md §1): relevance by the rules of `rules.py`, attention gradients by
autograd, and the (T, T) chain C = (I + Abar^{L-1}) ... (I + Abar^s), Abar^l = mean_h(max(dA^l * R_A^l, 0));
map = C[0, P:] (no row normalisation).
"""
from __future__ import annotations

import torch

from vitx_fast.engine.chains import matrix_chain
from vitx_fast.methods.base import MethodResult, ReferenceImplementation
from vitx_fast.methods.gae.reference import attention_grads
from vitx_fast.methods.lrp.rules import check_precision, chefer_relprop


class LRPReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        check_precision(adapter)
        s = int(opts["start_layer"])
        if not 0 <= s < adapter.depth:
            raise ValueError(f"lrp: start_layer={s} must be in [0, {adapter.depth})")
        rec, grads = attention_grads(adapter, images, targets)
        cams, sums = chefer_relprop(adapter, rec.detached(), targets, s)
        T = grads[0].shape[-1]
        eye = torch.eye(T, dtype=grads[0].dtype, device=grads[0].device)
        # relu before the head mean
        C = matrix_chain([(grads[i] * cams[i]).clamp(min=0).mean(dim=1) + eye for i in range(s, adapter.depth)])
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        return MethodResult(maps=C[:, 0, P:].reshape(-1, h, w), extras={"relevance_sums": sums})
