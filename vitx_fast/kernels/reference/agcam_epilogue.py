"""AGCAM's epilogue in plain torch (docs/methods/agcam.md §1.2 and §5).

With attention inputs detached, the CLS-row attention gradient of layer l and head h is G[t] = <delta_h, V_h[t]>, with
delta the gradient at the layer's attention output (before proj) split into heads. The map sums, over layers and heads,
    ReLU(G[t]) * sigmoid(s[t]),
s being the pre-softmax scaled CLS-row logits. The caller drops the prefix columns.
"""
from __future__ import annotations

import torch

from vitx_fast.kernels.shapes import check_agcam_epilogue


def agcam_epilogue(delta: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """delta: (B, L, H, d); v: (B, L, H, T, d); s: (B, L, H, T) -> out (B, T).

    out[b, t] = sum_{l,h} ReLU(<delta[b,l,h], v[b,l,h,t]>) * sigmoid(s[b,l,h,t])."""
    check_agcam_epilogue(delta, v, s)
    grads = torch.einsum("blhd,blhtd->blht", delta, v)  # the CLS row of dy/dA, per layer and head
    return (torch.relu(grads) * torch.sigmoid(s)).sum(dim=(1, 2))
