"""The public entry point: `explain(model, images, method=..., target=..., backend=..., **options)`.

`prepare` does everything before the first tensor operation (options, target form, model refusals, backend choice)
for both `explain` and `vitx_fast.export.ExplainerModule`, so the two refuse the same things with the same words.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vitx_fast.engine.adapter import UnsupportedModelError, ViTAdapter
from vitx_fast.engine.backends import Backend, select_backend
from vitx_fast.explanation import Explanation
from vitx_fast.methods.base import Implementation, Method
from vitx_fast.methods.registry import get_method


@dataclass
class Plan:
    """A method ready to run on one model: resolved options, the chosen backend and its implementation."""

    method: Method
    opts: dict
    adapter: ViTAdapter
    backend: Backend
    impl: Implementation

    def run(self, images: torch.Tensor, resolve) -> Explanation:
        """images: (B, C, H, W) on the model's device and dtype; resolve(logits) -> targets (B,) or (B, K)."""
        res = self.impl(self.adapter, images, resolve, self.opts, kernels=self.backend.KERNELS)
        return Explanation(maps=res.maps, targets=res.targets, logits=res.logits, method=self.method.name,
                           backend=self.backend.NAME, flow=res.flow, options=self.opts, extras=res.extras)


def prepare(model, method: str, options: dict, target=None, backend: str | None = None) -> Plan:
    """Check the method, its options, the target form and the model; choose the backend. Nothing is computed.

    Raises ValueError / TypeError (unknown method, option or value; a target form the method cannot honour),
    UnsupportedModelError (the method cannot explain this model, with every reason), ValueError (an explicit backend
    that cannot serve) or NotImplementedError (no backend can).
    """
    m = get_method(method)
    opts = m.resolve_options(options)
    m.check_target(target, opts)
    adapter = ViTAdapter(model)
    reasons = m.not_supported_reasons(adapter, opts)
    if reasons:
        raise UnsupportedModelError(f"{method} cannot explain this model: " + "; ".join(reasons))
    be = select_backend(m, adapter, opts, backend)
    return Plan(m, opts, adapter, be, be.implementation(m))


def not_supported_reasons(model, method: str, **options) -> list[str]:
    """Why `method` with these options cannot explain `model` (empty when it can); nothing is computed."""
    m = get_method(method)
    return m.not_supported_reasons(ViTAdapter(model), m.resolve_options(options))


def explain(model, images: torch.Tensor, method: str = "reciprocam", target=None, backend: str | None = None,
            **options) -> Explanation:
    """Explain a timm ViT's predictions.

    model: a timm VisionTransformer (any token layout). It is not modified; eval mode is used during the call.
    images: (B, 3, H, W) float tensor, normalised as the model expects.
    method: one of `list_methods()`. target: None (top-1), int, list, (B,) or (B, K) tensor, or "all".
    backend: None (fastest that can serve), or a name from `list_backends()`. options: the method's options.
    Returns an Explanation with maps (B, h, w) or (B, K, h, w) at the method's native scale.
    """
    plan = prepare(model, method, options, target, backend)
    images = plan.adapter.check_images(images)
    with plan.adapter.session():
        return plan.run(images, plan.method.resolver(target, images.shape[0]))
