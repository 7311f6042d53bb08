"""T-TAME (Ntrougkas, Gkalelis & Mezaris, IEEE Access 2024): a trained attention mechanism on the frozen ViT's
norm1 features; one forward pass yields the maps of every class. docs/methods/tame.md.

Maps are the raw pre-sigmoid class maps c[:, k], (B, h', w') with (h', w') = (min(h, 56), min(w, 56)) — the model's
grid for any ViT up to 896 px at patch 16. The paper's min-max `(m - min) / (max - min + 1e-10)` is the display step.
"""
from __future__ import annotations

import os

from vitx_fast.methods.base import Method
from vitx_fast.methods.registry import register_method
from vitx_fast.methods.tame.checkpoint import (
    BackboneMismatchError,
    TameCheckpointError,
    load_tame,
    not_supported_reasons,
    resolve_explainer,
)
from vitx_fast.methods.tame.fast import TTAMEFast
from vitx_fast.methods.tame.module import AttentionTAME, TAMEExplainer
from vitx_fast.methods.tame.reference import TTAMEReference
from vitx_fast.methods.tame.train import train_tame

__all__ = ["AttentionTAME", "BackboneMismatchError", "TAMEExplainer", "TTAME", "TameCheckpointError", "load_tame",
           "train_tame"]


@register_method
class TTAME(Method):
    name = "tame"
    summary = "T-TAME: trained attention mechanism on the frozen ViT's norm1 features (all classes in one pass)"
    # explainer: None (the one shipped for the bundled demo model), a checkpoint path, or vx.load_tame(path)
    # verify_weights: refuse a backbone whose weights differ from the one the explainer was trained on
    options = {"explainer": None, "verify_weights": True}
    multi_target = True

    def make_implementations(self):
        return {"reference": TTAMEReference(), "fast": TTAMEFast()}

    def validate_options(self, opts):
        e = opts["explainer"]
        if not (e is None or isinstance(e, (str, os.PathLike, TAMEExplainer))):
            raise ValueError(f"tame: explainer must be None, a checkpoint path or vx.load_tame(path), "
                             f"got {type(e).__name__}")
        if not isinstance(opts["verify_weights"], bool):
            raise ValueError(f"tame: verify_weights must be True or False, got {opts['verify_weights']!r}")

    def not_supported_reasons(self, adapter, opts):
        reasons = super().not_supported_reasons(adapter, opts)
        try:
            ex = resolve_explainer(opts["explainer"])
        except FileNotFoundError as exc:
            if opts["explainer"] is not None:
                raise
            return reasons + [str(exc)]
        return reasons + not_supported_reasons(ex, adapter.model, opts["verify_weights"])
