"""Backends: which implementation of a method runs, and with which kernel family.

    backend      implementation   fused-op kernels
    triton       fast             triton (CUDA)
    cpp          fast             cpp (C++/OpenMP, CPU)
    fused        fast             chosen per op (triton on CUDA, cpp on CPU where it beats torch, else torch)
    reference    reference        - (plain PyTorch, reads like the paper; accepts every layout the method accepts)

Selection: an explicit `backend=` argument > `set_backend(...)` > the VITX_FAST_BACKEND variable > the priority walk
of `vitx_fast.engine.dispatch` (triton, cpp, fused, reference). A kernel backend whose kernels do not beat torch is
used only when asked for by name.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from vitx_fast.engine.dispatch import KERNEL_FAMILIES, Candidate, run_priority_list


@dataclass(frozen=True)
class ExplainRequest:
    """What a backend is asked to serve: a method (duck-typed `vitx_fast.methods.base.Method`), the adapted model
    (None: only what can be known without one) and the resolved options."""

    method: Any
    adapter: Any
    opts: dict

    @property
    def device(self) -> torch.device:
        return self.adapter.device if self.adapter is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.dtype if self.adapter is not None else torch.float32


class Backend(Candidate):
    """A method implementation (ALGORITHM) run with one kernel family for its fused ops (KERNELS; None: per op)."""

    ALGORITHM: ClassVar[str]
    KERNELS: ClassVar[str | None] = None

    def implementation(self, method):
        return method.implementations.get(self.ALGORITHM)

    def not_supported_reasons(self, request: ExplainRequest, auto: bool = False) -> list[str]:
        reasons = []
        family = KERNEL_FAMILIES[self.KERNELS] if self.KERNELS is not None else None
        if request.adapter is None:  # no model: only whether this machine can run the backend at all
            why = family.machine_reason() if family is not None else None
            reasons += [why] if why else []
        elif family is not None:
            reasons += family.not_supported_reasons(request, auto=auto)
        else:
            reasons += super().not_supported_reasons(request)
        impl = self.implementation(request.method)
        if impl is None:
            reasons.append(f"{request.method.name} has no {self.ALGORITHM} implementation")
        else:
            reasons += impl.not_supported_reasons(request.adapter, request.opts, kernels=self.KERNELS, auto=auto)
        return reasons


class TritonBackend(Backend):
    """The fast path with every fused op run by its Triton kernel (CUDA)."""

    NAME, PRIORITY, ALGORITHM, KERNELS = "triton", 10, "fast", "triton"


class CppBackend(Backend):
    """The fast path with every fused op run by its C++ kernel (CPU, float32/float64); chosen automatically only
    where every kernel it uses beats torch (benchmarks/results/ops.md)."""

    NAME, PRIORITY, ALGORITHM, KERNELS = "cpp", 20, "fast", "cpp"


class FusedBackend(Backend):
    """The fast path: exact algebraic fusions in torch; each fused op picks its kernel by device and speed."""

    NAME, PRIORITY, ALGORITHM = "fused", 50, "fast"


class ReferenceBackend(Backend):
    """Plain PyTorch, readable like the papers; accepts every layout the method accepts. Always last."""

    NAME, PRIORITY, ALGORITHM = "reference", 100, "reference"


BACKENDS: dict[str, Backend] = {b.NAME: b for b in (TritonBackend(), CppBackend(), FusedBackend(), ReferenceBackend())}
_override: list[str] = []


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available backends: {list_backends()}")
    return BACKENDS[name]


def list_backends() -> list[str]:
    return [b.NAME for b in sorted(BACKENDS.values(), key=lambda b: b.PRIORITY)]


def requested_backend(explicit: str | None) -> str | None:
    """The backend the caller asked for: argument > set_backend > VITX_FAST_BACKEND; None: choose automatically."""
    if explicit is not None:
        return explicit
    if _override:
        return _override[-1]
    return os.environ.get("VITX_FAST_BACKEND") or None


@contextlib.contextmanager
def set_backend(name: str) -> Iterator[None]:
    """Use backend `name` for every `explain` call inside the block (an explicit backend= still wins)."""
    get_backend(name)
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def select_backend(method, adapter, opts: dict, backend: str | None = None) -> Backend:
    """The backend that runs `method`; ValueError when an explicit choice cannot serve (with its reasons),
    NoCandidateError (a NotImplementedError) listing every backend's reasons when nothing can."""
    request = ExplainRequest(method, adapter, opts)
    return run_priority_list("backend", list(BACKENDS.values()), request, requested_backend(backend),
                             auto_reasons=lambda cand, req: cand.not_supported_reasons(req, auto=True),
                             context=method.name)


def support_matrix(methods, adapter=None) -> dict[str, dict[str, list[str]]]:
    """method name -> backend -> reasons it cannot serve (empty: it can), for `vitx info`.
    methods: Method objects; adapter: None (what can be known without a model) or a ViTAdapter."""
    out: dict[str, dict[str, list[str]]] = {}
    for m in methods:
        opts = dict(m.options)
        request = ExplainRequest(m, adapter, opts)
        model_reasons = m.not_supported_reasons(adapter, opts) if adapter is not None else []
        out[m.name] = {be.NAME: model_reasons + be.not_supported_reasons(request)
                       for be in sorted(BACKENDS.values(), key=lambda b: b.PRIORITY)}
    return out
