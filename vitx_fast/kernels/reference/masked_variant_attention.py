"""ReciproCAM's collapsed attention of one pooled query row per variant, in plain torch (docs/methods/reciprocam.md
§5).

In variant n only the A active tokens idx[n] keep a key and a value of their own, scaled by their mask weights m[n]:
    k_a = m_a * pk[idx_a] + bk,    v_a = m_a * pv[idx_a] + bv.
Every zeroed token has key bk and value bv, so the n_z of them collapse into one entry with logit <q, bk> + ln n_z
(log_nz = -inf when no token is zeroed). The softmax over T keys is exactly a softmax over these A + 1 entries:
    ctx = sum_a softmax_a * v_a + softmax_z * bv.
With qk_norm the keys are k_norm(k_a) and the zero group's key k_norm(bk): no longer affine in m, so only this
reference kernel serves that case (`k_norm=`).
"""
from __future__ import annotations

import math

import torch

from vitx_fast.kernels.shapes import check_masked_variant_attention


def masked_variant_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, idx: torch.Tensor, m: torch.Tensor,
                             valid: torch.Tensor, log_nz: torch.Tensor, bk: torch.Tensor,
                             bv: torch.Tensor, k_norm=None) -> torch.Tensor:
    """Context of each variant's pooled query.

    q: (B, N, H, d) queries, already multiplied by the attention scale; pk, pv: (B, T, H, d) bias-free key and value
    projections of the unmasked LN1 output; idx: (N, A) int64 active token indices; m: (N, A) their mask weights
    (0 where padded); valid: (N, A) bool; log_nz: (N,) log of the number of zeroed tokens (-inf when none);
    bk, bv: (H, d) key and value biases; k_norm: None or the attention's k_norm module (applied to every key).
    Returns ctx: (B, N, H, d), in the dtype of q.
    """
    check_masked_variant_attention(q, pk, pv, idx, m, valid, log_nz, bk, bv)
    A = idx.shape[1]
    idx = idx.masked_fill(~valid, 0)  # padded slots may hold anything: point them at token 0, weight m = 0
    w = m[None, :, :, None, None]
    k_act = w * pk[:, idx] + bk  # (B, N, A, H, d)
    k_zero = bk
    if k_norm is not None:
        k_act, k_zero = k_norm(k_act), k_norm(bk)
    v_act = w * pv[:, idx] + bv
    s_act = torch.einsum("bnhd,bnahd->bnha", q, k_act).masked_fill(~valid[None, :, None, :], -math.inf)
    s_zero = torch.einsum("bnhd,hd->bnh", q, k_zero) + log_nz[None, :, None]  # the collapsed zero group
    probs = torch.cat([s_act, s_zero.unsqueeze(-1)], -1).softmax(-1)  # (B, N, H, A + 1)
    return torch.einsum("bnha,bnahd->bnhd", probs[..., :A], v_act) + probs[..., A:] * bv
