"""masked_variant_attention: ReciproCAM's collapsed attention of one pooled query per variant (specs/reciprocam.md §6,
steps 3-5), every backend against the float64 reference, which is itself checked against the uncollapsed softmax over
all T keys of the masked LN1 output."""
import importlib
import math
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

OP = "masked_variant_attention"
# (B, T, H, d, N, A): T = 5 with A = 5 has variants with no zeroed token (log_nz = -inf); A up to 14 with padding
SHAPES = [(1, 5, 1, 7, 4, 5), (3, 17, 3, 7, 9, 10), (1, 50, 6, 16, 20, 14), (3, 261, 3, 7, 12, 14),
          (1, 197, 6, 64, 30, 11)]
TRITON_SHAPES = [(1, 5, 1, 7, 4, 5), (3, 17, 3, 7, 5, 10), (1, 50, 2, 7, 6, 14)]
MASK_VALUES = (1.0, 1 / 4, 1 / 8, 1 / 16)  # the Gaussian mask's weights (§2)


def collapse(weights: torch.Tensor, A: int, gen: torch.Generator):
    """Full mask table (N, T) -> idx, m, valid (N, A) (active tokens first, in token order; padded slots hold random
    indices and m = 0) and log_nz (N,)."""
    N, T = weights.shape
    idx = torch.randint(0, T, (N, A), generator=gen)
    m = torch.zeros(N, A, dtype=weights.dtype)
    valid = torch.zeros(N, A, dtype=torch.bool)
    for n in range(N):
        act = weights[n].nonzero().flatten()
        assert len(act) <= A
        idx[n, :len(act)], m[n, :len(act)], valid[n, :len(act)] = act, weights[n, act], True
    nz = (weights == 0).sum(1).to(weights.dtype)
    log_nz = torch.where(nz > 0, nz.clamp(min=1).log(), torch.full_like(nz, -math.inf))
    return idx, m, valid, log_nz


def random_weights(N, T, A, gen):
    """Each variant keeps 1..min(A, T) random tokens with Gaussian-mask weights; the first one keeps min(A, T)."""
    W = torch.zeros(N, T, dtype=torch.float64)
    for n in range(N):
        c = min(A, T) if n == 0 else int(torch.randint(1, min(A, T) + 1, (), generator=gen))
        tokens = torch.randperm(T, generator=gen)[:c]
        W[n, tokens] = torch.tensor(MASK_VALUES, dtype=torch.float64)[torch.randint(0, 4, (c,), generator=gen)]
    return W


def gaussian_weights(P, h, w):
    """The ReciproCAM Gaussian table with cls_token=True: prefix rows 1, a truncated 3x3 kernel around patch k."""
    G = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))
    W = torch.zeros(h * w, P + h * w, dtype=torch.float64)
    W[:, :P] = 1
    for i in range(h):
        for j in range(w):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        W[i * w + j, P + (i + di) * w + j + dj] = G[di + 1][dj + 1]
    return W


def make_inputs(B, T, H, d, N, A, dtype=torch.float64, seed=0, weights=None):
    gen = torch.Generator().manual_seed(seed)
    W = random_weights(N, T, A, gen) if weights is None else weights
    idx, m, valid, log_nz = collapse(W, A, gen)
    q = 0.5 * torch.randn(B, N, H, d, generator=gen, dtype=torch.float64)  # already times the scale
    pk, pv = (torch.randn(B, T, H, d, generator=gen, dtype=torch.float64) for _ in range(2))
    bk, bv = (torch.randn(H, d, generator=gen, dtype=torch.float64) for _ in range(2))
    f = [x.to(dtype) for x in (q, pk, pv, m, log_nz, bk, bv)]
    return [f[0], f[1], f[2], idx, f[3], valid, f[4], f[5], f[6]], W


def random_shape(seed):
    rng = random.Random(seed)
    T = rng.randint(2, 90)
    shape = (rng.choice([1, 2, 3]), T, rng.choice([1, 2, 3, 6]), rng.choice([1, 3, 7, 16, 33]), rng.randint(1, 12),
             rng.randint(1, 14))
    return shape, rng.choice([torch.float32, torch.float64])


