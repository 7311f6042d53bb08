"""Triton backend of safe_divide (docs/methods/lrp.md §5): a 1-D elementwise kernel over the P*K*Q elements of a.

    out[p, k, q] = a[p, k, q] / den[p, q] * (b[p, q] != 0),   den = b + 1e-9, or 1e-9 where that sum is 0

One program per block of BLOCK elements of the flattened (P, K, Q) index i; b is read at p = i // (K*Q), q = i % Q.
The operations are the reference's, in its order, with an IEEE-rounded division (`div_rn` for float32, whose `/` is
approximate on GPUs), so the result is bit-equal to the reference. Inputs are made contiguous; out may be a.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitx_fast.kernels.shapes import check_safe_divide
from vitx_fast.kernels.triton.utils import check_device, num_warps_for

BLOCK = 1024  # elements per program


@triton.jit
def _safe_divide_kernel(a_ptr, b_ptr, out_ptr, N, KQ, Q, BLOCK: tl.constexpr, FP32: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b_offs = (offs // KQ) * Q + offs % Q  # (p, q): one denominator for the K classes
    a = tl.load(a_ptr + offs, mask=mask, other=0.0)
    b = tl.load(b_ptr + b_offs, mask=mask, other=1.0)
    # the dtype's nearest value to 1e-9 (as torch casts clamp's bound), not a float32 literal widened to float64
    eps = tl.full([BLOCK], 1e-9, b.dtype)
    s = b + eps  # = clamp(b, min=eps) + clamp(b, max=eps)
    den = tl.where(s == 0, eps, s)  # = s + (s == 0) * eps
    if FP32:
        quot = tl.div_rn(a, den)  # `/` on float32 is approximate on GPUs
    else:
        quot = a / den  # float64 `/` is IEEE-rounded (div_rn takes float32 only)
    out = quot * (b != 0).to(b.dtype)  # a multiplication, not a select: inf * 0 = nan, as in torch
    tl.store(out_ptr + offs, out, mask=mask)


def safe_divide(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a: (P, K, Q); b: (P, Q); out: None or a contiguous (P, K, Q) tensor to write (may be a) -> (P, K, Q).

    out[p, k, q] = a[p, k, q] / den[p, q] * (b[p, q] != 0), den = b + 1e-9 (1e-9 where that sum is 0)."""
    op = "safe_divide"
    P, K, Q = check_safe_divide(a, b, out)
    check_device(op, a)
    if out is None:
        out = torch.empty((P, K, Q), dtype=a.dtype, device=a.device)
    n = out.numel()
    if n == 0:
        return out
    a, b = a.contiguous(), b.contiguous()  # out is a itself only when a is contiguous: then this is a, in place
    grid = (triton.cdiv(n, BLOCK),)
    _safe_divide_kernel[grid](a, b, out, n, K * Q, Q, BLOCK=BLOCK, FP32=a.dtype == torch.float32,
                              num_warps=num_warps_for(BLOCK))
    return out
