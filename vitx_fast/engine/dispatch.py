"""One capability vocabulary and one priority walk, for every choice the engine makes.

Two choices use it: which *backend* runs a method (reference / fused / cpp / triton, `vitx_fast.engine.backends`)
and which *kernel family* runs a fused op (reference / cpp / triton, `vitx_fast.ops`). Each candidate is a small
declared object: a name, a priority, the devices and dtypes it serves, and `not_supported_reasons(request)`, which
lists *every* reason it cannot serve one request (empty: it can). `run_priority_list` validates an explicit choice
or walks the candidates in priority order; when nothing fits, the error lists each candidate's reasons on its own
line (xformers' `not_supported_reasons` / `_run_priority_list` pattern).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch

from vitx_fast import _ext

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPP_DTYPES = (torch.float32, torch.float64)


class NoCandidateError(NotImplementedError):
    """No candidate can serve the request; the message lists every candidate with its reasons."""


class Candidate:
    """Something the engine can choose: declares what it supports and explains every refusal.

    Subclasses set NAME, PRIORITY (lower is tried first) and optionally SUPPORTED_DEVICES / SUPPORTED_DTYPES, and may
    extend `not_supported_reasons`. `request` is any object with `device` (torch.device) and `dtype` attributes.
    """

    NAME: ClassVar[str]
    PRIORITY: ClassVar[int] = 100
    SUPPORTED_DEVICES: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    SUPPORTED_DTYPES: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES

    def unavailable_reason(self) -> str | None:
        """None when this candidate can run on this machine at all, else why not."""
        return None

    def not_supported_reasons(self, request: Any) -> list[str]:
        reasons = []
        why = self.unavailable_reason()
        if why is not None:
            reasons.append(why)
        device = request.device.type
        if device not in self.SUPPORTED_DEVICES:
            reasons.append(f"{self.NAME} does not run on {device!r} (supports {', '.join(self.SUPPORTED_DEVICES)})")
        if request.dtype not in self.SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.SUPPORTED_DTYPES)
            reasons.append(f"{self.NAME} does not support {str(request.dtype).removeprefix('torch.')} (supports "
                           f"{names})")
        return reasons

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.NAME}>"


def format_reasons(reasons: dict[str, list[str]]) -> str:
    """{name: reasons} -> one line per candidate, "  name: reason; reason"."""
    return "\n".join(f"  {name}: {'; '.join(rs) if rs else 'ok'}" for name, rs in reasons.items())


def run_priority_list(what: str, candidates: Sequence[Candidate], request: Any, requested: str | None = None,
                      auto_reasons=None, context: str = "here") -> Candidate:
    """The candidate that serves `request`; `what` names the kind of candidate ("backend"), `context` the request
    in messages ("rollout on this model").

    requested: a candidate name the user asked for: it is used when it can serve, else ValueError with its reasons.
    None: the first candidate by PRIORITY with no reasons; `auto_reasons(candidate, request) -> list[str]` adds reasons
    that apply only to automatic choice (e.g. a kernel that is correct here but slower than torch).
    Raises NoCandidateError listing every candidate and why when nothing fits.
    """
    by_name = {c.NAME: c for c in candidates}
    if requested is not None:
        if requested not in by_name:
            raise ValueError(f"unknown {what} {requested!r}; choose one of: {', '.join(by_name)}")
        reasons = by_name[requested].not_supported_reasons(request)
        if reasons:
            raise ValueError(f"{what} {requested!r} cannot run {context}:\n" + format_reasons({requested: reasons}))
        return by_name[requested]
    tried: dict[str, list[str]] = {}
    for cand in sorted(candidates, key=lambda c: c.PRIORITY):
        reasons = cand.not_supported_reasons(request)
        if not reasons and auto_reasons is not None:
            reasons = auto_reasons(cand, request)
        if not reasons:
            return cand
        tried[cand.NAME] = reasons
    raise NoCandidateError(f"no {what} can run {context}:\n" + format_reasons(tried))


# ---------------------------------------------------------------- kernel families
def triton_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1: tests and debugging)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: list[str | None] = []  # memo of the import check: [] = not checked yet


def triton_import_error() -> str | None:
    """None when triton can be imported, else why not (checked once; never imports CUDA-only code before)."""
    if not _TRITON_ERROR:
        if importlib.util.find_spec("triton") is None:
            _TRITON_ERROR.append("triton is not installed")
        else:
            try:
                importlib.import_module("triton")
                _TRITON_ERROR.append(None)
            except Exception as exc:
                _TRITON_ERROR.append(f"triton failed to import ({type(exc).__name__}: {exc})")
    return _TRITON_ERROR[0]


class KernelFamily(Candidate):
    """A family of kernels for the fused ops; `vitx_fast/kernels/<NAME>/<op>.py` holds its kernel of each op.
    `not_supported_reasons(request, auto=True)` adds the reasons not to choose it automatically."""

    def not_supported_reasons(self, request, auto: bool = False) -> list[str]:
        return super().not_supported_reasons(request)

    def machine_reason(self) -> str | None:
        """None when this family can run somewhere on this machine (for `vitx info`), else why not."""
        return self.unavailable_reason()


class ReferenceKernels(KernelFamily):
    """Plain torch (einsum): any device and dtype, differentiable, traceable."""

    NAME = "reference"
    PRIORITY = 100


class CppKernels(KernelFamily):
    """C++/OpenMP kernels of the native module `vitx_fast._C` (csrc/), CPU float32/float64."""

    NAME = "cpp"
    PRIORITY = 20
    SUPPORTED_DEVICES = ("cpu",)
    SUPPORTED_DTYPES = CPP_DTYPES

    def unavailable_reason(self):
        if not _ext.is_available():
            return f"the native module vitx_fast._C is not available ({_ext.import_error()})"
        return None


class TritonKernels(KernelFamily):
    """Triton kernels: CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)."""

    NAME = "triton"
    PRIORITY = 10
    SUPPORTED_DTYPES = FLOAT_DTYPES

    @property
    def SUPPORTED_DEVICES(self):
        return ("cuda", "cpu") if triton_interpreting() else ("cuda",)

    def unavailable_reason(self):
        return triton_import_error()

    def not_supported_reasons(self, request, auto: bool = False) -> list[str]:
        reasons = super().not_supported_reasons(request)
        if auto and request.device.type != "cuda":
            reasons.append("triton runs CPU tensors only through its interpreter (TRITON_INTERPRET=1, for tests): "
                           "never chosen automatically")
        return reasons

    def machine_reason(self):
        why = triton_import_error()
        if why is None and not torch.cuda.is_available() and not triton_interpreting():
            why = "no CUDA device (triton kernels run on CUDA tensors)"
        return why


KERNEL_FAMILIES: dict[str, KernelFamily] = {k.NAME: k for k in (TritonKernels(), CppKernels(), ReferenceKernels())}


def kernel_family(name: str) -> KernelFamily:
    if name not in KERNEL_FAMILIES:
        raise ValueError(f"unknown kernel family {name!r}; choose one of: {', '.join(KERNEL_FAMILIES)}")
    return KERNEL_FAMILIES[name]


# ---------------------------------------------------------------- tracing
def tracing(tensors: Iterable[torch.Tensor] = ()) -> bool:
    """True under torch.export / torch.compile tracing, where only torch code is a traceable program."""
    if torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)
