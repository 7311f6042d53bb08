"""ViT-ReciproCAM (Byun & Lee, arXiv:2310.02588), gradient-free token masking: docs/methods/reciprocam.md."""
from __future__ import annotations

from vitx_fast.methods.base import Method
from vitx_fast.methods.reciprocam.fast import ReciproCAMFast
from vitx_fast.methods.reciprocam.reference import MASKS, RESIDUALS, ReciproCAMReference
from vitx_fast.methods.registry import register_method


@register_method
class ReciproCAM(Method):
    name = "reciprocam"
    summary = "ViT-ReciproCAM: class scores of per-patch masked copies of a block's LN1 output (gradient-free)"
    options = {
        "target_block": -1,  # masked block; -2 is the official code's choice
        "mask": "gaussian",
        "cls_token": True,  # keep every prefix row (CLS, dist, registers) in every variant
        "residual": "unmasked",  # R = X ("unmasked"), m*X ("masked", openvino_xai IR), m*U ("ln1", OTX)
        "score": "softmax",
        "scale": "float",  # per image and class: min-max ("float"), floor(255*min-max) as uint8, or raw ("none")
        "eps": 1e-12,  # min-max denominator epsilon; the official code uses 0
        "upsample": None,  # None, int or (H, W); applied after the scaling on the h x w grid
        "upsample_mode": "bilinear",
        "chunk": None,  # variants per chunk of the mosaic; None picks it from a memory budget
    }
    choices = {
        "mask": MASKS,
        "residual": RESIDUALS,
        "score": ("softmax", "logit"),
        "scale": ("float", "uint8", "none"),
        "upsample_mode": ("bilinear", "bicubic_pil"),
    }
    # sybyun/vitcam ViTReciproCam defaults; the class is the argmax of the unmasked prediction unless a target is given
    presets = {
        "official": {"target_block": -2, "mask": "gaussian", "cls_token": True, "residual": "unmasked",
                     "score": "softmax", "scale": "float", "eps": 0.0},
    }
    multi_target = True

    def validate_options(self, opts):
        tb = opts["target_block"]
        if isinstance(tb, bool) or not isinstance(tb, int):
            raise ValueError(f"reciprocam: target_block must be an int block index (e.g. -1, -2 or 0), got {tb!r}")
        if not isinstance(opts["cls_token"], bool):
            raise ValueError(f"reciprocam: cls_token must be True or False, got {opts['cls_token']!r}")
        eps = opts["eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"reciprocam: eps must be a number >= 0, got {eps!r}")
        if opts["scale"] == "uint8" and eps == 0:
            raise ValueError("reciprocam: scale='uint8' needs eps > 0 (a constant map would give NaN)")
        self.check_upsample(opts["upsample"])
        c = opts["chunk"]
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c <= 0):
            raise ValueError(f"reciprocam: chunk must be None or a positive int (variants per chunk), got {c!r}")

    def make_implementations(self):
        return {"reference": ReciproCAMReference(), "fast": ReciproCAMFast()}

    def not_supported_reasons(self, adapter, opts):
        reasons = super().not_supported_reasons(adapter, opts)
        tb, depth = opts["target_block"], adapter.depth
        if not -depth <= tb < depth:
            reasons.append(f"target_block={tb} is out of range for a model with {depth} blocks "
                           f"(valid: {-depth}..{depth - 1})")
        return reasons
