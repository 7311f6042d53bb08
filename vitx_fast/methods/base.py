"""What a method is: declared options, model refusals, and its implementations (reference and fast).

A method package `vitx_fast/methods/<name>/` defines one `Method` subclass in its `__init__.py`, a
`ReferenceImplementation` in `reference.py` (reads like the paper) and usually an `Implementation` in `fast.py`.
Every "why this cannot run" in the engine is a `not_supported_reasons(...) -> list[str]` (empty: it can).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vitx_fast.engine import memory
from vitx_fast.engine.adapter import ViTAdapter
from vitx_fast.engine.targets import resolve_targets


@dataclass
class MethodResult:
    """What an implementation returns.

    maps: (B, h, w) for (B,) targets, (B, K, h, w) for (B, K) targets.
    flow: optional (B, L, h, w) or (B, K, L, h, w) per-block maps (DAAM). targets: (B,) or (B, K) classes explained.
    logits: (B, C) of the model (None for a headless model). extras: method-specific tensors.
    """

    maps: torch.Tensor
    targets: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    flow: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class Implementation:
    """One way to compute a method.

    `__call__(adapter, images, resolve, opts, kernels=None) -> MethodResult`: images (B, C, H, W) already validated,
    inside `adapter.session()`; `resolve(logits) -> targets` turns the model's logits into the (B,) or (B, K) classes
    to explain, so one forward can serve both the prediction and the explanation. `kernels` is the kernel family for
    the fused ops in OPS (None: each op chooses); it is passed down to every op call.
    """

    ALGORITHM: ClassVar[str] = "fast"  # "reference" | "fast"
    OPS: ClassVar[tuple[str, ...]] = ()  # fused ops (vitx_fast.ops) this implementation calls
    TRACEABLE: ClassVar[bool] = True  # one tensor program (no autograd at run time): torch.export / ONNX can hold it

    def not_supported_reasons(self, adapter: ViTAdapter | None, opts: dict[str, Any], kernels: str | None = None,
                              auto: bool = False) -> list[str]:
        """Why this implementation cannot serve (adapter None: the reasons known without a model).
        auto: also the reasons not to pick it automatically (a kernel family that does not beat torch)."""
        reasons = []
        if kernels is not None:
            if not self.OPS:
                reasons.append(f"the {self.ALGORITHM} path calls no fused op, so there is nothing to run with "
                               f"{kernels} kernels")
            elif auto and kernels == "cpp":
                from vitx_fast.ops import cpp_defaults

                slow = [op for op in self.OPS if not cpp_defaults()[op]]
                reasons += [f"the C++ kernel of {op} does not beat torch (benchmarks/results/ops.md)" for op in slow]
        return reasons

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        raise NotImplementedError

    def memory_modes(self, adapter: ViTAdapter, tokens: int, opts: dict[str, Any], k: int) -> dict[str, int]:
        """Bytes per image of working memory by way of running, fastest first (`vitx_fast.engine.memory.choose`
        picks one and the chunk of images that fits the `memory_budget`); tokens: T, k: targets per image. The
        chosen mode reaches `__call__` as opts["memory_plan"]. Default: a forward that forms one block's (H, T, T)
        scores and probabilities, keeps one (T, T) matrix per block and a few (T, T) temporaries (rollout-style
        methods)."""
        T, D, H, L = tokens, adapter.embed_dim, adapter.num_heads, adapter.depth
        return {"default": memory.element_size(adapter.dtype) * T * (10 * D + 3 * H * T + (L + 4) * T)}


class ReferenceImplementation(Implementation):
    """The plain PyTorch path. Subclasses write `explain_targets(adapter, images, targets, opts)` for (B,) targets
    (or (B, K) when the method is multi_target); the prediction, the class-agnostic repeat and the per-column loop
    are done here once for every method."""

    ALGORITHM = "reference"
    TRACEABLE = False

    def __init__(self, method: Method | None = None):
        self.method = method

    def memory_modes(self, adapter, tokens, opts, k):
        # an autograd graph over unfused blocks: every activation and the (H, T, T) scores and probabilities
        T, D, H = tokens, adapter.embed_dim, adapter.num_heads
        return {"reference": memory.element_size(adapter.dtype) * adapter.depth * T * (16 * D + 4 * H * T)}

    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        raise NotImplementedError

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        m = self.method
        logits = adapter.logits(images)
        targets = resolve(logits)
        if targets.dim() == 2 and m.class_agnostic:
            # the map depends on no class: compute once, repeat for the K requested targets
            res = self.explain_targets(adapter, images, targets[:, 0], opts)
            k = targets.shape[1]
            res.maps = res.maps.unsqueeze(1).expand(-1, k, *res.maps.shape[1:]).contiguous()
            if res.flow is not None:
                res.flow = res.flow.unsqueeze(1).expand(-1, k, *res.flow.shape[1:]).contiguous()
        elif targets.dim() == 2 and not m.multi_target:
            # one pass per requested column; each column is an ordinary (B,) run
            results = [self.explain_targets(adapter, images, targets[:, j], opts) for j in range(targets.shape[1])]
            res = MethodResult(maps=torch.stack([r.maps for r in results], dim=1))
            if results[0].flow is not None:
                res.flow = torch.stack([r.flow for r in results], dim=1)
            if results[0].extras:
                res.extras = {"per_target": [r.extras for r in results]}
        else:
            res = self.explain_targets(adapter, images, targets, opts)
        if res.targets is None:
            res.targets = targets
        res.logits = logits
        return res


class Method:
    """One explanation method: declared options (checked), model refusals, implementations by algorithm."""

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
    # options every method takes (vitx_fast.engine.memory); kept in the resolved options only when given
    SHARED_OPTIONS: ClassVar[tuple[str, ...]] = ("memory_budget",)

    def __init__(self) -> None:
        self.implementations: dict[str, Implementation] = self.make_implementations()
        for impl in self.implementations.values():
            if isinstance(impl, ReferenceImplementation):
                impl.method = self

    def make_implementations(self) -> dict[str, Implementation]:
        """{"reference": ..., "fast": ...}: the method's implementations by ALGORITHM."""
        raise NotImplementedError

    # -- options
    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        given = dict(given)
        budget = given.pop("memory_budget", None)
        memory.parse_budget(budget, f"{self.name}: memory_budget")
        opts = dict(self.options)
        for preset in self.presets:
            if given.pop(preset, False):
                opts.update(self.presets[preset])
                opts[preset] = True
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = sorted(set(self.options) | set(self.presets) | set(self.SHARED_OPTIONS))
            raise TypeError(f"{self.name}: unknown option(s) {unknown}; valid options: {valid}")
        opts.update(given)
        if budget is not None:
            opts["memory_budget"] = budget
        for key, allowed in self.choices.items():
            if opts.get(key) not in allowed:
                raise ValueError(f"{self.name}: {key}={opts.get(key)!r} is not one of {allowed}")
        self.validate_options(opts)
        return opts

    def validate_options(self, opts: dict[str, Any]) -> None:
        """Extra checks on resolved options (ranges etc.); raise ValueError."""

    MAX_UPSAMPLE: ClassVar[int] = 16384  # pixels per side; beyond it the map alone would take gigabytes

    def check_upsample(self, up) -> None:
        """An `upsample` option: None, a positive int or an (H, W) pair of positive ints, each <= MAX_UPSAMPLE."""
        if up is not None:
            pair = isinstance(up, (tuple, list)) and len(up) == 2
            sizes = (up,) if isinstance(up, int) else tuple(up) if pair else ()
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
                raise ValueError(f"{self.name}: upsample must be None, a positive int or (H, W), got {up!r}")
            if max(sizes) > self.MAX_UPSAMPLE:
                raise ValueError(f"{self.name}: upsample={up!r} exceeds {self.MAX_UPSAMPLE} pixels per side")

    def check_target(self, target, opts: dict[str, Any]) -> None:
        """Reject a `target` argument this method cannot honour (raise ValueError)."""

    def resolver(self, target, batch: int):
        """`resolve(logits) -> targets` for this method and a user's `target` (see engine.targets)."""

        def resolve(logits):
            return resolve_targets(target, logits, batch, method=self.name, multi_ok=self.multi_target,
                                   class_agnostic=self.class_agnostic)

        return resolve

    # -- model support
    def needs_head(self, opts: dict[str, Any]) -> bool:
        return not self.class_agnostic

    def not_supported_reasons(self, adapter: ViTAdapter, opts: dict[str, Any]) -> list[str]:
        """Why this method with these options cannot explain this model on any backend (empty: it can)."""
        reasons = []
        if self.needs_head(opts) and not adapter.has_head:
            reasons.append(f"{self.name} explains a class logit, but the model is headless (num_classes=0)")
        return reasons

    def requires_class_token(self, adapter: ViTAdapter) -> list[str]:
        if not adapter.has_class_token:
            return [f"{self.name} reads the class token's attention row, but the model has no class token"]
        return []
