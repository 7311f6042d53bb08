"""safe_divide: out[p, k, q] = a[p, k, q] / (b[p, q] + 1e-9) * (b[p, q] != 0) (docs/methods/lrp.md §1.2 and §5). The
reference kernel is checked here against Chefer's `layers_ours.safe_divide` (tests/ports/chefer.py), and the fast
kernels for bit-equality with it, on the edge values of b; `out=` (in place, preallocated, refused aliases) and empty
inputs. Every kernel family against the reference within tolerance in tests/ops/test_op_contract.py."""
import pytest
import torch
from op_specs import safe_divide_inputs
from ops_utils import DTYPES, FAST_FAMILIES, IMPL_PARAMS, kernel
from ports.chefer import safe_divide as chefer_safe_divide
from utils import family_marks

from vitx_fast import ops

OP = "safe_divide"
FAST_PARAMS = [pytest.param(f, id=f, marks=family_marks(f)) for f in FAST_FAMILIES]
INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}
# the Triton interpreter computes with numpy, which warns on the inf * 0 = NaN these inputs are made to contain
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")


def edge_inputs(dtype, P=3, K=4, Q=64, seed=7):
    """b with exact zeros, -1e-9 in the dtype (b + 1e-9 == 0), +-1e-12 (b + 1e-9 rounds), negative, huge and tiny
    values; a with inf, -inf and NaN (also on masked entries: inf * 0 = NaN, as in torch)."""
    a, b = safe_divide_inputs(P, K, Q, dtype=dtype, seed=seed)
    edges = torch.tensor([0.0, -0.0, -1e-9, 1e-9, -1e-12, 1e-12, -2e-9, -1.0, -3e5, 1e30, -1e30, 1e-40],
                         dtype=torch.float64).to(dtype)  # 1e-40: a float32 subnormal
    b[0, :len(edges)] = edges
    b[1, :len(edges)] = edges.flip(0)
    for k, val in enumerate((float("inf"), float("-inf"), float("nan"))):
        a[0, k, ::5] = val  # every fifth column, masked (b == 0) ones included
    return a, b


def assert_bit_equal(out, expected, what):
    """Same bits on every entry that is not NaN (so also the sign of zeros), NaN at the same entries."""
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan), f"{what}: NaN at different entries"
    assert torch.equal(out[~nan], expected[~nan]), f"{what}: values differ"
    ints = INT_VIEW[out.dtype]
    assert torch.equal(out[~nan].view(ints), expected[~nan].view(ints)), f"{what}: signs of zeros differ"


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_chefers_safe_divide(dtype):
    """The reference is layers_ours.safe_divide(a, b.unsqueeze(1)) bit for bit, i.e. a / (b + 1e-9) with 1e-9 where
    that sum is 0, masked where b == 0."""
    a, b = edge_inputs(dtype)
    out = kernel(OP, "reference")(a, b)
    assert_bit_equal(out, chefer_safe_divide(a, b.unsqueeze(1)), "reference vs layers_ours")
    eps = torch.tensor(1e-9, dtype=dtype)
    den = torch.where(b + eps == 0, eps, b + eps).unsqueeze(1)
    assert torch.equal(b.clamp(min=1e-9) + b.clamp(max=1e-9), b + eps)  # max + min of {b, eps} is their sum
    assert_bit_equal(out, a / den * (b != 0).unsqueeze(1).to(dtype), "reference vs a / den * mask")
    finite_a = a.isfinite()
    masked = (b == 0).unsqueeze(1) & finite_a
    assert masked.any() and (out[masked] == 0).all()
    at_minus_eps = (b == -eps).unsqueeze(1) & finite_a  # b + 1e-9 == 0: divided by 1e-9 instead
    assert at_minus_eps.any() and torch.equal(out[at_minus_eps], (a / eps)[at_minus_eps])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAST_PARAMS)
def test_fast_kernels_are_bit_equal_to_the_reference(family, dtype):
    """Same operations in the same order (b + 1e-9 in the dtype, one IEEE division, the multiplication by the mask), so
    the same bits on finite inputs, and NaN / inf where torch has them."""
    a, b = edge_inputs(dtype)
    expected = kernel(OP, "reference")(a, b)
    assert_bit_equal(kernel(OP, family)(a, b), expected, f"{family} with edge values")
    finite = safe_divide_inputs(8, 3, 5000, dtype=dtype, seed=3)  # several C++ blocks and Triton programs per row
    out = kernel(OP, family)(*finite)
    assert torch.equal(out, kernel(OP, "reference")(*finite))
    assert torch.equal(out, chefer_safe_divide(finite[0], finite[1].unsqueeze(1)))


@pytest.mark.parametrize("family", IMPL_PARAMS)
def test_out_preallocated_and_in_place(family):
    a, b = edge_inputs(torch.float32)
    expected = kernel(OP, "reference")(a, b)
    out = torch.full_like(a, float("nan"))
    assert ops.safe_divide(a, b, out=out, kernels=family) is out
    assert_bit_equal(out, expected, f"{family} into out")
    a_before = a.clone()
    assert ops.safe_divide(a, b, out=a, kernels=family) is a
    assert_bit_equal(a, expected, f"{family} in place")
    assert not torch.equal(a_before[~a_before.isnan()], a[~a_before.isnan()])  # it really was written in place


@pytest.mark.parametrize("family", IMPL_PARAMS)
def test_out_refused_when_it_aliases_b_or_a_shifted(family):
    a, b = safe_divide_inputs(2, 3, 5, dtype=torch.float32)
    buf = torch.zeros(2 * 5 + 2 * 3 * 5)
    b_in_buf = buf[:10].view(2, 5)
    b_in_buf.copy_(b)
    bad = [
        (a, b_in_buf, buf[5:35].view(2, 3, 5), "safe_divide: out must not overlap b"),
        (a, b, a[:, :1].expand(2, 3, 5), r"safe_divide: out must be contiguous"),
        (a, b, torch.cat([a.flatten(), a.flatten()])[1:31].view(2, 3, 5), None),  # a copy: fine
        (a, b, torch.empty(2, 3, 6), r"safe_divide: out must have shape \(P, K, Q\) = \(2, 3, 5\), got \(2, 3, 6\)"),
        (a, b, torch.empty(2, 3, 5, dtype=torch.float64),
         r"safe_divide: out must have the dtype of a \(torch.float32\), got torch.float64"),
    ]
    abuf = torch.zeros(2 * 3 * 5 + 1)
    a_in_buf = abuf[:30].view(2, 3, 5)
    a_in_buf.copy_(a)
    bad.append((a_in_buf, b, abuf[1:].view(2, 3, 5), "safe_divide: out must be a itself or not overlap it"))
    for a_, b_, out, pattern in bad:
        if pattern is None:
            ops.safe_divide(a_, b_, out=out, kernels=family)
            continue
        with pytest.raises(ValueError, match=pattern):
            ops.safe_divide(a_, b_, out=out, kernels=family)


@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 0, 5), (2, 3, 0)], ids=["P0", "K0", "Q0"])
@pytest.mark.parametrize("family", IMPL_PARAMS)
def test_empty_inputs(family, shape):
    P, K, Q = shape
    a, b = torch.zeros(P, K, Q), torch.ones(P, Q)
    out = ops.safe_divide(a, b, kernels=family)
    assert out.shape == (P, K, Q) and out.dtype == a.dtype
    assert ops.safe_divide(a, b, out=torch.empty(P, K, Q), kernels=family).shape == (P, K, Q)
