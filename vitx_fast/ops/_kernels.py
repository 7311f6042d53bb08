"""Kernel choice for the fused ops, through the engine's one priority walk (`vitx_fast.engine.dispatch`).

    kernels=None:  triton for CUDA tensors; cpp for CPU tensors when the op's C++ kernel beats torch (CPP_DEFAULT in
                   the op module, measured by benchmarks/bench_ops.py, see benchmarks/results/ops.md); else reference.
                   Under torch.export / torch.compile tracing always reference (the only traceable program).
    kernels="reference" | "cpp" | "triton": used as asked, or ValueError listing why it cannot serve.

The family that ran last is recorded per op (`last_kernels`), so tests can assert which one ran.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitx_fast.engine.dispatch import KERNEL_FAMILIES, KernelFamily, run_priority_list, tracing

_LAST: dict[str, str] = {}


@dataclass(frozen=True)
class KernelRequest:
    """One call of a fused op: its name and tensor inputs (tensors[0] sets the device and dtype)."""

    op: str
    tensors: tuple[torch.Tensor, ...]
    cpp_default: bool
    only_reference: str | None = None  # why only the reference kernel computes this call

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors)


class _OpKernels(KernelFamily):
    """A kernel family as a candidate for one op call: the family's own reasons plus the op-level ones."""

    def __init__(self, family: KernelFamily):
        self.family = family
        self.NAME, self.PRIORITY = family.NAME, family.PRIORITY

    def not_supported_reasons(self, request: KernelRequest, auto: bool = False) -> list[str]:
        if self.NAME == "reference":
            return []
        reasons = self.family.not_supported_reasons(request, auto=auto)
        if request.only_reference:
            reasons.append(f"{request.only_reference}: only the reference kernel computes it")
        if request.needs_grad:
            reasons.append(f"{self.NAME} kernels are not differentiable and an input requires grad")
        return reasons


CANDIDATES = tuple(_OpKernels(f) for f in KERNEL_FAMILIES.values())


def _auto_reasons(cand: _OpKernels, request: KernelRequest) -> list[str]:
    reasons = cand.not_supported_reasons(request, auto=True)
    if cand.NAME == "cpp" and not request.cpp_default:
        reasons.append(f"the C++ kernel of {request.op} does not beat torch (benchmarks/results/ops.md); pass "
                       "kernels='cpp' to use it anyway")
    return reasons


def select(op: str, tensors, kernels: str | None, cpp_default: bool, only_reference: str | None = None) -> str:
    """The kernel family to run, per the rules above."""
    request = KernelRequest(op, tuple(tensors), cpp_default, only_reference)
    if kernels is None and tracing(tensors):
        return "reference"
    return run_priority_list("kernel family", CANDIDATES, request, kernels, auto_reasons=_auto_reasons,
                             context=op).NAME


def kernel(op: str, family: str) -> Callable:
    """`vitx_fast.kernels.<family>.<op>.<op>`, imported on first use (triton only when asked for)."""
    return getattr(importlib.import_module(f"vitx_fast.kernels.{family}.{op}"), op)


def run(op: str, tensors, kernels: str | None, cpp_default: bool, only_reference: str | None = None) -> Callable:
    """Select, record and return the kernel to call."""
    name = select(op, tensors, kernels, cpp_default, only_reference)
    _LAST[op] = name
    return kernel(op, name)


def not_supported_reasons(family: str, tensors) -> list[str]:
    """Why kernel family `family` cannot run on these inputs (empty: it can)."""
    if family not in KERNEL_FAMILIES:
        return [f"unknown kernel family {family!r}; choose one of {tuple(KERNEL_FAMILIES)}"]
    cand = next(c for c in CANDIDATES if family == c.NAME)
    return cand.not_supported_reasons(KernelRequest("op", tuple(tensors), True))


def last_kernels(op: str) -> str | None:
    """The kernel family the last call of `op` used ("reference", "cpp" or "triton"); None before the first call."""
    return _LAST.get(op)


def reset_record() -> None:
    _LAST.clear()


def availability() -> dict[str, str | None]:
    """family -> None when it can run somewhere on this machine, else why not (for `vitx info`)."""
    return {name: fam.machine_reason() for name, fam in KERNEL_FAMILIES.items()}
