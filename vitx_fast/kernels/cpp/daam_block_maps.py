"""C++ CPU backend of daam_block_maps (csrc/daam_block_maps/daam_block_maps_cpu.cpp).

One task per (image, block, block of 64 tokens): per head, one GEMV row <v_t, g> scaled by a_t, summed over heads in
registers, then the ReLU; the (B, L, H, T) per-head products of the reference are never written.
"""
from __future__ import annotations

import torch

from vitx_fast.kernels.cpp._common import check_cpu_float, native, threads, view
from vitx_fast.kernels.shapes import check_daam_block_maps


def daam_block_maps(a: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a: (B, L, H, T); v: (B, L, H, T, d); g: (B, L, H, d) -> (B, L, T) = ReLU(sum_h a_t * <v_t, g>)."""
    op = "daam_block_maps"
    C = native(op)
    B, L, H, T, d = check_daam_block_maps(a, v, g)
    check_cpu_float(op, a)
    out = torch.empty((B, L, T), dtype=a.dtype)
    C.daam_block_maps(view(a), view(v), view(g), out.numpy(), threads())
    return out
