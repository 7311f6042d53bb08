"""DAAM's per-block maps in plain torch (docs/methods/daam.md §1.3 and §5: the cheaper exact form).

With a[h, t] the CLS query's attention probabilities and g the channel coefficients of the block (ReLU'd in supervised
mode) split into heads, the map of block l is
    M[t] = ReLU( sum_h a[h, t] * <v[h, t], g[h]> ),
which equals ReLU(sum_e g[e] * S[t, e]) without materialising S[t, h*d + e] = a[h, t] * v[h, t, e]. The caller drops
the prefix columns and accumulates over blocks.
"""
from __future__ import annotations

import torch

from vitx_fast.kernels.shapes import check_daam_block_maps


def daam_block_maps(a: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a: (B, L, H, T); v: (B, L, H, T, d); g: (B, L, H, d) -> (B, L, T) = ReLU(sum_h a_t * <v_t, g>)."""
    check_daam_block_maps(a, v, g)
    vg = torch.einsum("blhtd,blhd->blht", v, g)  # per-head share <v_t, g>, before the attention weight
    return torch.relu((a * vg).sum(dim=2))
