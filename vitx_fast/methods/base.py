"""Method base class: declared options, model refusals and one implementation per backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from vitx_fast.models.timm_adapter import ViTAdapter


@dataclass
class MethodResult:
    """What an implementation returns.

    maps: (B, h, w) for (B,) targets, (B, K, h, w) for (B, K) targets (multi-target methods only).
    flow: optional (B, L, h, w) per-block maps (DAAM). targets: set when the method chose them itself (SSL DAAM).
    """

    maps: torch.Tensor
    flow: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None  # set by implementations that resolve their own targets


Impl = Callable[..., MethodResult]


class Method:
    """One explanation method. Subclasses declare options and register implementations by backend name.

    Implementations have the signature `impl(adapter, images, targets, opts) -> MethodResult` with images (B, C, H, W)
    already validated, targets (B,) long (or (B, K) when `multi_target` is True), inside `adapter.session()`.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # option -> default; `choices` restricts some of them
    options: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple]] = {}
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # the map depends on no class (rollout); targets are only recorded
    class_agnostic: ClassVar[bool] = False
    # computes several classes per image in one pass; target="all" allowed
    multi_target: ClassVar[bool] = False

    def __init__(self) -> None:
        self.impls: dict[str, Impl] = {}

    # -- options
    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        given = dict(given)
        opts = dict(self.options)
        for preset in self.presets:
            if given.pop(preset, False):
                opts.update(self.presets[preset])
                opts[preset] = True
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = sorted(set(self.options) | set(self.presets))
            raise TypeError(f"{self.name}: unknown option(s) {unknown}; valid options: {valid}")
        opts.update(given)
        for key, allowed in self.choices.items():
            if opts.get(key) not in allowed:
                raise ValueError(f"{self.name}: {key}={opts.get(key)!r} is not one of {allowed}")
        self.validate_options(opts)
        return opts

    def validate_options(self, opts: dict[str, Any]) -> None:
        """Extra checks on resolved options (ranges etc.); raise ValueError."""

    def check_upsample(self, up) -> None:
        """An `upsample` option: None, a positive int or an (H, W) pair of positive ints."""
        if up is not None:
            pair = isinstance(up, (tuple, list)) and len(up) == 2
            sizes = (up,) if isinstance(up, int) else tuple(up) if pair else ()
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
                raise ValueError(f"{self.name}: upsample must be None, a positive int or (H, W), got {up!r}")

    def check_target(self, target, opts: dict[str, Any]) -> None:
        """Reject a `target` argument this method cannot honour (raise ValueError)."""

    # -- model support
    def needs_head(self, opts: dict[str, Any]) -> bool:
        return not self.class_agnostic

    def refusals(self, adapter: ViTAdapter, opts: dict[str, Any]) -> list[str]:
        """Reasons this method cannot serve this model with these options (any backend)."""
        reasons = []
        if self.needs_head(opts) and not adapter.has_head:
            reasons.append(f"{self.name} explains a class logit, but the model is headless (num_classes=0)")
        return reasons

    def require_class_token(self, adapter: ViTAdapter) -> list[str]:
        if not adapter.has_class_token:
            return [f"{self.name} reads the class token's attention row, but the model has no class token"]
        return []

    def register(self, backend: str, *, resolves_targets: bool = False,
                 supports: Callable[..., list[str]] | None = None) -> Callable[[Impl], Impl]:
        """Register `fn` as this method's implementation on `backend`.

        resolves_targets: fn is called as fn(adapter, images, resolve, opts) with `resolve(logits) -> targets`, and
        returns MethodResult(logits=...), so that one forward serves both the prediction and the explanation.
        supports: `supports(adapter, opts) -> reasons` this implementation cannot serve (empty list: it can).
        """

        def deco(fn: Impl) -> Impl:
            fn.resolves_targets = resolves_targets  # type: ignore[attr-defined]
            fn.supports = supports  # type: ignore[attr-defined]
            self.impls[backend] = fn
            return fn

        return deco
