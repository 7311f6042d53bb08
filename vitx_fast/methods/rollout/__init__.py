"""Attention Rollout (Abnar & Zuidema; jacobgil/vit-explain semantics): docs/methods/rollout.md."""
from __future__ import annotations

from vitx_fast.methods.base import Method
from vitx_fast.methods.registry import register_method
from vitx_fast.methods.rollout.fast import RolloutFast
from vitx_fast.methods.rollout.reference import RolloutReference


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

    def make_implementations(self):
        return {"reference": RolloutReference(), "fast": RolloutFast()}

    def validate_options(self, opts):
        r = opts["discard_ratio"]
        if isinstance(r, bool) or not (isinstance(r, (int, float)) and 0.0 <= float(r) < 1.0):
            raise ValueError(f"rollout: discard_ratio must be in [0, 1), got {r!r}")

    def not_supported_reasons(self, adapter, opts):
        return super().not_supported_reasons(adapter, opts) + self.requires_class_token(adapter)
