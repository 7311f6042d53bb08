"""The relevance rules of `rules.py` in the form the fast path runs them (docs/methods/lrp.md §5): the same maths and
the same `safe_divide`, batched over K classes per image and written to reuse the forward.

- z+ Linear (alpha = 1, beta = 0), bias ignored. With x = x+ + x- and w = w+ + w-:
      Z    = x+ w+^T + x- w-^T = (x w^T + |x| |w|^T) / 2,        x w^T = the forward's output minus its bias,
      R_in = x+ (S w+) + x- (S w-) = (x (S w) + |x| (S |w|)) / 2,  S = R / Z (safe_divide),
  so the denominator costs one matrix product (shared by the K classes) and the relevance two.
- The top block carries relevance on the pooled rows only (the head reads no other row), so its MLP, proj and
  attention-probability steps are computed for those rows; its key and value relevances are rank-r.
- Every sum of the residual Add is per image and class, over (tokens, channels).
Shapes: B images, K classes, R rows (T, or the pooled rows of the top block), T tokens, D channels, H heads.
"""
from __future__ import annotations

import torch

from vitx_fast.methods.lrp.rules import linear_relprop, safe_divide


class Denominator:
    """`rules.safe_divide(., b)` with its denominator prepared once, for the K numerators that share it:
    b.clamp(min=1e-9) + b.clamp(max=1e-9) is b + 1e-9 exactly (the sum of max and min of b and 1e-9), and the
    quotient is masked where b == 0. The mask and the reciprocal are folded into one factor, so each numerator costs
    one multiplication (a rounding of at most one ulp away from safe_divide's a / den * mask)."""

    def __init__(self, b: torch.Tensor):
        den = b + 1e-9
        den = torch.where(den == 0, torch.full((), 1e-9, dtype=den.dtype, device=den.device), den)
        self.factor = (b != 0).to(b.dtype).div_(den)

    def divide(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.factor


def z_plus(R: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, xw: torch.Tensor) -> torch.Tensor:
    """z+ rule. R: (B, K, N, out) relevance at the output; x: (B, N, in) input; weight: (out, in); xw: (B, N, out)
    = x @ weight^T (the forward's output minus the bias). Returns (B, K, N, in)."""
    ax = x.abs()
    aw = weight.abs()
    # Z = (xw + |x| |w|^T) / 2 in one addmm; the halvings are exact
    Z = torch.addmm(xw.reshape(-1, xw.shape[-1]), ax.reshape(-1, ax.shape[-1]), aw.T, beta=0.5, alpha=0.5)
    S = Denominator(Z.view(xw.shape).unsqueeze(1)).divide(R)
    out = x.unsqueeze(1) * (S @ weight)
    return out.addcmul_(ax.unsqueeze(1), S @ aw).mul_(0.5)


def without_bias(out: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return out if linear.bias is None else out - linear.bias


def add_split(R: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rules.add_relprop per image and class. R: (B, K, N, D); a, b: (B, N, D) (broadcast over K)."""
    a, b = a.unsqueeze(1), b.unsqueeze(1)
    S = Denominator(a + b).divide(R)
    ra, rb = a * S, b * S
    dims = (-2, -1)
    sa, sb, sr = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True), R.sum(dims, keepdim=True)
    fa = safe_divide(sa.abs(), sa.abs() + sb.abs()) * sr
    fb = safe_divide(sb.abs(), sa.abs() + sb.abs()) * sr
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def clone_join(x: torch.Tensor, *branches: torch.Tensor) -> torch.Tensor:
    """rules.clone_relprop: x * sum_i (R_i / x). x: (B, N, D); branches: (B, K, N, D)."""
    x = x.unsqueeze(1)
    den = Denominator(x)
    return x * sum(den.divide(r) for r in branches)


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


def block(blk, s, probs: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    # MLP branch: z = y + ls2(fc2(gelu(fc1(norm2(y)))))
    R_skip, R_mlp = add_split(R, y, blk.drop_path2(blk.ls2(s.mlp_out)))
    R_mlp = z_plus(R_mlp, mlp.act(s.h), mlp.fc2.weight, without_bias(s.mlp_out, mlp.fc2))
    R_mlp = z_plus(R_mlp, blk.norm2(y), mlp.fc1.weight, without_bias(s.h, mlp.fc1))
    R = clone_join(y, R_skip, R_mlp)
    # attention branch: y = x + ls1(proj(A V))
    x_r = x[:, :Rr]
    R_skip, R_att = add_split(R, x_r, blk.drop_path1(blk.ls1(s.attn_out)))
    v = s.v
    ctx = probs @ v  # (B, H, R, d): the explicit context, matmul2's Z
    R_ctx = z_plus(R_att, ctx.transpose(1, 2).reshape(B, Rr, D), attn.proj.weight,
                   without_bias(s.attn_out, attn.proj))
    # matmul2 (A V), gradient x input halved
    S = Denominator(ctx.unsqueeze(2)).divide(R_ctx.view(B, K, Rr, H, d).permute(0, 3, 1, 2, 4))  # (B,H,K,R,d)
    R_A = probs.unsqueeze(2) * (S.reshape(B, H, K * Rr, d) @ v.transpose(-2, -1)).view(B, H, K, Rr, T) / 2
    R_v = v.unsqueeze(3) * (probs.transpose(-2, -1) @ S.permute(0, 1, 3, 2, 4).reshape(B, H, Rr, K * d)
                            ).view(B, H, T, K, d) / 2  # (B, H, T, K, d)
    # matmul1 (q k^T, unscaled, after q_norm / k_norm)
    q = s.q[:, :, :Rr]
    S = Denominator((q @ s.k.transpose(-2, -1)).unsqueeze(2)).divide(R_A)  # (B, H, K, R, T)
    R_q = q.unsqueeze(2) * (S.reshape(B, H, K * Rr, T) @ s.k).view(B, H, K, Rr, d) / 2
    R_k = s.k.unsqueeze(2) * (q.transpose(-2, -1).unsqueeze(2) @ S).transpose(-2, -1) / 2  # (B, H, K, T, d)
    # qkv Linear on u = norm1(x): in the top block the q relevance lives on the R rows only
    u = blk.norm1(x)
    w, xw = attn.qkv.weight, without_bias(s.qkv, attn.qkv)
    R_k, R_v = R_k.permute(0, 2, 3, 1, 4), R_v.permute(0, 3, 2, 1, 4)  # (B, K, T, H, d)
    if Rr == T:
        R_qkv = torch.stack([R_q.permute(0, 2, 3, 1, 4), R_k, R_v], dim=3).view(B, K, T, 3 * D)
        return clone_join(x, R_skip, z_plus(R_qkv, u, w, xw)), R_A
    R_in = z_plus(torch.stack([R_k, R_v], dim=3).view(B, K, T, 2 * D), u, w[D:], xw[..., D:])
    R_in[:, :, :Rr] += z_plus(R_q.permute(0, 2, 3, 1, 4).reshape(B, K, Rr, D), u[:, :Rr], w[:D], xw[:, :Rr, :D])
    # Clone: x feeds the skip and the attention; the skip carries relevance on the R rows only
    R_x = clone_join(x, R_in)
    R_x[:, :, :Rr] = clone_join(x_r, R_skip, R_in[:, :, :Rr])
    return R_x, R_A
