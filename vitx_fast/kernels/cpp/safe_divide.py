"""C++ CPU backend of safe_divide (csrc/safe_divide/safe_divide_cpu.cpp).

One pass over a: tasks are blocks of the (P*K) x Q rows (rows split along Q when there are fewer rows than threads),
each element one division and one multiplication by the 0/1 mask, where the reference makes about ten passes over b
and two over a.
"""
from __future__ import annotations

import torch

from vitx_fast.kernels.cpp._common import check_cpu_float, native, threads, view
from vitx_fast.kernels.shapes import check_safe_divide


def safe_divide(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a: (P, K, Q); b: (P, Q); out: None or a contiguous (P, K, Q) tensor to write (may be a) -> (P, K, Q).

    out[p, k, q] = a[p, k, q] / den[p, q] * (b[p, q] != 0), den = b + 1e-9 (1e-9 where that sum is 0)."""
    op = "safe_divide"
    C = native(op)
    P, K, Q = check_safe_divide(a, b, out)
    check_cpu_float(op, a)
    if out is None:
        out = torch.empty((P, K, Q), dtype=a.dtype)
    if out.numel() == 0:
        return out
    # out is a itself only when a is contiguous, so view(a) then shares its memory and the kernel works in place
    C.safe_divide(view(a), view(b), out.detach().numpy(), threads())
    return out
