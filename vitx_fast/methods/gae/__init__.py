"""GAE, generic attention explainability (Chefer et al., ICCV'21): docs/methods/gae.md."""
from __future__ import annotations

from vitx_fast.methods.base import Method
from vitx_fast.methods.gae.fast import GAEFast
from vitx_fast.methods.gae.reference import GAEReference
from vitx_fast.methods.registry import register_method


@register_method
class GAE(Method):
    name = "gae"
    summary = "Generic Attention Explainability: rollout of relu(grad x attention) head means (Chefer et al., ICCV'21)"
    options = {}

    def make_implementations(self):
        return {"reference": GAEReference(), "fast": GAEFast()}

    def not_supported_reasons(self, adapter, opts):
        return super().not_supported_reasons(adapter, opts) + self.requires_class_token(adapter)
