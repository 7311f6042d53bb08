"""C++ CPU backend of agcam_epilogue (csrc/agcam_epilogue/agcam_epilogue_cpu.cpp).

One task per (image, block of 64 tokens): it streams that slice of v once over all layers and heads and keeps the
running sum in registers, so the (B, L, H, T) gradient rows of the reference are never written.
"""
from __future__ import annotations

import torch

from vitx_fast.kernels.cpp._common import check_cpu_float, native, threads, view
from vitx_fast.kernels.shapes import check_agcam_epilogue


def agcam_epilogue(delta: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """delta: (B, L, H, d); v: (B, L, H, T, d); s: (B, L, H, T) -> out (B, T).

    out[b, t] = sum_{l,h} ReLU(<delta[b,l,h], v[b,l,h,t]>) * sigmoid(s[b,l,h,t])."""
    op = "agcam_epilogue"
    C = native(op)
    B, L, H, T, d = check_agcam_epilogue(delta, v, s)
    check_cpu_float(op, delta)
    out = torch.empty((B, T), dtype=delta.dtype)
    C.agcam_epilogue(view(delta), view(v), view(s), out.numpy(), threads())
    return out
