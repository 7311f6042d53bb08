"""The relevance rules of `rules.py` in the form the fast path runs them (docs/methods/lrp.md §5): the same maths and
the same `safe_divide`, batched over K classes per image and written to reuse the forward.

- z+ Linear (alpha = 1, beta = 0), bias ignored. With x = x+ + x- and w = w+ + w-:
      Z    = x+ w+^T + x- w-^T = (x w^T + |x| |w|^T) / 2,        x w^T = the forward's output minus its bias,
      R_in = x+ (S w+) + x- (S w-) = (x (S w) + |x| (S |w|)) / 2,  S = R / Z (safe_divide),
  so the denominator costs one matrix product (shared by the K classes) and the relevance two.
- Every safe_divide is `ops.safe_divide` (one fused pass, bit-equal to the rules' torch formula).
- The top block carries relevance on the pooled rows only (the head reads no other row), so its MLP, proj and
  attention-probability steps are computed for those rows; its key and value relevances are rank-r.
- Every sum of the residual Add is per image and class, over (tokens, channels).
Shapes: B images, K classes, R rows (T, or the pooled rows of the top block), T tokens, D channels, H heads.
"""
from __future__ import annotations

import math

import torch

from vitx_fast import ops
from vitx_fast.methods.lrp.rules import linear_relprop, safe_divide


def divide(a: torch.Tensor, b: torch.Tensor, k_dim: int = 1, kernels: str | None = None) -> torch.Tensor:
    """`rules.safe_divide(a, b.unsqueeze(k_dim))`, bit for bit, in one pass (`ops.safe_divide`). a: b's shape with K
    inserted at k_dim; b broadcast over K. Returns a's shape."""
    P, K = math.prod(a.shape[:k_dim]), a.shape[k_dim]
    out = ops.safe_divide(a.reshape(P, K, -1), b.reshape(P, -1), kernels=kernels)
    return out.view(a.shape)


def z_plus(R: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, xw: torch.Tensor,
           kernels: str | None = None) -> torch.Tensor:
    """z+ rule. R: (B, K, N, out) relevance at the output; x: (B, N, in) input; weight: (out, in); xw: (B, N, out)
    = x @ weight^T (the forward's output minus the bias). Returns (B, K, N, in)."""
    # the halvings are exact, so folding them into x changes no bit: Z = xw / 2 + (|x| / 2) |w|^T
    hx = x * 0.5
    hax = hx.abs()
    aw = weight.abs()
    Z = torch.addmm(xw.reshape(-1, xw.shape[-1]), hax.reshape(-1, hax.shape[-1]), aw.T, beta=0.5)
    S = divide(R, Z.view(xw.shape), kernels=kernels)
    return (S @ weight).mul_(hx.unsqueeze(1)).addcmul_(hax.unsqueeze(1), S @ aw)


