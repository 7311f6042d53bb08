"""An explainer as a module: `forward(images) -> (logits, maps)`, traceable by torch.export and ONNX
(`vitx_fast.onnx_export`).

It calls a method's fast implementation directly, with the input checks done once at construction on an example
shape, so that the traced program holds no data-dependent Python control flow.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitx_fast.api import prepare
from vitx_fast.engine.targets import top_k
from vitx_fast.postprocess import UPSAMPLE_MODES, _pil_bicubic_weights, normalize, upsample


class ExplainerModule(nn.Module):
    """model + method in one module. forward(images (B, 3, H, W)[, classes (B,) or (B, K) long]) -> (logits (B, C),
    maps (B, h, w) or (B, K, h, w)[, flow (B, L, h, w) or (B, K, L, h, w)]).

    target: None (top-1 inside the program), "all" (every class, methods that yield them in one pass), "topK" (the K
    highest logits per image, e.g. "top5": maps (B, K, h, w)), a list of K class indices (the same K classes for
    every image) or "input" (forward takes a second argument `classes`, (B,) or (B, K) long, used instead of the
    top-1). Gradient methods serve the K classes of an image with one batched backward.
    upsample: False, True (bilinear) or a `vx.upsample` mode: maps resized to the input size (H, W) in the program.
    normalize: per-map min-max as `vx.normalize` (after the upsampling). flow: also return the method's per-block
    maps (DAAM), with the same epilogue.
    """

    def __init__(self, model: nn.Module, method: str, target=None, backend: str | None = "fused", *,
                 upsample: bool | str = False, normalize: bool = False, flow: bool = False, **options):
        super().__init__()
        fixed = None
        if isinstance(target, (list, tuple)):
            if not target or not all(isinstance(c, int) and not isinstance(c, bool) for c in target):
                raise ValueError(f"ExplainerModule: a class list target must be a non-empty list of ints, got "
                                 f"{target!r}")
            fixed, target = list(target), None
        elif target is not None and target not in ("all", "input") and top_k(target) is None:
            raise ValueError("ExplainerModule: target must be None (top-1), 'all', 'topK' (e.g. 'top5'), a list of "
                             "class indices or 'input' (a class index input)")
        self.model = model
        self.plan = prepare(model, method, options, target, backend)
        self.method, self.opts, self.adapter = self.plan.method, self.plan.opts, self.plan.adapter
        if target == "input" and self.method.class_agnostic:
            raise ValueError(f"{method}: the map depends on no class; a class input would be unused")
        if not self.plan.impl.TRACEABLE:
            raise ValueError(f"{method}: the {self.plan.backend.NAME} implementation is not a single traceable "
                             "program")
        if fixed is not None:
            n = self.adapter.num_classes
            if any(not 0 <= c < n for c in fixed):
                raise ValueError(f"ExplainerModule: class indices {fixed} out of range for a model with {n} classes")
            if self.method.class_agnostic:
                raise ValueError(f"{method}: the map depends on no class; a class list would be unused")
        if isinstance(target, str) and top_k(target) is not None and top_k(target) > self.adapter.num_classes:
            raise ValueError(f"ExplainerModule: target={target!r} asks for more classes than the model's "
                             f"{self.adapter.num_classes}")
        # a constant of the program: the same classes for every image
        fixed = None if fixed is None else torch.tensor(fixed, device=self.adapter.device)
        self.register_buffer("fixed_classes", fixed, persistent=False)
        self.target = target
        mode = "bilinear" if upsample is True else (upsample or None)
        if mode is not None and mode not in UPSAMPLE_MODES:
            raise ValueError(f"ExplainerModule: upsample must be False, True or one of {UPSAMPLE_MODES}, "
                             f"got {upsample!r}")
        self.upsample_mode, self.normalize, self.flow = mode, bool(normalize), bool(flow)
        self.pil_size = None
        if mode == "bicubic_pil" and self.adapter.img_size is not None:
            # PIL's resampling matrices are built element by element: built once here, they are two constants of
            # the traced program instead of thousands of traced assignments
            H, W = self.adapter.img_size
            h, w = self.adapter.grid_for(H, W)
            kw = dict(dtype=self.adapter.dtype, device=self.adapter.device)
            self.register_buffer("pil_wh", _pil_bicubic_weights(h, H, **kw), persistent=False)
            self.register_buffer("pil_ww", _pil_bicubic_weights(w, W, **kw), persistent=False)
            self.pil_size = ((h, w), (H, W))

    def epilogue(self, maps: torch.Tensor, size) -> torch.Tensor:
        """(..., h, w) -> (..., H, W) when upsampling, min-max normalised per map when asked."""
        if self.pil_size == (tuple(maps.shape[-2:]), tuple(size)):
            maps = maps if maps.is_floating_point() else maps.float()
            maps = torch.einsum("oh,...hw,pw->...op", self.pil_wh.to(maps.dtype), maps, self.pil_ww.to(maps.dtype))
        elif self.upsample_mode is not None:
            maps = upsample(maps, size, mode=self.upsample_mode)
        return normalize(maps) if self.normalize else maps

    def forward(self, images: torch.Tensor, classes: torch.Tensor | None = None):
        m, target = self.method, self.target
        if (target == "input") != (classes is not None):
            raise ValueError("ExplainerModule: pass `classes` (B,) exactly when built with target='input'")
        if classes is not None:
            if classes.dim() not in (1, 2):
                raise ValueError(f"ExplainerModule: classes must be (B,) or (B, K), got shape {tuple(classes.shape)}")

            def resolve(logits):
                return classes.to(device=logits.device, dtype=torch.long)
        elif self.fixed_classes is not None:
            def resolve(logits):
                return self.fixed_classes.expand(logits.shape[0], -1)
        else:
            resolve = m.resolver(target, images.shape[0])
        res = self.plan.run(images, resolve)
        size = tuple(images.shape[-2:])
        maps = self.epilogue(res.maps, size)
        if not self.flow:
            return res.logits, maps
        if res.flow is None:
            raise ValueError(f"{m.name} has no per-block flow")
        return res.logits, maps, self.epilogue(res.flow, size)
