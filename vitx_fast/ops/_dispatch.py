"""Pick the implementation of a fused op: an explicit `impl=` is validated, otherwise device and availability decide.

    impl=None:  CUDA tensor + triton importable           -> "triton"
                CPU tensor + native module loaded + the op's C++ kernel beats torch (CPP_DEFAULT in the op module,
                measured by benchmarks/bench_ops.py, see benchmarks/results/ops.md) -> "cpp"
                anything else (other dtypes, autograd, ...) -> "reference"
    impl="reference" | "cpp" | "triton": used as asked, or ValueError listing why it cannot serve.

The implementation that ran last is recorded per op (`last_impl`), so tests can assert which one ran.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Callable

import torch

from vitx_fast import _ext

IMPLS = ("reference", "cpp", "triton")
CPP_DTYPES = (torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_LAST: dict[str, str] = {}
_FORCED: list[str] = []  # set by the cpp / triton backends for the duration of one explain call
_TRITON_ERROR: list[str | None] = []  # memo of the triton import check: [] = not checked yet


def triton_import_error() -> str | None:
    """None when triton can be imported, else why not (checked once)."""
    if not _TRITON_ERROR:
        if importlib.util.find_spec("triton") is None:
            _TRITON_ERROR.append("triton is not installed")
        else:
            try:
                importlib.import_module("triton")
                _TRITON_ERROR.append(None)
            except Exception as exc:  # noqa: BLE001 - a broken install means "not available", with the reason kept
                _TRITON_ERROR.append(f"triton failed to import ({type(exc).__name__}: {exc})")
    return _TRITON_ERROR[0]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def not_supported_reasons(impl: str, tensors: list[torch.Tensor]) -> list[str]:
    """Why `impl` cannot run on these inputs (empty list: it can). tensors[0] sets the device and dtype."""
    if impl not in IMPLS:
        return [f"unknown implementation {impl!r}; choose one of {IMPLS}"]
    if impl == "reference":
        return []
    ref = tensors[0]
    reasons = []
    if _needs_grad(tensors):
        reasons.append(f"{impl} kernels are not differentiable and an input requires grad")
    if impl == "cpp":
        if not _ext.is_available():
            reasons.append(f"the native module vitx_fast._C is not available ({_ext.import_error()})")
        if ref.device.type != "cpu":
            reasons.append(f"cpp runs on CPU tensors, got device {ref.device}")
        if ref.dtype not in CPP_DTYPES:
            reasons.append(f"cpp supports float32 and float64, got {ref.dtype}")
    else:
        why = triton_import_error()
        if why is not None:
            reasons.append(why)
        if ref.device.type != "cuda" and not (ref.device.type == "cpu" and _interpreting()):
            reasons.append(f"triton runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got device {ref.device}")
        if ref.dtype not in TRITON_DTYPES:
            reasons.append(f"triton does not support dtype {ref.dtype}")
    return reasons


def tracing(tensors: list[torch.Tensor]) -> bool:
    """True under torch.export / torch.compile tracing, where only the torch reference is a traceable program."""
    if torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def select(op: str, tensors: list[torch.Tensor], impl: str | None, cpp_default: bool) -> str:
    """The implementation to run, per the rules above; raises ValueError when an explicit `impl` cannot serve."""
    if impl is None and tracing(tensors):
        return "reference"
    if impl is None and _FORCED:
        impl = _FORCED[-1]
    if impl is not None:
        reasons = not_supported_reasons(impl, tensors)
        if reasons:
            raise ValueError(f"{op}: implementation {impl!r} cannot run here: " + "; ".join(reasons))
        return impl
    device = tensors[0].device.type
    if device == "cuda" and not not_supported_reasons("triton", tensors):
        return "triton"
    if device == "cpu" and cpp_default and not not_supported_reasons("cpp", tensors):
        return "cpp"
    return "reference"


def kernel(op: str, impl: str) -> Callable:
    """`vitx_fast.kernels.<impl>.<op>.<op>`, imported on first use (triton only when asked for)."""
    return getattr(importlib.import_module(f"vitx_fast.kernels.{impl}.{op}"), op)


def run(op: str, tensors: list[torch.Tensor], impl: str | None, cpp_default: bool):
    """Select, record and return the kernel to call."""
    name = select(op, tensors, impl, cpp_default)
    fn = kernel(op, name)
    _LAST[op] = name
    return fn


@contextlib.contextmanager
def forced(impl: str):
    """Every op called inside the block runs `impl` (ValueError where it cannot)."""
    _FORCED.append(impl)
    try:
        yield
    finally:
        _FORCED.pop()


def last_impl(op: str) -> str | None:
    """The implementation the last call of `op` used ("reference", "cpp" or "triton"), None before the first call."""
    return _LAST.get(op)


def reset_record() -> None:
    _LAST.clear()


def availability() -> dict[str, str | None]:
    """impl -> None when it can run somewhere on this machine, else why not (for `vitx info`)."""
    triton_why = triton_import_error()
    if triton_why is None and not torch.cuda.is_available() and not _interpreting():
        triton_why = "no CUDA device (triton kernels run on CUDA tensors)"
    native_why = None if _ext.is_available() else f"native module not loaded ({_ext.import_error()})"
    return {"reference": None, "cpp": native_why, "triton": triton_why}
