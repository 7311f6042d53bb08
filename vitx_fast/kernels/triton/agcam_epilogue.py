"""Triton backend of agcam_epilogue (docs/methods/agcam.md §5): one fused reduce kernel writing (B, T).

    out[b, t] = sum_{l, h} ReLU(<delta[b, l, h], v[b, l, h, t]>) * sigmoid(s[b, l, h, t])

One program per (image, block of BLOCK_T tokens). It loops over the L*H (layer, head) pairs, loads a BLOCK_T x d tile
of v and one row of delta, and keeps the running sum in registers: v is read once, nothing else is written. Strided
inputs are read in place (v may be a slice of a qkv tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitx_fast.kernels.shapes import check_agcam_epilogue
from vitx_fast.kernels.triton.utils import MAX_BLOCK, acc_dtype, calculate_settings, check_device, num_warps_for


@triton.jit
def _agcam_epilogue_kernel(
    delta_ptr, v_ptr, s_ptr, out_ptr,
    L, H, T, D,
    sd_b, sd_l, sd_h, sd_d,
    sv_b, sv_l, sv_h, sv_t, sv_d,
    ss_b, ss_l, ss_h, ss_t,
    so_b, so_t,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_T], dtype=ACC)
    for lyr in range(L):
        for h in range(H):
            dl = tl.load(delta_ptr + b * sd_b + lyr * sd_l + h * sd_h + offs_d * sd_d, mask=mask_d, other=0.0)
            vt = tl.load(v_ptr + b * sv_b + lyr * sv_l + h * sv_h + offs_t[:, None] * sv_t + offs_d[None, :] * sv_d,
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            st = tl.load(s_ptr + b * ss_b + lyr * ss_l + h * ss_h + offs_t * ss_t, mask=mask_t, other=0.0).to(ACC)
            grad = tl.sum(vt.to(ACC) * dl.to(ACC)[None, :], axis=1)  # the CLS row of dy/dA
            acc += tl.maximum(grad, 0.0) * (1.0 / (1.0 + tl.exp(-st)))
    tl.store(out_ptr + b * so_b + offs_t * so_t, acc.to(out_ptr.dtype.element_ty), mask=mask_t)


def agcam_epilogue(delta: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """delta: (B, L, H, d); v: (B, L, H, T, d); s: (B, L, H, T) -> out (B, T).

    out[b, t] = sum_{l,h} ReLU(<delta[b,l,h], v[b,l,h,t]>) * sigmoid(s[b,l,h,t])."""
    op = "agcam_epilogue"
    B, L, H, T, d = check_agcam_epilogue(delta, v, s)
    check_device(op, delta)
    out = torch.empty((B, T), dtype=delta.dtype, device=delta.device)
    if out.numel() == 0:
        return out
    BLOCK_D = calculate_settings(d)
    if BLOCK_D > MAX_BLOCK // 2:
        raise ValueError(f"{op}: head dim d={d} is too large for the Triton kernel (max {MAX_BLOCK // 2})")
    BLOCK_T = max(2, min(calculate_settings(T), 64, MAX_BLOCK // BLOCK_D))
    grid = (B, triton.cdiv(T, BLOCK_T))
    _agcam_epilogue_kernel[grid](
        delta, v, s, out, L, H, T, d,
        *delta.stride(), *v.stride(), *s.stride(), *out.stride(),
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, ACC=acc_dtype(delta.dtype), num_warps=num_warps_for(BLOCK_T * BLOCK_D),
    )
    return out
