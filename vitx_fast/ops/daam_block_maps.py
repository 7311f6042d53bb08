"""daam_block_maps: DAAM's per-block maps without materialising the spatial features (docs/methods/daam.md §5). Maths
in `vitx_fast.kernels.reference.daam_block_maps`."""
from __future__ import annotations

import torch

from vitx_fast.ops import _kernels

OP = "daam_block_maps"
# Default on CPU: the C++ kernel beats torch at ViT-B/16 sizes (B=8, L=12, H=12, T=197, d=64) with 1 and 2
# threads, in float32 and float64 (benchmarks/results/ops.md). Only ops whose C++ kernel beats torch in every
# configuration measured are listed as default.
CPP_DEFAULT = True


def daam_block_maps(a: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, kernels: str | None = None) -> torch.Tensor:
    """out[b, l, t] = ReLU(sum_h a[b,l,h,t] * <v[b,l,h,t], g[b,l,h]>).

    a: (B, L, H, T) CLS-row attention probabilities; v: (B, L, H, T, d) values; g: (B, L, H, d) channel coefficients
    (already ReLU'd in supervised mode), split per head. Returns (B, L, T), prefix columns included (the caller drops
    them and accumulates over blocks).

    kernels: None (by device and availability: triton on CUDA, cpp on CPU where it beats torch, reference otherwise),
    or "reference" | "cpp" | "triton" (ValueError with the reasons when it cannot serve). Not differentiable except
    through "reference".
    """
    fn = _kernels.run(OP, [a, v, g], kernels, CPP_DEFAULT)
    return fn(a, v, g)
