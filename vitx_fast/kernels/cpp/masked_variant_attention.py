"""C++ CPU backend of masked_variant_attention (csrc/masked_variant_attention/masked_variant_attention_cpu.cpp).

One task per (image, variant): per head, A gathered dot products of length d, a softmax over A + 1 entries, and A
gathered rows of pv. Nothing of size B x N x A x H x d is materialised, unlike the einsum reference.
"""
from __future__ import annotations

import torch

from vitx_fast.kernels.cpp._common import check_cpu_float, native, threads, view
from vitx_fast.kernels.shapes import check_masked_variant_attention


def masked_variant_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, idx: torch.Tensor, m: torch.Tensor,
                             valid: torch.Tensor, log_nz: torch.Tensor, bk: torch.Tensor,
                             bv: torch.Tensor) -> torch.Tensor:
    """q: (B, N, H, d); pk, pv: (B, T, H, d); idx: (N, A) int64; m: (N, A); valid: (N, A) bool; log_nz: (N,);
    bk, bv: (H, d) -> ctx (B, N, H, d). Same maths as `kernels.reference.masked_variant_attention`."""
    op = "masked_variant_attention"
    C = native(op)
    check_masked_variant_attention(q, pk, pv, idx, m, valid, log_nz, bk, bv)
    check_cpu_float(op, q)
    out = torch.empty(q.shape, dtype=q.dtype)
    C.masked_variant_attention(view(q), view(pk), view(pv), view(idx), view(m), view(valid), view(log_nz), view(bk),
                               view(bv), out.numpy(), threads())
    return out
