"""The public entry point: `explain(model, images, method=..., target=..., backend=..., **options)`.

`prepare` does everything before the first tensor operation (options, target form, model refusals, backend choice)
for both `explain` and `vitx_fast.export.ExplainerModule`, so the two refuse the same things with the same words.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from vitx_fast.engine import chunks, memory
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

    def run(self, images: torch.Tensor, resolve, memory_plan=None) -> Explanation:
        """images: (B, C, H, W) on the model's device and dtype; resolve(logits) -> targets (B,) or (B, K);
        memory_plan: the engine.memory.MemoryPlan the batch fits (None: the implementation's fastest mode)."""
        opts = self.opts if memory_plan is None else {**self.opts, "memory_plan": memory_plan}
        res = self.impl(self.adapter, images, resolve, opts, kernels=self.backend.KERNELS)
        return Explanation(maps=res.maps, targets=res.targets, logits=res.logits, method=self.method.name,
                           backend=self.backend.NAME, flow=res.flow, options=self.opts, extras=res.extras)

    def run_budgeted(self, images: torch.Tensor, target) -> Explanation:
        """`explain`'s run: the batch in chunks of images that fit the `memory_budget` option
        (vitx_fast.engine.memory); extras["memory"] reports the mode and the chunks."""
        a, m, B = self.adapter, self.method, images.shape[0]
        T = a.num_prefix_tokens + math.prod(a.grid_for(*images.shape[-2:]))
        k = chunks.targets_per_image(target, a.num_classes, m.class_agnostic)
        budget = memory.resolve_budget(self.opts.get("memory_budget"), a, B, T)
        plan = memory.choose(self.impl.memory_modes(a, T, self.opts, k), B, budget)
        if plan.chunk >= B:
            exp = self.run(images, m.resolver(target, B), plan)
        else:
            if chunks.per_image_target(target):  # checked once for the whole batch, then sliced per chunk
                target = m.resolver(target, B)(torch.zeros(B, a.num_classes, device=images.device)
                                               if a.has_head else None)
            spans = chunks.spans(B, plan.chunk)
            parts = [self.run(images[s:e], m.resolver(target[s:e] if chunks.per_image_target(target) else target,
                                                      e - s), plan) for s, e in spans]
            sizes = [e - s for s, e in spans]
            exp = parts[0]
            for name in ("maps", "targets", "logits", "flow", "extras"):
                value = getattr(exp, name)
                setattr(exp, name, None if value is None else chunks.concat([getattr(p, name) for p in parts], sizes))
        exp.extras["memory"] = plan.report(B)
        return exp


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
    adapter.check_parameters()
    reasons = m.not_supported_reasons(adapter, opts)
    if reasons:
        raise UnsupportedModelError(f"{method} cannot explain this model: " + "; ".join(reasons))
    be = select_backend(m, adapter, opts, backend)
    return Plan(m, opts, adapter, be, be.implementation(m))


def not_supported_reasons(model, method: str, **options) -> list[str]:
    """Why `method` with these options cannot explain `model` (empty when it can); nothing is computed."""
    m = get_method(method)
    return m.not_supported_reasons(ViTAdapter(model), m.resolve_options(options))


NONFINITE = ("raise", "warn")


def check_finite(exp: Explanation, nonfinite: str = "raise") -> Explanation:
    """Raise ValueError (nonfinite="raise") or warn ("warn") when exp.logits (B, C) or exp.maps hold NaN or inf."""
    hints = {"logits": "NaN/inf weights, or inputs too large for the model's dtype?",
             "map": "the logits are finite: e.g. a constant map min-max scaled with eps=0"}
    problems = []
    for name, what, t in (("logits", "the model's logits", exp.logits), ("map", f"{exp.method} maps", exp.maps)):
        if t is None or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1)  # (B,)
        if bad.any():
            images = bad.nonzero().flatten().tolist()
            problems.append((name, f"non-finite {name}: {what} hold NaN or inf for image(s) {images[:10]}"))
    if problems:
        msg = (f"{'; '.join(p for _, p in problems)} ({hints[problems[0][0]]}); pass nonfinite='warn' to get them "
               "anyway")
        if nonfinite == "raise":
            raise ValueError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return exp


def explain(model, images: torch.Tensor, method: str = "reciprocam", target=None, backend: str | None = None,
            nonfinite: str = "raise", **options) -> Explanation:
    """Explain a timm ViT's predictions.

    model: a timm VisionTransformer (any token layout). It is not modified; eval mode is used during the call.
    images: (B, 3, H, W) float tensor, normalised as the model expects (used as it is); or what `preprocess`
    takes (PIL images, paths, uint8 arrays / tensors, a list of them), preprocessed with the model's data config.
    method: one of `list_methods()`. target: None (top-1), int, list, (B,) or (B, K) tensor, or "all".
    backend: None (fastest that can serve), or a name from `list_backends()`. options: the method's options, and
    `memory_budget` (every method: bytes of working memory, a size such as "2GB", or "unlimited"; default about one
    plain forward plus 512 MiB): the batch runs in chunks that fit it (vitx_fast.engine.memory).
    nonfinite: "raise" (default: ValueError "non-finite logits ..." / "non-finite map ..." when the logits or maps
    hold NaN or inf) or "warn" (return them with a RuntimeWarning).
    Returns an Explanation with maps (B, h, w) or (B, K, h, w) at the method's native scale.

    Images must be on the model's device (meta tensors are refused). Works inside `torch.no_grad()` and
    `torch.inference_mode()`: the gradient methods run with autograd enabled regardless. Thread-safe: explanations of
    one model are serialised by a per-model lock (`vitx_fast.engine.adapter.model_lock`); different models run
    concurrently.
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if not (isinstance(images, torch.Tensor) and images.is_floating_point()):  # images users have: vx.preprocess
        from vitx_fast.imaging import preprocess

        images = preprocess(model, images)
    plan = prepare(model, method, options, target, backend)
    images = plan.adapter.check_images(images)
    with torch.inference_mode(False), torch.enable_grad():
        if images.is_inference():  # made under inference_mode: autograd cannot save it for backward
            images = images.clone()
        try:
            with plan.adapter.session():
                exp = plan.run_budgeted(images, target)
        except RuntimeError as exc:
            if any(p.is_inference() for p in plan.adapter.model.parameters()):
                raise ValueError(f"{method}: the model's parameters were created under torch.inference_mode() "
                                 "(inference tensors), which autograd cannot use; build or load the model outside "
                                 "inference_mode") from exc
            raise
    return check_finite(exp, nonfinite)
