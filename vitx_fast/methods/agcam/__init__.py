"""AGCAM, Attention-Guided CAM (Leem & Seo, AAAI-24): docs/methods/agcam.md."""
from __future__ import annotations

from vitx_fast.methods.agcam.fast import AGCAMFast
from vitx_fast.methods.agcam.reference import AGCAMReference
from vitx_fast.methods.base import Method
from vitx_fast.methods.registry import register_method


@register_method
class AGCAM(Method):
    name = "agcam"
    summary = "Attention-Guided CAM: ReLU(dy/dA) * sigmoid(scores) on the CLS row, attention inputs detached"
    # docs/methods/agcam.md §2: raw [B, h, w] maps by default; optional upsample (bilinear, align_corners=False) and
    # then per-map min-max with +1e-12 in the denominator, the order of the reference's evaluation code
    options = {"head_fusion": "sum", "layer_fusion": "sum", "normalize": None, "upsample": None}
    choices = {"head_fusion": ("sum", "mean"), "layer_fusion": ("sum", "mean"), "normalize": (None, "minmax")}

    def validate_options(self, opts):
        self.check_upsample(opts["upsample"])

    def make_implementations(self):
        return {"reference": AGCAMReference(), "fast": AGCAMFast()}

    def not_supported_reasons(self, adapter, opts):
        reasons = super().not_supported_reasons(adapter, opts) + self.requires_class_token(adapter)
        if adapter.has_class_token and adapter.global_pool != "token":
            # with detached attention inputs only the CLS residual stream carries gradient; a head that
            # does not read it leaves every G^l[:, :, 0] at 0
            reasons.append(
                f"agcam needs a head that reads the class token (global_pool='token'), but this model pools with "
                f"global_pool={adapter.global_pool!r}: with the attention inputs detached the class token has no "
                "path to the logit, so the AGCAM map would be identically zero"
            )
        return reasons
