"""Shared machinery of the fused-op tests: kernel-family params, inputs in NaN-padded buffers, and the dtype-aware
"no worse than torch" comparison (flash-attention's rule: err(kernel) <= 2 * err(torch in the same dtype), both
measured against the float64 reference, with a small floor)."""
from __future__ import annotations

import importlib

import pytest
import torch
from utils import family_marks

# every kernel family, with a skip mark where this machine cannot run it (cpp: the native module; triton: triton and
# TRITON_INTERPRET=1 for CPU tensors)
FAMILIES = ("reference", "cpp", "triton")
FAST_FAMILIES = ("cpp", "triton")
IMPL_PARAMS = [pytest.param(f, id=f, marks=family_marks(f)) for f in FAMILIES]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]

# floor of the allowed error, in units of max|expected|: a few ulps of accumulated rounding
FLOOR = {torch.float32: 64 * torch.finfo(torch.float32).eps, torch.float64: 64 * torch.finfo(torch.float64).eps}


def kernel(op: str, impl: str):
    """The kernel function of one backend, `vitx_fast.kernels.<impl>.<op>.<op>`."""
    return getattr(importlib.import_module(f"vitx_fast.kernels.{impl}.{op}"), op)


def reference(op: str):
    return kernel(op, "reference")


def to64(args):
    return [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]


def assert_close_to_baseline(actual: torch.Tensor, args, op: str, what: str = "") -> None:
    """`actual` (computed from `args` in their dtype) against the float64 reference, allowing twice the error of the
    reference run in the same dtype plus FLOOR * max|expected|. On failure: worst index, share of failing entries and
    NaN/inf mismatches."""
    ref = reference(op)
    expected = ref(*to64(args))
    baseline = ref(*args).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == args[0].dtype, f"{what}: dtype {actual.dtype} != {args[0].dtype}"
    a = actual.double()
    nan_a, nan_e = ~torch.isfinite(a), ~torch.isfinite(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: non-finite mismatch at {int((nan_a ^ nan_e).sum())} entries"
    fin = ~nan_e
    if not fin.any():
        return
    err = (a - expected).abs().where(fin, torch.zeros((), dtype=a.dtype))
    base_err = (baseline - expected).abs().where(fin, torch.zeros((), dtype=a.dtype))
    scale = float(expected[fin].abs().max().clamp(min=1e-30))
    tol = 2 * float(base_err.max()) + FLOOR[args[0].dtype] * scale
    if float(err.max()) > tol:
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        frac = float((err > tol).double().mean()) * 100
        raise AssertionError(f"{what}: max error {float(err.max()):.3e} > tol {tol:.3e} (2 x torch error "
                             f"{float(base_err.max()):.3e} + floor) at {worst}: got {float(a[worst]):.9g}, expected "
                             f"{float(expected[worst]):.9g}; {frac:.2f}% of entries fail")


def nan_padded(t: torch.Tensor, pad: int = 37) -> torch.Tensor:
    """A contiguous copy of `t` inside a larger buffer filled with NaN (floats) or garbage (ints, bools) on both sides:
    a kernel reading out of bounds turns the result NaN or wrong."""
    n = t.numel()
    if t.is_floating_point():
        buf = torch.full((n + 2 * pad,), float("nan"), dtype=t.dtype)
    elif t.dtype == torch.bool:
        buf = torch.ones(n + 2 * pad, dtype=torch.bool)
    else:
        buf = torch.full((n + 2 * pad,), 2**40, dtype=t.dtype)
    view = buf[pad:pad + n].view(t.shape)
    view.copy_(t)
    return view
