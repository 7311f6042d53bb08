"""masked_variant_attention: ReciproCAM's collapsed attention of one pooled query row per variant (specs/reciprocam.md
§6, steps 3-5, without qk_norm). Maths in `vitx_fast.kernels.reference.masked_variant_attention`."""
from __future__ import annotations

import torch

from vitx_fast.ops import _dispatch

OP = "masked_variant_attention"
# Default on CPU: the C++ kernel beats torch at ViT-B/16 sizes (B=8, N=196, A=11, H=12, d=64) with 1 and 2
# threads, in float32 and float64 (benchmarks/results/ops.md). Only ops whose C++ kernel beats torch in every
# configuration measured are listed as default.
CPP_DEFAULT = True


def masked_variant_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, idx: torch.Tensor, m: torch.Tensor,
                             valid: torch.Tensor, log_nz: torch.Tensor, bk: torch.Tensor, bv: torch.Tensor, *,
                             impl: str | None = None) -> torch.Tensor:
    """Context of each variant's pooled query over its A active keys plus the collapsed zero group.

    q: (B, N, H, d) queries times the attention scale; pk, pv: (B, T, H, d) bias-free key/value projections of the
    unmasked LN1 output; idx: (N, A) int64 active token indices; m: (N, A) their mask weights (0 where padded);
    valid: (N, A) bool; log_nz: (N,) log of the number of zeroed tokens (-inf when none); bk, bv: (H, d) biases.
    Returns ctx: (B, N, H, d) = sum_a p_a (m_a pv[idx_a] + bv) + p_z bv with p the softmax over
    {m_a <q, pk[idx_a]> + <q, bk>} and <q, bk> + log_nz.

    impl: None (by device and availability: triton on CUDA, cpp on CPU, reference otherwise), or "reference" | "cpp" |
    "triton" (ValueError with the reasons when it cannot serve). Not differentiable except through "reference".
    """
    fn = _dispatch.run(OP, [q, pk, pv, m, log_nz, bk, bv], impl, CPP_DEFAULT)
    return fn(q, pk, pv, idx, m, valid, log_nz, bk, bv)
