"""Gradient Attention Rollout (jacobgil/vit-explain; compatibility baseline): docs/methods/grad_rollout.md."""
from __future__ import annotations

from vitx_fast.methods.base import Method
from vitx_fast.methods.grad_rollout.fast import GradRolloutFast
from vitx_fast.methods.grad_rollout.reference import GradRolloutReference
from vitx_fast.methods.registry import register_method


@register_method
class GradRollout(Method):
    name = "grad_rollout"
    summary = "Gradient Attention Rollout (jacobgil/vit-explain; compatibility baseline)"
    options = {"discard_ratio": 0.9, "pairing": "correct", "renorm": "jacobgil", "grad_wrt": "probs"}
    choices = {"pairing": ("correct", "jacobgil"), "renorm": ("jacobgil", "row"), "grad_wrt": ("probs", "logits")}
    # vit-explain's `VITAttentionGradRollout` exactly, bugs included
    presets = {"jacobgil": {"discard_ratio": 0.9, "pairing": "jacobgil", "renorm": "jacobgil", "grad_wrt": "logits"}}

    def make_implementations(self):
        return {"reference": GradRolloutReference(), "fast": GradRolloutFast()}

    def validate_options(self, opts):
        r = opts["discard_ratio"]
        if isinstance(r, bool) or not (isinstance(r, (int, float)) and 0.0 <= float(r) < 1.0):
            raise ValueError(f"grad_rollout: discard_ratio must be in [0, 1), got {r!r}")

    def not_supported_reasons(self, adapter, opts):
        return super().not_supported_reasons(adapter, opts) + self.requires_class_token(adapter)