def without_bias(out: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return out if linear.bias is None else out - linear.bias


def add_split(R: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              kernels: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rules.add_relprop per image and class. R: (B, K, N, D); a, b: (B, N, D) (broadcast over K)."""
    S = divide(R, a + b, kernels=kernels)
    a, b = a.unsqueeze(1), b.unsqueeze(1)
    ra, rb = a * S, b * S
    dims = (-2, -1)
    sa, sb, sr = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True), R.sum(dims, keepdim=True)
    fa = safe_divide(sa.abs(), sa.abs() + sb.abs()) * sr
    fb = safe_divide(sb.abs(), sa.abs() + sb.abs()) * sr
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def clone_join(x: torch.Tensor, *branches: torch.Tensor, kernels: str | None = None) -> torch.Tensor:
    """rules.clone_relprop: x * sum_i (R_i / x). x: (B, N, D); branches: (B, K, N, D)."""
    return x.unsqueeze(1) * sum(divide(r, x, kernels=kernels) for r in branches)


def head(adapter, final_rows: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """rules._head_relprop for K classes. final_rows: (B, r, D) the final norm's pooled rows; onehot: (B, K, C).
    Returns R at those rows (B, K, r, D) (zero at every other token)."""
    m = adapter.model
    R = onehot.to(final_rows.dtype)
    if adapter.distilled:
        x0, x1 = m.head_drop(final_rows[:, 0]), m.head_drop(final_rows[:, 1])
        Ra, Rb = add_split(R.unsqueeze(2), (m.head(x0) / 2).unsqueeze(1), (m.head_dist(x1) / 2).unsqueeze(1))
        pooled = [linear_relprop(Ra[:, :, 0], x0.unsqueeze(1), m.head.weight),
                  linear_relprop(Rb[:, :, 0], x1.unsqueeze(1), m.head_dist.weight)]
    else:
        x0 = m.head_drop(m.fc_norm(final_rows[:, 0])).unsqueeze(1)
        pooled = [linear_relprop(R, x0, m.head.weight)]
    out = final_rows.new_zeros(R.shape[0], R.shape[1], *final_rows.shape[1:])
    for tok, r in enumerate(pooled):  # IndexSelect: X * (R / X) on the selected token
        xt = final_rows[:, tok].unsqueeze(1)
        out[:, :, tok] = xt * safe_divide(r, xt)
    if len(pooled) == 1:
        return out
    # distilled: the final tokens feed two IndexSelects, joined by a Clone
    outs = [torch.zeros_like(out) for _ in pooled]
    for tok in range(len(pooled)):
        outs[tok][:, :, tok] = out[:, :, tok]
    return clone_join(final_rows, *outs)


def block(blk, s, probs: torch.Tensor, R: torch.Tensor,
          kernels: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """rules._block_relprop on the tensors the forward kept (vitx_fast.engine.backward.BlockSaved `s`).

    probs: (B, H, R, T) the block's attention (its R query rows); R: (B, K, R, D) relevance at the block output.
    Returns (relevance at the block input (B, K, T, D), R_A (B, H, K, R, T) after halving).
    """
    mlp, attn = blk.mlp, blk.attn
    x, y = s.x, s.y
    B, T, D = x.shape
    Rr = y.shape[1]
    H, d = attn.num_heads, attn.head_dim
    K = R.shape[1]
    kw = {"kernels": kernels}
    # MLP branch: z = y + ls2(fc2(gelu(fc1(norm2(y)))))
    R_skip, R_mlp = add_split(R, y, blk.drop_path2(blk.ls2(s.mlp_out)), **kw)
    R_mlp = z_plus(R_mlp, mlp.act(s.h), mlp.fc2.weight, without_bias(s.mlp_out, mlp.fc2), **kw)
    R_mlp = z_plus(R_mlp, blk.norm2(y), mlp.fc1.weight, without_bias(s.h, mlp.fc1), **kw)
    R = clone_join(y, R_skip, R_mlp, **kw)
    # attention branch: y = x + ls1(proj(A V))
    x_r = x[:, :Rr]
    R_skip, R_att = add_split(R, x_r, blk.drop_path1(blk.ls1(s.attn_out)), **kw)
    v = s.v
    ctx = probs @ v  # (B, H, R, d): the explicit context, matmul2's Z
    R_ctx = z_plus(R_att, ctx.transpose(1, 2).reshape(B, Rr, D), attn.proj.weight,
                   without_bias(s.attn_out, attn.proj), **kw)
    # matmul2 (A V), gradient x input halved: the halving moved onto S is exact
    S = divide(R_ctx.view(B, K, Rr, H, d).permute(0, 3, 1, 2, 4), ctx, k_dim=2, **kw).mul_(0.5)  # (B,H,K,R,d)
    R_A = (S.reshape(B, H, K * Rr, d) @ v.transpose(-2, -1)).view(B, H, K, Rr, T).mul_(probs.unsqueeze(2))
    R_v = (probs.transpose(-2, -1) @ S.permute(0, 1, 3, 2, 4).reshape(B, H, Rr, K * d)
           ).view(B, H, T, K, d).mul_(v.unsqueeze(3))  # (B, H, T, K, d)
    # matmul1 (q k^T, unscaled, after q_norm / k_norm)
    q = s.q[:, :, :Rr]
    S = divide(R_A, q @ s.k.transpose(-2, -1), k_dim=2, **kw).mul_(0.5)  # (B, H, K, R, T)
    R_q = (S.reshape(B, H, K * Rr, T) @ s.k).view(B, H, K, Rr, d).mul_(q.unsqueeze(2))
    R_k = (q.transpose(-2, -1).unsqueeze(2) @ S).transpose(-2, -1).mul_(s.k.unsqueeze(2))  # (B, H, K, T, d)
    # qkv Linear on u = norm1(x): in the top block the q relevance lives on the R rows only
    u = blk.norm1(x)
    w, xw = attn.qkv.weight, without_bias(s.qkv, attn.qkv)
    R_k, R_v = R_k.permute(0, 2, 3, 1, 4), R_v.permute(0, 3, 2, 1, 4)  # (B, K, T, H, d)
    if Rr == T:
        R_qkv = torch.stack([R_q.permute(0, 2, 3, 1, 4), R_k, R_v], dim=3).view(B, K, T, 3 * D)
        return clone_join(x, R_skip, z_plus(R_qkv, u, w, xw, **kw), **kw), R_A
    R_in = z_plus(torch.stack([R_k, R_v], dim=3).view(B, K, T, 2 * D), u, w[D:], xw[..., D:], **kw)
    R_in[:, :, :Rr] += z_plus(R_q.permute(0, 2, 3, 1, 4).reshape(B, K, Rr, D), u[:, :Rr], w[:D], xw[:, :Rr, :D],
                              **kw)
    # Clone: x feeds the skip and the attention; the skip carries relevance on the R rows only
    R_x = clone_join(x, R_in, **kw)
    R_x[:, :, :Rr] = clone_join(x_r, R_skip, R_in[:, :, :Rr], **kw)
    return R_x, R_A
