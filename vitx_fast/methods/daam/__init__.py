"""DAAM, Dynamic Accumulated Attention Map (Liao, Gao & Zhang, Pattern Recognition 2025): docs/methods/daam.md."""
from __future__ import annotations

import os

from vitx_fast.methods.base import Method
from vitx_fast.methods.daam.fast import DAAMFast
from vitx_fast.methods.daam.memory_bank import MemoryBank
from vitx_fast.methods.daam.reference import DAAMReference
from vitx_fast.methods.registry import register_method


@register_method
class DAAM(Method):
    name = "daam"
    summary = "Dynamic Accumulated Attention Map: per-block CLS-attention decomposition, accumulated over blocks"
    options = {"mode": "supervised", "norm": False, "display": "nonlinear", "output": "float", "memory_bank": None,
               "k": 20, "temperature": 0.07}
    choices = {"mode": ("supervised", "ssl"), "display": ("nonlinear", "linear"), "output": ("float", "uint8"),
               "norm": (False, True)}

    def validate_options(self, opts):
        k, t, bank = opts["k"], opts["temperature"], opts["memory_bank"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"daam: k must be an int >= 1, got {k!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not float(t) > 0:
            raise ValueError(f"daam: temperature must be > 0, got {t!r}")
        if bank is not None and not isinstance(bank, (MemoryBank, str, os.PathLike)):
            raise ValueError(f"daam: memory_bank must be a MemoryBank or a path to a saved one, got "
                             f"{type(bank).__name__}")
        if bank is not None and opts["mode"] != "ssl":
            raise ValueError("daam: memory_bank is only used with mode='ssl'")

    def check_target(self, target, opts):
        if opts["mode"] == "ssl" and target is not None:
            raise ValueError("daam: mode='ssl' explains the class voted by the kNN memory bank (or the features "
                             "themselves without a bank); pass target=None")

    def needs_head(self, opts):
        # SSL mode weights the model's output features, so headless (DINO-style) models are fine
        return opts["mode"] == "supervised"

    def make_implementations(self):
        return {"reference": DAAMReference(), "fast": DAAMFast()}

    def not_supported_reasons(self, adapter, opts):
        reasons = super().not_supported_reasons(adapter, opts) + self.requires_class_token(adapter)
        if not adapter.attention_is_plain:
            reasons.append("daam decomposes O = A·V entering attn.proj, but this model's attention has an output "
                           "norm (scale_norm) or a gate between A·V and proj")
        return reasons
