"""masked_variant_attention: ReciproCAM's collapsed attention of one pooled query per variant
(docs/methods/reciprocam.md §5.1). The float64 reference kernel is checked here against the uncollapsed softmax over
all T keys of the masked LN1 output, every kernel family on the real Gaussian table and with garbage in the padded
slots; the shared contract (parity, robustness, dispatch) is in tests/ops/test_op_contract.py."""
import pytest
import torch
from op_specs import gaussian_weights, mva_inputs
from ops_utils import IMPL_PARAMS, kernel

OP = "masked_variant_attention"


def uncollapsed(q, pk, pv, W, bk, bv):
    """The masked block's pooled row as the reference path computes it (docs/methods/reciprocam.md §1.5): keys and
    values of all T masked tokens, k_t = W_t pk_t + bk, v_t = W_t pv_t + bv, and a softmax over T keys. W: (N, T)."""
    k = W[None, :, :, None, None] * pk[:, None] + bk  # (B, N, T, H, d)
    v = W[None, :, :, None, None] * pv[:, None] + bv
    probs = torch.einsum("bnhd,bnthd->bnht", q, k).softmax(-1)
    return torch.einsum("bnht,bnthd->bnhd", probs, v)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("grid", [(3, 5), (2, 2)], ids=["grid3x5-P1", "grid2x2-P2"])
def test_gaussian_mask_table_matches_uncollapsed_attention(impl, grid):
    """On the real Gaussian table (a 2x2 grid has variants with no zeroed token), every backend equals the softmax
    over all T keys: the collapse of the zero group into one entry with logit <q, bk> + ln n_z is exact."""
    P = 1 if grid == (3, 5) else 2
    W = gaussian_weights(P, *grid)
    N, T = W.shape
    args, _ = mva_inputs(2, T, 3, 7, N, P + 9 + 1, weights=W, seed=6)
    q, pk, pv, *_, bk, bv = args
    torch.testing.assert_close(kernel(OP, impl)(*args), uncollapsed(q, pk, pv, W, bk, bv), rtol=1e-12, atol=1e-12)


def test_reference_matches_uncollapsed_attention_on_random_tables():
    args, W = mva_inputs(3, 17, 3, 7, 9, 10, seed=7)
    q, pk, pv, *_, bk, bv = args
    torch.testing.assert_close(kernel(OP, "reference")(*args), uncollapsed(q, pk, pv, W, bk, bv), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_padded_slots_are_never_read(impl):
    """Out-of-range indices in padded slots change nothing (the reference redirects them, the kernels mask them)."""
    args, _ = mva_inputs(2, 17, 3, 7, 6, 12, seed=3)
    idx, valid = args[3], args[5]
    assert (~valid).any()
    garbage = idx.masked_fill(~valid, 10**9)
    out = kernel(OP, impl)(*args[:3], garbage, *args[4:])
    torch.testing.assert_close(out, kernel(OP, "reference")(*args), rtol=1e-12, atol=1e-12)
