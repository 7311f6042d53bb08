"""masked_variant_attention: ReciproCAM's collapsed attention of one pooled query row per variant
(docs/methods/reciprocam.md §5). Maths in `vitx_fast.kernels.reference.masked_variant_attention`."""
from __future__ import annotations

import torch

from vitx_fast.ops import _kernels

OP = "masked_variant_attention"
# Default on CPU: the C++ kernel beats torch at ViT-B/16 sizes (B=8, N=196, A=11, H=12, d=64) with 1 and 2
# threads, in float32 and float64 (benchmarks/results/ops.md). Only ops whose C++ kernel beats torch in every
# configuration measured are listed as default.
CPP_DEFAULT = True


def masked_variant_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, idx: torch.Tensor, m: torch.Tensor,
                             valid: torch.Tensor, log_nz: torch.Tensor, bk: torch.Tensor, bv: torch.Tensor, *,
                             k_norm=None, kernels: str | None = None) -> torch.Tensor:
    """Context of each variant's pooled query over its A active keys plus the collapsed zero group.

    q: (B, N, H, d) queries times the attention scale; pk, pv: (B, T, H, d) bias-free key/value projections of the
    unmasked LN1 output; idx: (N, A) int64 active token indices; m: (N, A) their mask weights (0 where padded);
    valid: (N, A) bool; log_nz: (N,) log of the number of zeroed tokens (-inf when none); bk, bv: (H, d) biases;
    k_norm: the attention's k_norm (qk_norm models; reference kernel only) or None.
    Returns ctx: (B, N, H, d) = sum_a p_a (m_a pv[idx_a] + bv) + p_z bv with p the softmax over
    {m_a <q, pk[idx_a]> + <q, bk>} and <q, bk> + log_nz.

    kernels: None (by device and availability: triton on CUDA, cpp on CPU where it beats torch, reference otherwise),
    or "reference" | "cpp" | "triton" (ValueError with the reasons when it cannot serve). Not differentiable except
    through "reference".
    """
    if k_norm is not None and not isinstance(k_norm, torch.nn.Identity):
        # normalised keys are not affine in the mask weight: only the reference kernel computes them
        fn = _kernels.run(OP, [q, pk, pv, m, log_nz, bk, bv], kernels, CPP_DEFAULT,
                          only_reference="qk_norm makes the masked keys non-affine in the mask weight")
        return fn(q, pk, pv, idx, m, valid, log_nz, bk, bv, k_norm=k_norm)
    fn = _kernels.run(OP, [q, pk, pv, m, log_nz, bk, bv], kernels, CPP_DEFAULT)
    return fn(q, pk, pv, idx, m, valid, log_nz, bk, bv)
