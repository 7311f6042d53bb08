"""agcam_epilogue: out[b, t] = sum_{l,h} ReLU(<delta[b,l,h], v[b,l,h,t]>) * sigmoid(s[b,l,h,t]) (specs/agcam.md §6),
every backend against the float64 reference, which is itself checked against autograd and a literal loop."""
import importlib
import random

import numpy as np
import pytest
import torch
from ops_utils import (
    DTYPES,
    FAST_IMPL_PARAMS,
    IMPL_PARAMS,
    assert_close_to_baseline,
    impl_cases,
    kernel,
    nan_padded,
    seed_cases,
    to64,
)

import vitx_fast.ops as ops
from vitx_fast import _ext

OP = "agcam_epilogue"
# (B, L, H, T, d): odd token counts (registers: 261), 1/3/6 heads, odd head dims
SHAPES = [(1, 1, 1, 5, 7), (3, 2, 3, 17, 7), (1, 2, 6, 50, 16), (3, 1, 3, 261, 7), (1, 3, 6, 197, 64)]
# the Triton interpreter runs every program in Python: fewer, smaller cases
TRITON_SHAPES = [(1, 1, 1, 5, 7), (3, 2, 3, 17, 7), (1, 1, 3, 261, 7)]


def make_inputs(B, L, H, T, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(B, L, H, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, L, H, T, d, generator=g, dtype=torch.float64)
    s = 3 * torch.randn(B, L, H, T, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (delta, v, s)]


def random_shape(seed):
    rng = random.Random(seed)
    shape = (rng.choice([1, 2, 3]), rng.randint(1, 3), rng.choice([1, 2, 3, 6]), rng.randint(1, 90),
             rng.choice([1, 3, 7, 16, 33]))
    return shape, rng.choice([torch.float32, torch.float64])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl, shape", impl_cases(SHAPES, TRITON_SHAPES, "BLHTd"))
def test_matches_reference(impl, shape, dtype):
    args = make_inputs(*shape, dtype=dtype)
    assert_close_to_baseline(kernel(OP, impl)(*args), args, OP, f"{impl} {shape}")


# seeded random shapes: 8 per backend, 3 under the Triton interpreter
@pytest.mark.parametrize("impl, seed", seed_cases(8, 3))
def test_random_shapes(impl, seed):
    shape, dtype = random_shape(seed)
    args = make_inputs(*shape, dtype=dtype, seed=seed)
    assert_close_to_baseline(kernel(OP, impl)(*args), args, OP, f"{impl} {shape} {dtype}")


def test_reference_is_the_agcam_formula():
    """The reference equals AGCAM as the paper computes it: G = dy/dA on the CLS row through ctx = A @ V with
    delta = dy/dctx (autograd), then a literal loop over layers and heads of ReLU(G) * sigmoid(s)."""
    B, L, H, T, d = 2, 3, 2, 9, 5
    delta, v, s = make_inputs(B, L, H, T, d, seed=3)
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for layer in range(L):
            for h in range(H):
                probs = torch.softmax(torch.randn(T, T, dtype=torch.float64), -1).requires_grad_(True)
                y = (delta[b, layer, h] * (probs @ v[b, layer, h])[0]).sum()  # only the CLS row of ctx reaches y
                (grad,) = torch.autograd.grad(y, probs)
                out[b] += torch.relu(grad[0]) * torch.sigmoid(s[b, layer, h])
    torch.testing.assert_close(kernel(OP, "reference")(delta, v, s), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_deterministic(impl):
    args = make_inputs(3, 2, 3, 17, 7, dtype=torch.float32, seed=1)
    fn = kernel(OP, impl)
    assert torch.equal(fn(*args), fn(*args))


@pytest.mark.native
@pytest.mark.skipif(not _ext.is_available(), reason="native module not built")
def test_cpp_result_does_not_depend_on_thread_count():
    """The C++ kernel splits work by torch.get_num_threads(); every output entry keeps its summation order."""
    args = make_inputs(1, 2, 3, 50, 7, dtype=torch.float32, seed=1)  # 2, 4 and 4 token blocks
    fn, before = kernel(OP, "cpp"), torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(fn(*args))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("impl", FAST_IMPL_PARAMS)
def test_no_out_of_bounds_reads(impl):
    """Inputs inside NaN-filled buffers: any read past an edge would make the output NaN."""
    args = make_inputs(3, 2, 3, 17, 7, seed=2)
    out = kernel(OP, impl)(*[nan_padded(a) for a in args])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, kernel(OP, "reference")(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", FAST_IMPL_PARAMS)
def test_strided_inputs(impl):
    """v as the value slice of a (B, L, H, T, 3, d) qkv-like tensor whose other slices are NaN."""
    delta, v, s = make_inputs(2, 2, 3, 17, 7, seed=4)
    qkv = torch.full((*v.shape[:4], 3, v.shape[4]), float("nan"), dtype=v.dtype)
    qkv[..., 2, :] = v
    out = kernel(OP, impl)(delta, qkv[..., 2, :], s)
    torch.testing.assert_close(out, kernel(OP, "reference")(delta, v, s), rtol=1e-12, atol=1e-12)


def test_shape_errors_are_readable():
    delta, v, s = make_inputs(2, 2, 3, 5, 7)
    with pytest.raises(ValueError, match=r"agcam_epilogue: v must have shape \(B, L, H, T, d\)"):
        ops.agcam_epilogue(delta, v[..., :6], s)
    with pytest.raises(ValueError, match=r"agcam_epilogue: s must have shape \(B, L, H, T\)"):
        ops.agcam_epilogue(delta, v, s[..., :4])
    with pytest.raises(ValueError, match=r"agcam_epilogue: s must have the dtype of delta"):
        ops.agcam_epilogue(delta, v, s.float())


@pytest.mark.native
@pytest.mark.skipif(not _ext.is_available(), reason="native module not built")
def test_binding_validates():
    delta, v, s = make_inputs(2, 2, 3, 5, 7, dtype=torch.float32)
    C, out = _ext._C, torch.empty(2, 5)
    with pytest.raises(ValueError, match=r"agcam_epilogue: v must have shape \(B, L, H, T, d\) = \(2, 2, 3, \?, 7\)"):
        C.agcam_epilogue(delta.numpy(), v[..., :6].contiguous().numpy(), s.numpy(), out.numpy())
    with pytest.raises(ValueError, match="agcam_epilogue: v must be C-contiguous"):
        C.agcam_epilogue(delta.numpy(), np.asfortranarray(v.numpy()), s.numpy(), out.numpy())
    with pytest.raises(ValueError, match="agcam_epilogue: delta must be float32 or float64, got float16"):
        C.agcam_epilogue(delta.half().numpy(), v.half().numpy(), s.half().numpy(), out.half().numpy())
    with pytest.raises(ValueError, match=r"agcam_epilogue: out must have shape \(B, T\)"):
        C.agcam_epilogue(delta.numpy(), v.numpy(), s.numpy(), torch.empty(2, 6).numpy())


def test_explicit_impl_refusals(monkeypatch):
    args = make_inputs(1, 1, 2, 5, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        ops.agcam_epilogue(*args, kernels="cuda")
    with pytest.raises(ValueError, match="cpp supports float32 and float64, got torch.float16"):
        ops.agcam_epilogue(*[a.half() for a in args], kernels="cpp")
    with pytest.raises(ValueError, match="not differentiable"):
        ops.agcam_epilogue(args[0].clone().requires_grad_(True), *args[1:], kernels="cpp")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton runs on CUDA tensors"):
        ops.agcam_epilogue(*args, kernels="triton")
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "ImportError: simulated")
    with pytest.raises(ValueError, match="native module vitx_fast._C is not available .*simulated"):
        ops.agcam_epilogue(*args, kernels="cpp")


def test_auto_dispatch_records_the_impl(monkeypatch):
    """On CPU, auto dispatch picks cpp only when the op is listed as beating torch (CPP_DEFAULT) and the native module
    loaded; float16 and autograd always get the reference."""
    args = make_inputs(1, 2, 2, 5, 3, dtype=torch.float32)
    module = importlib.import_module(f"vitx_fast.ops.{OP}")
    assert ops.cpp_defaults()[OP] is module.CPP_DEFAULT
    outs = []
    for listed in (True, False):
        monkeypatch.setattr(module, "CPP_DEFAULT", listed)
        outs.append(ops.agcam_epilogue(*args))
        assert ops.last_kernels(OP) == ("cpp" if listed and _ext.is_available() else "reference")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(module, "CPP_DEFAULT", True)
    ops.agcam_epilogue(*[a.half() for a in args])
    assert ops.last_kernels(OP) == "reference"  # no fast kernel for float16 on CPU
    ops.agcam_epilogue(args[0].clone().requires_grad_(True), *args[1:]).sum().backward()
    assert ops.last_kernels(OP) == "reference"  # autograd needs the differentiable path


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_cuda_dispatches_to_triton(dtype):
    pytest.importorskip("triton")
    args = [a.cuda() for a in make_inputs(8, 12, 12, 197, 64, dtype=dtype)]
    out = ops.agcam_epilogue(*args)
    assert ops.last_kernels(OP) == "triton"
    expected = kernel(OP, "reference")(*to64(args))
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
