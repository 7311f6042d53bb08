"""Triton backend of daam_block_maps (docs/methods/daam.md §5): a batched GEMV, then the weighted sum over heads and
the ReLU, writing (B, L, T).

    out[b, l, t] = ReLU( sum_h a[b, l, h, t] * <v[b, l, h, t], g[b, l, h]> )

One program per (image, block, block of BLOCK_T tokens); it loops over the heads with the partial sum in registers, so
v is read once and only the (B, L, T) maps are written. Strided inputs are read in place.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitx_fast.kernels.shapes import check_daam_block_maps
from vitx_fast.kernels.triton.utils import MAX_BLOCK, acc_dtype, calculate_settings, check_device, num_warps_for


@triton.jit
def _daam_block_maps_kernel(
    a_ptr, v_ptr, g_ptr, out_ptr,
    L, H, T, D,
    sa_b, sa_l, sa_h, sa_t,
    sv_b, sv_l, sv_h, sv_t, sv_d,
    sg_b, sg_l, sg_h, sg_d,
    so_b, so_l, so_t,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    bl = tl.program_id(0).to(tl.int64)
    b = bl // L
    lyr = bl % L
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_T], dtype=ACC)
    for h in range(H):
        gh = tl.load(g_ptr + b * sg_b + lyr * sg_l + h * sg_h + offs_d * sg_d, mask=mask_d, other=0.0).to(ACC)
        vt = tl.load(v_ptr + b * sv_b + lyr * sv_l + h * sv_h + offs_t[:, None] * sv_t + offs_d[None, :] * sv_d,
                     mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(ACC)
        at = tl.load(a_ptr + b * sa_b + lyr * sa_l + h * sa_h + offs_t * sa_t, mask=mask_t, other=0.0).to(ACC)
        acc += at * tl.sum(vt * gh[None, :], axis=1)
    tl.store(out_ptr + b * so_b + lyr * so_l + offs_t * so_t, tl.maximum(acc, 0.0).to(out_ptr.dtype.element_ty),
             mask=mask_t)


def daam_block_maps(a: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a: (B, L, H, T); v: (B, L, H, T, d); g: (B, L, H, d) -> (B, L, T) = ReLU(sum_h a_t * <v_t, g>)."""
    op = "daam_block_maps"
    B, L, H, T, d = check_daam_block_maps(a, v, g)
    check_device(op, a)
    out = torch.empty((B, L, T), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    BLOCK_D = calculate_settings(d)
    if BLOCK_D > MAX_BLOCK // 2:
        raise ValueError(f"{op}: head dim d={d} is too large for the Triton kernel (max {MAX_BLOCK // 2})")
    BLOCK_T = max(2, min(calculate_settings(T), 64, MAX_BLOCK // BLOCK_D))
    grid = (B * L, triton.cdiv(T, BLOCK_T))
    _daam_block_maps_kernel[grid](
        a, v, g, out, L, H, T, d,
        *a.stride(), *v.stride(), *g.stride(), *out.stride(),
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, ACC=acc_dtype(a.dtype), num_warps=num_warps_for(BLOCK_T * BLOCK_D),
    )
    return out
