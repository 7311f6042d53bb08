"""agcam_epilogue: out[b, t] = sum_{l,h} ReLU(<delta[b,l,h], v[b,l,h,t]>) * sigmoid(s[b,l,h,t])
(docs/methods/agcam.md §5). The float64 reference kernel is checked here against autograd and a literal loop; every
kernel family against that reference in tests/ops/test_op_contract.py."""
import torch
from op_specs import agcam_inputs
from ops_utils import kernel

OP = "agcam_epilogue"


def test_reference_is_the_agcam_formula():
    """The reference equals AGCAM as the paper computes it: G = dy/dA on the CLS row through ctx = A @ V with
    delta = dy/dctx (autograd), then a literal loop over layers and heads of ReLU(G) * sigmoid(s)."""
    B, L, H, T, d = 2, 3, 2, 9, 5
    delta, v, s = agcam_inputs(B, L, H, T, d, seed=3)
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for layer in range(L):
            for h in range(H):
                probs = torch.softmax(torch.randn(T, T, dtype=torch.float64), -1).requires_grad_(True)
                y = (delta[b, layer, h] * (probs @ v[b, layer, h])[0]).sum()  # only the CLS row of ctx reaches y
                (grad,) = torch.autograd.grad(y, probs)
                out[b] += torch.relu(grad[0]) * torch.sigmoid(s[b, layer, h])
    torch.testing.assert_close(kernel(OP, "reference")(delta, v, s), out, rtol=1e-12, atol=1e-12)
