"""LRP's safe division in plain torch (docs/methods/lrp.md §1.2 and §5): Chefer's `layers_ours.safe_divide` as the
relevance rules call it, a / (b + 1e-9) and 0 where b == 0, with b broadcast over the K classes of an image.

    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)      # = b + 1e-9 exactly: the max plus the min of {b, 1e-9}
    den = den + (den == 0) * 1e-9                    # b == -1e-9 would divide by zero
    out = a / den * (b != 0)

1e-9 is the dtype's nearest value (torch casts the scalar); the other kernel families do the same operations in the
same order, so they are bit-equal to this one on finite inputs.
"""
from __future__ import annotations

import torch

from vitx_fast.kernels.shapes import check_safe_divide


def safe_divide(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a: (P, K, Q); b: (P, Q); out: None or a contiguous (P, K, Q) tensor to write (may be a) -> (P, K, Q).

    out[p, k, q] = a[p, k, q] / den[p, q] * (b[p, q] != 0), den = b + 1e-9 (1e-9 where that sum is 0)."""
    check_safe_divide(a, b, out)
    b = b.unsqueeze(1)  # (P, 1, Q): one denominator for the K classes
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + (den == 0).to(den.dtype) * 1e-9
    res = a / den * (b != 0).to(b.dtype)
    return res if out is None else out.copy_(res)
