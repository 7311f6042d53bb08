"""Backends declare what they support and explain refusals (xformers-style `not_supported_reasons`)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch


class Backend:
    NAME: ClassVar[str]
    PRIORITY: ClassVar[int]  # lower runs first when backend=None
    SUPPORTED_DEVICES: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    SUPPORTED_DTYPES: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    # tolerances on min-max normalised maps, per dtype, against the reference run in float64
    ERROR_ATOL: ClassVar[dict[torch.dtype, float]] = {torch.float64: 1e-9, torch.float32: 1e-5}

    def is_available(self) -> tuple[bool, str | None]:
        return True, None

    def auto_reasons(self, method, adapter, opts: dict[str, Any]) -> list[str]:
        """Reasons to pass this backend over when the user did not name it (it still runs when asked for)."""
        return []

    def not_supported_reasons(self, method, adapter, images: torch.Tensor | None, opts: dict[str, Any]) -> list[str]:
        reasons = []
        ok, why = self.is_available()
        if not ok:
            reasons.append(f"{self.NAME} backend unavailable: {why}")
        impl = method.impls.get(self.NAME)
        if impl is None:
            reasons.append(f"{self.NAME} has no implementation of {method.name}")
        elif getattr(impl, "supports", None) is not None:
            reasons.extend(impl.supports(adapter, opts))
        device = adapter.device.type
        if device not in self.SUPPORTED_DEVICES:
            reasons.append(f"{self.NAME} does not run on device {device!r} (supports {self.SUPPORTED_DEVICES})")
        if adapter.dtype not in self.SUPPORTED_DTYPES:
            reasons.append(f"{self.NAME} does not support dtype {adapter.dtype}")
        return reasons


class FusedBackend(Backend):
    """Exact algebraic fusions in plain torch (row-vector chains, collapsed softmaxes, one-row backward passes);
    calls the fused ops (`vitx_fast.ops`), which use Triton on CUDA and C++ kernels on CPU where they pay."""

    NAME = "fused"
    PRIORITY = 50


class KernelBackend(Backend):
    """The fused implementations with every fused op forced to one kernel family (C++ or Triton)."""

    IMPL: ClassVar[str]

    def is_available(self) -> tuple[bool, str | None]:
        from vitx_fast.ops import availability

        why = availability()[self.IMPL]
        return why is None, why


class CppBackend(KernelBackend):
    """C++ CPU kernels (pybind11, OpenMP) for the fused ops; chosen by default only where every kernel it uses beats
    the torch composition (benchmarks/results/ops.md)."""

    NAME = IMPL = "cpp"
    PRIORITY = 20
    SUPPORTED_DEVICES = ("cpu",)
    SUPPORTED_DTYPES = (torch.float32, torch.float64)

    def auto_reasons(self, method, adapter, opts):
        from vitx_fast.ops import cpp_defaults

        impl = method.impls.get(self.NAME)
        slow = [op for op in getattr(impl, "ops", ()) if not cpp_defaults()[op]]
        return [f"the C++ kernel of {op} does not beat torch (benchmarks/results/ops.md)" for op in slow]


class TritonBackend(KernelBackend):
    """Triton kernels for the fused ops, on CUDA devices."""

    NAME = IMPL = "triton"
    PRIORITY = 10
    SUPPORTED_DEVICES = ("cuda",)


class ReferenceBackend(Backend):
    """Plain PyTorch, readable like the papers; accepts every layout the method accepts. Always last."""

    NAME = "reference"
    PRIORITY = 100