def uncollapsed(q, pk, pv, W, bk, bv):
    """The masked block's pooled row as the reference path computes it (§5): keys and values of all T masked tokens,
    k_t = W_t pk_t + bk, v_t = W_t pv_t + bv, and a softmax over T keys. W: (N, T)."""
    k = W[None, :, :, None, None] * pk[:, None] + bk  # (B, N, T, H, d)
    v = W[None, :, :, None, None] * pv[:, None] + bv
    probs = torch.einsum("bnhd,bnthd->bnht", q, k).softmax(-1)
    return torch.einsum("bnht,bnthd->bnhd", probs, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl, shape", impl_cases(SHAPES, TRITON_SHAPES, "BTHdNA"))
def test_matches_reference(impl, shape, dtype):
    args, _ = make_inputs(*shape, dtype=dtype)
    assert_close_to_baseline(kernel(OP, impl)(*args), args, OP, f"{impl} {shape}")


@pytest.mark.parametrize("impl, seed", seed_cases(8, 3))
def test_random_shapes(impl, seed):
    shape, dtype = random_shape(seed)
    args, _ = make_inputs(*shape, dtype=dtype, seed=seed)
    assert_close_to_baseline(kernel(OP, impl)(*args), args, OP, f"{impl} {shape} {dtype}")


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("grid", [(3, 5), (2, 2)], ids=["grid3x5-P1", "grid2x2-P2"])
def test_gaussian_mask_table_matches_uncollapsed_attention(impl, grid):
    """On the real Gaussian table (a 2x2 grid has variants with no zeroed token), every backend equals the softmax
    over all T keys: the collapse of the zero group into one entry with logit <q, bk> + ln n_z is exact."""
    P = 1 if grid == (3, 5) else 2
    W = gaussian_weights(P, *grid)
    N, T = W.shape
    args, _ = make_inputs(2, T, 3, 7, N, P + 9 + 1, weights=W, seed=6)
    q, pk, pv, *_, bk, bv = args
    torch.testing.assert_close(kernel(OP, impl)(*args), uncollapsed(q, pk, pv, W, bk, bv), rtol=1e-12, atol=1e-12)


def test_reference_matches_uncollapsed_attention_on_random_tables():
    args, W = make_inputs(3, 17, 3, 7, 9, 10, seed=7)
    q, pk, pv, *_, bk, bv = args
    torch.testing.assert_close(kernel(OP, "reference")(*args), uncollapsed(q, pk, pv, W, bk, bv), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_deterministic(impl):
    args, _ = make_inputs(3, 17, 3, 7, 5, 10, dtype=torch.float32, seed=1)
    fn = kernel(OP, impl)
    assert torch.equal(fn(*args), fn(*args))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_padded_slots_are_never_read(impl):
    """Out-of-range indices in padded slots change nothing (the reference redirects them, the kernels mask them)."""
    args, _ = make_inputs(2, 17, 3, 7, 6, 12, seed=3)
    idx, valid = args[3], args[5]
    assert (~valid).any()
    garbage = idx.masked_fill(~valid, 10**9)
    out = kernel(OP, impl)(*args[:3], garbage, *args[4:])
    torch.testing.assert_close(out, kernel(OP, "reference")(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.native
@pytest.mark.skipif(not _ext.is_available(), reason="native module not built")
def test_cpp_result_does_not_depend_on_thread_count():
    """The C++ kernel splits work by torch.get_num_threads(); every output entry keeps its summation order."""
    args, _ = make_inputs(3, 17, 3, 7, 5, 10, dtype=torch.float32, seed=1)
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
    """Inputs inside NaN-filled (or garbage-filled) buffers: any read past an edge would make the output NaN."""
    args, _ = make_inputs(2, 17, 3, 7, 6, 12, seed=2)
    out = kernel(OP, impl)(*[nan_padded(x) for x in args])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, kernel(OP, "reference")(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", FAST_IMPL_PARAMS)
def test_strided_inputs(impl):
    """pk and pv as slices of a (B, T, 3, H, d) qkv projection, as the fused ReciproCAM path produces them."""
    args, _ = make_inputs(2, 17, 3, 7, 6, 12, seed=4)
    q, pk, pv = args[:3]
    qkv = torch.stack([torch.full_like(pk, float("nan")), pk, pv], dim=2)
    out = kernel(OP, impl)(q, qkv[:, :, 1], qkv[:, :, 2], *args[3:])
    torch.testing.assert_close(out, kernel(OP, "reference")(*args), rtol=1e-12, atol=1e-12)


def test_shape_errors_are_readable():
    args, _ = make_inputs(2, 17, 3, 7, 6, 12)
    q, pk, pv, idx, m, valid, log_nz, bk, bv = args
    with pytest.raises(ValueError, match=r"pv must have shape \(B, T, H, d\) = \(2, 17, 3, 7\)"):
        ops.masked_variant_attention(q, pk, pv[:, :16], idx, m, valid, log_nz, bk, bv)
    with pytest.raises(ValueError, match=r"masked_variant_attention: m must have shape \(N, A\) = \(6, 12\)"):
        ops.masked_variant_attention(q, pk, pv, idx, m[:, :11], valid, log_nz, bk, bv)
    with pytest.raises(ValueError, match="masked_variant_attention: idx must be int64"):
        ops.masked_variant_attention(q, pk, pv, idx.int(), m, valid, log_nz, bk, bv)
    with pytest.raises(ValueError, match="masked_variant_attention: valid must be bool"):
        ops.masked_variant_attention(q, pk, pv, idx, m, valid.to(torch.uint8), log_nz, bk, bv)
    bad = idx.clone()
    bad[0, 0] = 17
    with pytest.raises(ValueError, match=r"valid entries of idx must lie in \[0, T\) = \[0, 17\)"):
        ops.masked_variant_attention(q, pk, pv, bad, m, valid, log_nz, bk, bv)


@pytest.mark.native
@pytest.mark.skipif(not _ext.is_available(), reason="native module not built")
def test_binding_validates():
    args, _ = make_inputs(2, 17, 3, 7, 6, 12, dtype=torch.float32)
    arrays = [x.numpy() for x in args]
    C, out = _ext._C, np.empty((2, 6, 3, 7), dtype=np.float32)
    with pytest.raises(ValueError, match=r"masked_variant_attention: bk must have shape \(H, d\) = \(3, 7\), got"):
        C.masked_variant_attention(*arrays[:7], np.ascontiguousarray(arrays[7][:, :6]), arrays[8], out)
    with pytest.raises(ValueError, match=r"masked_variant_attention: log_nz must have the dtype of q \(float32\)"):
        C.masked_variant_attention(*arrays[:6], arrays[6].astype(np.float64), *arrays[7:], out)
    bad = arrays[3].copy()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match=r"masked_variant_attention: valid entries of idx must lie in \[0, T\)"):
        C.masked_variant_attention(*arrays[:3], bad, *arrays[4:], out)
    with pytest.raises(ValueError, match="masked_variant_attention: out must be C-contiguous"):
        C.masked_variant_attention(*arrays, np.asfortranarray(out))


def test_explicit_impl_refusals(monkeypatch):
    args, _ = make_inputs(1, 5, 1, 3, 2, 3, dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown implementation"):
        ops.masked_variant_attention(*args, kernels="numba")
    half = [x.half() if x.is_floating_point() else x for x in args]
    with pytest.raises(ValueError, match="cpp supports float32 and float64, got torch.float16"):
        ops.masked_variant_attention(*half, kernels="cpp")
    with pytest.raises(ValueError, match="not differentiable"):
        ops.masked_variant_attention(args[0].clone().requires_grad_(True), *args[1:], kernels="cpp")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton runs on CUDA tensors"):
        ops.masked_variant_attention(*args, kernels="triton")
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "ImportError: simulated")
    with pytest.raises(ValueError, match="native module vitx_fast._C is not available .*simulated"):
        ops.masked_variant_attention(*args, kernels="cpp")


def test_auto_dispatch_records_the_impl(monkeypatch):
    """On CPU, auto dispatch picks cpp only when the op is listed as beating torch (CPP_DEFAULT) and the native module
    loaded; float16 and autograd always get the reference."""
    args, _ = make_inputs(1, 5, 1, 3, 2, 3, dtype=torch.float32)
    module = importlib.import_module(f"vitx_fast.ops.{OP}")
    assert ops.cpp_defaults()[OP] is module.CPP_DEFAULT
    outs = []
    for listed in (True, False):
        monkeypatch.setattr(module, "CPP_DEFAULT", listed)
        outs.append(ops.masked_variant_attention(*args))
        assert ops.last_kernels(OP) == ("cpp" if listed and _ext.is_available() else "reference")
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(module, "CPP_DEFAULT", True)
    ops.masked_variant_attention(*[x.half() if x.is_floating_point() else x for x in args])
    assert ops.last_kernels(OP) == "reference"  # no fast kernel for float16 on CPU
    ops.masked_variant_attention(args[0].clone().requires_grad_(True), *args[1:]).sum().backward()
    assert ops.last_kernels(OP) == "reference"  # autograd needs the differentiable path


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_cuda_dispatches_to_triton(dtype):
    pytest.importorskip("triton")
    args, _ = make_inputs(8, 197, 12, 64, 196, 11, dtype=dtype, weights=gaussian_weights(1, 14, 14))
    args = [x.cuda() for x in args]
    out = ops.masked_variant_attention(*args)
    assert ops.last_kernels(OP) == "triton"
    expected = kernel(OP, "reference")(*to64(args))
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
