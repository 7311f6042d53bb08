"""safe_divide: LRP's safe division, a / (b + 1e-9) and 0 where b == 0, in one pass (docs/methods/lrp.md §5). Maths in
`vitx_fast.kernels.reference.safe_divide`."""
from __future__ import annotations

import torch

from vitx_fast.ops import _kernels

OP = "safe_divide"
# Default on CPU: the C++ kernel reads a and b once where torch makes about ten elementwise passes, and beats it at
# the five (P, K, Q) of the LRP fast path on ViT-B/16 at batch 8, with 1 and 2 threads: by 1.7x to 12x in float32,
# 2.6x or more in float64; least with K = 3 and one thread (benchmarks/results/ops.md). Only ops whose C++ kernel
# beats torch in every configuration measured are listed as default.
CPP_DEFAULT = True


def safe_divide(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None,
                kernels: str | None = None) -> torch.Tensor:
    """out[p, k, q] = a[p, k, q] / den[p, q] * (b[p, q] != 0), den = b + 1e-9 (1e-9 where that sum is exactly 0).

    a: (P, K, Q) numerators (relevance per image and class); b: (P, Q) denominators, shared by the K classes.
    Returns (P, K, Q) in a's dtype, bit-equal in every kernel family to Chefer's `layers_ours.safe_divide(a,
    b.unsqueeze(1))` on finite inputs.

    out: None (a new tensor), or a contiguous (P, K, Q) tensor of a's dtype and device to write and return. It may be a
    itself (in place: each output element reads only a at its own index), but must not overlap b or be a shifted view
    of a (ValueError).

    kernels: None (by device and availability: triton on CUDA, cpp on CPU where it beats torch, reference otherwise),
    or "reference" | "cpp" | "triton" (ValueError with the reasons when it cannot serve). Not differentiable except
    through "reference".
    """
    fn = _kernels.run(OP, [a, b], kernels, CPP_DEFAULT)
    return fn(a, b, out)
