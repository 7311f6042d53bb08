"""Triton backend of masked_variant_attention (docs/methods/reciprocam.md §5.1, without qk_norm).

Per (image b, variant n, head h), with the A active tokens idx[n] and their weights m[n]:
    s_a = m_a * <q, pk[idx_a]> + <q, bk>        (valid a; -inf for padded slots)
    s_z = <q, bk> + log_nz[n]                   (all zeroed tokens share key bk and value bv)
    ctx = sum_a p_a * (m_a * pv[idx_a] + bv) + p_z * bv,    p = softmax(s_1..s_A, s_z)

One program per (b, n, h): it gathers A rows of pk and pv (BLOCK_A x BLOCK_D tiles; padded slots are masked off and
never read), so the B x N x A x H x d keys and values of the reference are never materialised. pk and pv may be strided
views of a fused qkv projection.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitx_fast.kernels.shapes import check_masked_variant_attention
from vitx_fast.kernels.triton.utils import MAX_BLOCK, acc_dtype, calculate_settings, check_device, num_warps_for


@triton.jit
def _masked_variant_attention_kernel(
    q_ptr, pk_ptr, pv_ptr, idx_ptr, m_ptr, valid_ptr, lnz_ptr, bk_ptr, bv_ptr, out_ptr,
    N, A, D,
    sq_b, sq_n, sq_h, sq_d,
    sk_b, sk_t, sk_h, sk_d,
    sv_b, sv_t, sv_h, sv_d,
    si_n, si_a, sm_n, sm_a, sl_n, sl_a, sz_n,
    sbk_h, sbk_d, sbv_h, sbv_d,
    so_b, so_n, so_h, so_d,
    BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N
    n = pid % N
    h = tl.program_id(1).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    live = (offs_a < A) & (tl.load(valid_ptr + n * sl_n + offs_a * sl_a, mask=offs_a < A, other=0) != 0)
    idx = tl.load(idx_ptr + n * si_n + offs_a * si_a, mask=live, other=0)
    m = tl.load(m_ptr + n * sm_n + offs_a * sm_a, mask=live, other=0.0).to(ACC)

    q = tl.load(q_ptr + b * sq_b + n * sq_n + h * sq_h + offs_d * sq_d, mask=mask_d, other=0.0).to(ACC)
    bk = tl.load(bk_ptr + h * sbk_h + offs_d * sbk_d, mask=mask_d, other=0.0).to(ACC)
    bv = tl.load(bv_ptr + h * sbv_h + offs_d * sbv_d, mask=mask_d, other=0.0).to(ACC)
    tile = live[:, None] & mask_d[None, :]
    pk = tl.load(pk_ptr + b * sk_b + idx[:, None] * sk_t + h * sk_h + offs_d[None, :] * sk_d, mask=tile,
                 other=0.0).to(ACC)

    beta = tl.sum(q * bk, axis=0)  # <q, bk>: the logit offset of every key
    s = tl.where(live, m * tl.sum(pk * q[None, :], axis=1) + beta, float("-inf"))
    s_zero = beta + tl.load(lnz_ptr + n * sz_n).to(ACC)
    mx = tl.maximum(tl.max(s, axis=0), s_zero)
    e = tl.exp(s - mx)
    e_zero = tl.exp(s_zero - mx)
    inv = 1.0 / (tl.sum(e, axis=0) + e_zero)

    pv = tl.load(pv_ptr + b * sv_b + idx[:, None] * sv_t + h * sv_h + offs_d[None, :] * sv_d, mask=tile,
                 other=0.0).to(ACC)
    v_act = m[:, None] * pv + bv[None, :]
    ctx = tl.sum((e * inv)[:, None] * v_act, axis=0) + (e_zero * inv) * bv
    tl.store(out_ptr + b * so_b + n * so_n + h * so_h + offs_d * so_d, ctx.to(out_ptr.dtype.element_ty), mask=mask_d)


def masked_variant_attention(q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, idx: torch.Tensor, m: torch.Tensor,
                             valid: torch.Tensor, log_nz: torch.Tensor, bk: torch.Tensor,
                             bv: torch.Tensor) -> torch.Tensor:
    """q: (B, N, H, d); pk, pv: (B, T, H, d); idx: (N, A) int64; m: (N, A); valid: (N, A) bool; log_nz: (N,);
    bk, bv: (H, d) -> ctx (B, N, H, d). Same maths as `kernels.reference.masked_variant_attention`."""
    op = "masked_variant_attention"
    B, N, H, d, T, A = check_masked_variant_attention(q, pk, pv, idx, m, valid, log_nz, bk, bv)
    check_device(op, q)
    out = torch.empty((B, N, H, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    BLOCK_A, BLOCK_D = calculate_settings(A), calculate_settings(d)
    if BLOCK_A * BLOCK_D > MAX_BLOCK:
        raise ValueError(f"{op}: A={A} active keys x d={d} exceed the Triton tile limit ({MAX_BLOCK} elements)")
    valid8 = valid.to(torch.int8)  # (N, A): bool pointers are awkward in Triton
    grid = (B * N, H)
    _masked_variant_attention_kernel[grid](
        q, pk, pv, idx, m, valid8, log_nz, bk, bv, out, N, A, d,
        *q.stride(), *pk.stride(), *pv.stride(), *idx.stride(), *m.stride(), *valid8.stride(), *log_nz.stride(),
        *bk.stride(), *bv.stride(), *out.stride(),
        BLOCK_A=BLOCK_A, BLOCK_D=BLOCK_D, ACC=acc_dtype(q.dtype), num_warps=num_warps_for(BLOCK_A * BLOCK_D),
    )
    return out
