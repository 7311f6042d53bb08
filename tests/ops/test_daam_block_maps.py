"""daam_block_maps: out[b, l, t] = ReLU(sum_h a[b,l,h,t] * <v[b,l,h,t], g[b,l,h]>) (specs/daam.md §4, §7), every
backend against the float64 reference, which is itself checked against the spec's spatial-feature form."""
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

OP = "daam_block_maps"
# (B, L, H, T, d): odd token counts (registers: 261), 1/3/6 heads, odd head dims
SHAPES = [(1, 1, 1, 5, 7), (3, 2, 3, 17, 7), (1, 2, 6, 50, 16), (3, 1, 3, 261, 7), (1, 3, 6, 197, 64)]
TRITON_SHAPES = [(1, 1, 1, 5, 7), (3, 2, 3, 17, 7), (1, 1, 3, 261, 7)]


def make_inputs(B, L, H, T, d, dtype=torch.float64, seed=0):
    """Softmax rows for a, and coefficients of both signs (SSL mode does not ReLU them), so the ReLU bites."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.softmax(2 * torch.randn(B, L, H, T, generator=gen, dtype=torch.float64), -1)
    v = torch.randn(B, L, H, T, d, generator=gen, dtype=torch.float64)
    g = torch.randn(B, L, H, d, generator=gen, dtype=torch.float64)
    return [x.to(dtype) for x in (a, v, g)]


def random_shape(seed):
    rng = random.Random(seed)
    shape = (rng.choice([1, 2, 3]), rng.randint(1, 3), rng.choice([1, 2, 3, 6]), rng.randint(1, 90),
             rng.choice([1, 3, 7, 16, 33]))
    return shape, rng.choice([torch.float32, torch.float64])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl, shape", impl_cases(SHAPES, TRITON_SHAPES, "BLHTd"))
def test_matches_reference(impl, shape, dtype):
    args = make_inputs(*shape, dtype=dtype)
    out = kernel(OP, impl)(*args)
    assert_close_to_baseline(out, args, OP, f"{impl} {shape}")
    assert (out == 0).any() and (out > 0).any()  # the inputs exercise both sides of the ReLU


@pytest.mark.parametrize("impl, seed", seed_cases(8, 3))
def test_random_shapes(impl, seed):
    shape, dtype = random_shape(seed)
    args = make_inputs(*shape, dtype=dtype, seed=seed)
    assert_close_to_baseline(kernel(OP, impl)(*args), args, OP, f"{impl} {shape} {dtype}")


def test_reference_is_the_spatial_feature_form():
    """specs/daam.md §4: M = ReLU(sum_e g[e] S[t, e]) with S[t, h*d + e] = a[h, t] v[h, t, e] materialised, and
    summed over all tokens the pre-ReLU map is <g, O[0]> with O[0] = sum_t S[t] the CLS row of the attention output."""
    B, L, H, T, d = 2, 3, 2, 9, 5
    a, v, g = make_inputs(B, L, H, T, d, seed=5)
    S = (a.unsqueeze(-1) * v).permute(0, 1, 3, 2, 4).reshape(B, L, T, H * d)  # (B, L, T, D), heads concatenated
    C = g.reshape(B, L, H * d)
    pre = (C.unsqueeze(2) * S).sum(-1)
    torch.testing.assert_close(kernel(OP, "reference")(a, v, g), torch.relu(pre), rtol=1e-12, atol=1e-12)
    ctx0 = torch.einsum("blht,blhtd->blhd", a, v).reshape(B, L, H * d)  # softmax(q0 K^T) V, CLS row
    torch.testing.assert_close(pre.sum(-1), (ctx0 * C).sum(-1), rtol=1e-12, atol=1e-12)


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
    out = kernel(OP, impl)(*[nan_padded(x) for x in args])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, kernel(OP, "reference")(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", FAST_IMPL_PARAMS)
def test_strided_inputs(impl):
    """v as the value slice of a (B, L, H, T, 3, d) qkv-like tensor whose other slices are NaN; a transposed a."""
    a, v, g = make_inputs(2, 2, 3, 17, 7, seed=4)
    qkv = torch.full((*v.shape[:4], 3, v.shape[4]), float("nan"), dtype=v.dtype)
    qkv[..., 2, :] = v
    a_t = a.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = kernel(OP, impl)(a_t, qkv[..., 2, :], g)
    torch.testing.assert_close(out, kernel(OP, "reference")(a, v, g), rtol=1e-12, atol=1e-12)


def test_shape_errors_are_readable():
    a, v, g = make_inputs(2, 2, 3, 5, 7)
    with pytest.raises(ValueError, match=r"daam_block_maps: v must have shape \(B, L, H, T, d\) = \(2, 2, 3, 5, \?\)"):
        ops.daam_block_maps(a, v[..., :4, :], g)
    with pytest.raises(ValueError, match=r"daam_block_maps: g must have shape \(B, L, H, d\)"):
        ops.daam_block_maps(a, v, g[..., :6])
    with pytest.raises(ValueError, match=r"daam_block_maps: v must have the dtype of a"):
        ops.daam_block_maps(a, v.float(), g)


@pytest.mark.native
@pytest.mark.skipif(not _ext.is_available(), reason="native module not built")
def test_binding_validates():
    a, v, g = make_inputs(2, 2, 3, 5, 7, dtype=torch.float32)
    C, out = _ext._C, torch.empty(2, 2, 5)
    with pytest.raises(ValueError, match=r"daam_block_maps: g must have shape \(B, L, H, d\) = \(2, 2, 3, 7\)"):
        C.daam_block_maps(a.numpy(), v.numpy(), g[..., :6].contiguous().numpy(), out.numpy())
    with pytest.raises(ValueError, match="daam_block_maps: v must be C-contiguous"):
        C.daam_block_maps(a.numpy(), np.asfortranarray(v.numpy()), g.numpy(), out.numpy())
    with pytest.raises(ValueError, match=r"daam_block_maps: out must have the dtype of a \(float32\), got float64"):
        C.daam_block_maps(a.numpy(), v.numpy(), g.numpy(), out.double().numpy())


def test_explicit_impl_refusals(monkeypatch):
    args = make_inputs(1, 1, 2, 5, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown implementation"):
        ops.daam_block_maps(*args, kernels="fast")
    with pytest.raises(ValueError, match="cpp supports float32 and float64, got torch.bfloat16"):
        ops.daam_block_maps(*[x.bfloat16() for x in args], kernels="cpp")
    with pytest.raises(ValueError, match="not differentiable"):
        ops.daam_block_maps(*args[:2], args[2].clone().requires_grad_(True), kernels="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton runs on CUDA tensors"):
        ops.daam_block_maps(*args, kernels="triton")
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "ImportError: simulated")
    with pytest.raises(ValueError, match="native module vitx_fast._C is not available .*simulated"):
        ops.daam_block_maps(*args, kernels="cpp")


def test_auto_dispatch_records_the_impl(monkeypatch):
    """On CPU, auto dispatch picks cpp only when the op is listed as beating torch (CPP_DEFAULT) and the native module
    loaded; float16 and autograd always get the reference."""
    args = make_inputs(1, 2, 2, 5, 3, dtype=torch.float32)
    module = importlib.import_module(f"vitx_fast.ops.{OP}")
    assert ops.cpp_defaults()[OP] is module.CPP_DEFAULT
    outs = []
    for listed in (True, False):
        monkeypatch.setattr(module, "CPP_DEFAULT", listed)
        outs.append(ops.daam_block_maps(*args))
        assert ops.last_kernels(OP) == ("cpp" if listed and _ext.is_available() else "reference")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(module, "CPP_DEFAULT", True)
    ops.daam_block_maps(*[x.half() for x in args])
    assert ops.last_kernels(OP) == "reference"  # no fast kernel for float16 on CPU
    ops.daam_block_maps(*args[:2], args[2].clone().requires_grad_(True)).sum().backward()
    assert ops.last_kernels(OP) == "reference"  # autograd needs the differentiable path


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_cuda_dispatches_to_triton(dtype):
    pytest.importorskip("triton")
    args = [x.cuda() for x in make_inputs(8, 12, 12, 197, 64, dtype=dtype)]
    out = ops.daam_block_maps(*args)
    assert ops.last_kernels(OP) == "triton"
    expected = kernel(OP, "reference")(*to64(args))
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
