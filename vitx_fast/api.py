"""The public entry point: `explain(model, images, method=..., target=..., backend=..., **options)`."""
from __future__ import annotations

import torch

from vitx_fast.backends.dispatch import select_backend
from vitx_fast.explanation import Explanation
from vitx_fast.methods.registry import get_method
from vitx_fast.methods.targets import resolve_targets
from vitx_fast.models.timm_adapter import UnsupportedModelError, ViTAdapter


def refusals(model, method: str, **options) -> list[str]:
    """Why `method` with these options cannot explain `model` (empty when it can); nothing is computed."""
    m = get_method(method)
    return m.refusals(ViTAdapter(model), m.resolve_options(options))


def explain(model, images: torch.Tensor, method: str = "reciprocam", target=None, backend: str | None = None,
            **options) -> Explanation:
    """Explain a timm ViT's predictions.

    model: a timm VisionTransformer (any token layout). It is not modified; eval mode is used during the call.
    images: (B, 3, H, W) float tensor, normalised as the model expects.
    method: one of `list_methods()`. target: None (top-1), int, list, (B,) or (B, K) tensor, or "all".
    backend: None (fastest that can serve), or a name from `list_backends()`. options: the method's options.
    Returns an Explanation with maps (B, h, w) or (B, K, h, w) at the method's native scale.
    """
    m = get_method(method)
    opts = m.resolve_options(options)
    m.check_target(target, opts)
    adapter = ViTAdapter(model)
    reasons = m.refusals(adapter, opts)
    if reasons:
        raise UnsupportedModelError(f"{method} cannot explain this model: " + "; ".join(reasons))
    images = adapter.check_images(images)
    be = select_backend(m, adapter, images, opts, backend)
    impl = m.impls[be.NAME]
    def resolve(logits):
        return resolve_targets(target, logits, images.shape[0], method=method, multi_ok=m.multi_target,
                               class_agnostic=m.class_agnostic)

    with adapter.session():
        if getattr(impl, "resolves_targets", False):
            res = impl(adapter, images, resolve, opts)
            targets = res.targets
            return Explanation(maps=res.maps, targets=targets, logits=res.logits, method=method, backend=be.NAME,
                               flow=res.flow, options=opts, extras=res.extras)
        logits = adapter.logits(images)
        targets = resolve(logits)
        if targets.dim() == 2 and m.class_agnostic:
            # the map does not depend on the class: compute once, repeat for the K requested targets
            res = impl(adapter, images, targets[:, 0], opts)
            k = targets.shape[1]
            maps = res.maps.unsqueeze(1).expand(-1, k, *res.maps.shape[1:]).contiguous()
            flow = None if res.flow is None else res.flow.unsqueeze(1).expand(-1, k, *res.flow.shape[1:]).contiguous()
            extras = res.extras
        elif targets.dim() == 2 and not m.multi_target:
            # one pass per requested column; each column is an ordinary (B,) run
            results = [impl(adapter, images, targets[:, j], opts) for j in range(targets.shape[1])]
            maps = torch.stack([r.maps for r in results], dim=1)
            flow = None if results[0].flow is None else torch.stack([r.flow for r in results], dim=1)
            extras = {"per_target": [r.extras for r in results]} if results[0].extras else {}
        else:
            res = impl(adapter, images, targets, opts)
            maps, flow, extras = res.maps, res.flow, res.extras
            if res.targets is not None:
                targets = res.targets
    return Explanation(maps=maps, targets=targets, logits=logits, method=method, backend=be.NAME, flow=flow,
                       options=opts, extras=extras)
