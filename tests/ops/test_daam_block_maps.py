"""daam_block_maps: out[b, l, t] = ReLU(sum_h a[b,l,h,t] * <v[b,l,h,t], g[b,l,h]>) (docs/methods/daam.md §1.3 and
§5). The float64 reference kernel is checked here against the spatial-feature form; every kernel family against that
reference in tests/ops/test_op_contract.py."""
import torch
from op_specs import daam_inputs
from ops_utils import kernel

OP = "daam_block_maps"


def test_reference_is_the_spatial_feature_form():
    """docs/methods/daam.md §1.3: M = ReLU(sum_e g[e] S[t, e]) with S[t, h*d + e] = a[h, t] v[h, t, e] materialised,
    and summed over all tokens the pre-ReLU map is <g, O[0]> with O[0] = sum_t S[t] the CLS row of the attention
    output."""
    B, L, H, T, d = 2, 3, 2, 9, 5
    a, v, g = daam_inputs(B, L, H, T, d, seed=5)
    S = (a.unsqueeze(-1) * v).permute(0, 1, 3, 2, 4).reshape(B, L, T, H * d)  # (B, L, T, D), heads concatenated
    C = g.reshape(B, L, H * d)
    pre = (C.unsqueeze(2) * S).sum(-1)
    torch.testing.assert_close(kernel(OP, "reference")(a, v, g), torch.relu(pre), rtol=1e-12, atol=1e-12)
    ctx0 = torch.einsum("blht,blhtd->blhd", a, v).reshape(B, L, H * d)  # softmax(q0 K^T) V, CLS row
    torch.testing.assert_close(pre.sum(-1), (ctx0 * C).sum(-1), rtol=1e-12, atol=1e-12)
