"""An explainer as a module: `forward(images) -> (logits, maps)`, traceable by torch.export (and later ONNX).

It calls a method's fast implementation directly, with the input checks done once at construction on an example
shape, so that the traced program holds no data-dependent Python control flow.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitx_fast.backends.dispatch import select_backend
from vitx_fast.methods.registry import get_method
from vitx_fast.methods.targets import resolve_targets
from vitx_fast.models.timm_adapter import UnsupportedModelError, ViTAdapter


class ExplainerModule(nn.Module):
    """model + method in one module. forward(images (B, 3, H, W)) -> (logits (B, C), maps (B, h, w) or (B, K, h, w)).

    target: None (top-1 inside the program) or "all" (every class, methods that yield them in one pass).
    """

    def __init__(self, model: nn.Module, method: str, target=None, backend: str | None = "fused", **options):
        super().__init__()
        self.model = model
        self.method = get_method(method)
        self.opts = self.method.resolve_options(options)
        self.adapter = ViTAdapter(model)
        reasons = self.method.refusals(self.adapter, self.opts)
        if reasons:
            raise UnsupportedModelError(f"{method} cannot explain this model: " + "; ".join(reasons))
        if target not in (None, "all"):
            raise ValueError("ExplainerModule: target must be None (top-1) or 'all'")
        self.target = target
        self.backend = select_backend(self.method, self.adapter, None, self.opts, backend)
        self.impl = self.method.impls[self.backend.NAME]
        if not getattr(self.impl, "resolves_targets", False):
            raise ValueError(f"{method}: the {self.backend.NAME} implementation is not a single traceable program")

    def forward(self, images: torch.Tensor):
        m, target = self.method, self.target

        def resolve(logits):
            return resolve_targets(target, logits, images.shape[0], method=m.name, multi_ok=m.multi_target,
                                   class_agnostic=m.class_agnostic)

        res = self.impl(self.adapter, images, resolve, self.opts)
        return res.logits, res.maps
