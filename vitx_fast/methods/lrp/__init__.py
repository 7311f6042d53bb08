"""Chefer et al. CVPR'21 Transformer attribution ("LRP"): docs/methods/lrp.md."""
from __future__ import annotations

import torch.nn as nn

from vitx_fast.methods.base import Method
from vitx_fast.methods.lrp.fast import LRPFast
from vitx_fast.methods.lrp.reference import LRPReference
from vitx_fast.methods.lrp.rules import precision_reasons
from vitx_fast.methods.registry import register_method


@register_method
class CheferLRP(Method):
    name = "lrp"
    summary = "Transformer attribution: LRP relevance x attention gradient, rolled out (Chefer et al., CVPR'21)"
    options = {"start_layer": 0}

    def validate_options(self, opts):
        s = opts["start_layer"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"lrp: start_layer must be an int >= 0, got {s!r}")

    def make_implementations(self):
        return {"reference": LRPReference(), "fast": LRPFast()}

    def not_supported_reasons(self, adapter, opts):
        from timm.layers import Mlp

        reasons = (super().not_supported_reasons(adapter, opts) + self.requires_class_token(adapter)
                   + precision_reasons(adapter))
        m = adapter.model
        if opts["start_layer"] >= adapter.depth:
            reasons.append(f"start_layer={opts['start_layer']} is out of range for a model with {adapter.depth} blocks")
        if not adapter.distilled and adapter.global_pool != "token":
            reasons.append(f"the relevance rules are defined for class-token pooling (IndexSelect); the model uses "
                           f"global_pool={adapter.global_pool!r}")
        if not adapter.attention_is_plain:
            reasons.append("the attention is not plain proj(softmax(qk^T) v): an attention output norm (scale_norm) or "
                           "a gate has no relevance rule")
        for i, blk in enumerate(m.blocks):
            if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.fc1, nn.Linear):
                reasons.append(f"blocks[{i}].mlp is {type(blk.mlp).__name__}: only timm's Mlp (fc1, act, fc2 Linear "
                               "layers) has relevance rules (no GLU / SwiGLU)")
                break
        heads = [m.head] + ([m.head_dist] if adapter.distilled else [])
        if adapter.has_head and not all(isinstance(h, nn.Linear) for h in heads):
            reasons.append("the classifier head is not a single Linear layer")
        return reasons
