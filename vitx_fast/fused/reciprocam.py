"""ViT-ReciproCAM fast path for the last-block target (specs/reciprocam.md §6): exact, O(B*N*D) memory.

With a token-pooled head only the pooled prefix rows of the last block matter. In every variant the zeroed tokens share
one key k_norm(b_k) and one value b_v, so the pooled row's softmax over T keys collapses exactly to a softmax over the
<= P + 9 active keys plus one zero-group entry with logit beta + ln(n_z). Nothing of size T x T or B x N x T x D exists.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vitx_fast.methods.base import MethodResult
from vitx_fast.ops import masked_variant_attention
from vitx_fast.methods.reciprocam import GAUSSIAN, ReciproCAM, scores_to_maps


def active_table(grid_h: int, grid_w: int, num_prefix: int, mask: str, cls_token: bool, dtype, device):
    """The non-zero entries of `variant_weights`, built from the grid in O(N * A) (never the (N, T) table).

    Returns idx (N, A) token indices, m (N, A) weights (0 where padded), valid (N, A) bool, n_zero (N,) the number
    of zeroed tokens per variant. A = P + 9 (gaussian) or P + 1 (onehot) when cls_token, else 9 or 1.
    """
    n = grid_h * grid_w
    k = torch.arange(n, device=device)
    i, j = k // grid_w, k % grid_w
    if mask == "onehot":
        offsets = [(0, 0, 1.0)]
    else:
        offsets = [(di, dj, GAUSSIAN[di + 1][dj + 1]) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
    di = torch.tensor([o[0] for o in offsets], device=device)
    dj = torch.tensor([o[1] for o in offsets], device=device)
    g = torch.tensor([o[2] for o in offsets], dtype=dtype, device=device)
    ii, jj = i[:, None] + di, j[:, None] + dj  # (N, 9)
    valid = (ii >= 0) & (ii < grid_h) & (jj >= 0) & (jj < grid_w)
    idx = torch.where(valid, num_prefix + ii * grid_w + jj, torch.zeros_like(ii))
    m = torch.where(valid, g.expand_as(ii), torch.zeros((), dtype=dtype, device=device))
    if cls_token and num_prefix:
        pre = torch.arange(num_prefix, device=device).expand(n, num_prefix)
        idx = torch.cat([pre, idx], 1)
        m = torch.cat([torch.ones(n, num_prefix, dtype=dtype, device=device), m], 1)
        valid = torch.cat([torch.ones(n, num_prefix, dtype=torch.bool, device=device), valid], 1)
    n_zero = num_prefix + n - valid.sum(1)
    return idx, m, valid, n_zero


def pooled_rows(adapter) -> list[int]:
    """Prefix rows the head reads: CLS, plus the distillation token for a distilled head."""
    return [0, 1] if adapter.distilled else [0]


# working set of one chunk of variants per image (gathered active keys/values and the MLP rows); the chunk size
# depends on no input value or batch size, so the program traces with a dynamic batch
CHUNK_BUDGET_BYTES_PER_IMAGE = 8 * 2**20


def variant_chunk(active: int, dim: int, hidden: int, itemsize: int, chunk: int | None) -> int:
    """Variants per chunk: the user's `chunk`, or as many as fit CHUNK_BUDGET_BYTES_PER_IMAGE."""
    if chunk:
        return int(chunk)
    per_variant = (3 * active * dim + 2 * hidden + 8 * dim) * itemsize
    return max(1, CHUNK_BUDGET_BYTES_PER_IMAGE // per_variant)


def last_block_scores(adapter, images: torch.Tensor, opts):
    """Head outputs of every variant, (B, N, C), and the unmasked logits (B, C). images: (B, 3, H, W).

    Memory is O(B*T*D) for the one forward plus O(B*n*A*D) for a chunk of n variants (A <= P + 9 active keys).
    """
    model = adapter.model
    L = adapter.depth
    blk = model.blocks[L - 1]
    attn = blk.attn
    H, d = attn.num_heads, attn.head_dim
    gh, gw = adapter.grid_for(*images.shape[-2:])
    x = adapter.run_until(L - 1, images, native=True)  # (B, T, D), the input of the masked block
    u = blk.norm1(x)
    B, T, D = x.shape
    idx_all, m_all, valid_all, n_zero = active_table(gh, gw, adapter.num_prefix_tokens, opts["mask"],
                                                     opts["cls_token"], x.dtype, x.device)
    N, A = idx_all.shape

    weight = attn.qkv.weight
    bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
    pq, pk, pv = F.linear(u, weight).view(B, T, 3, H, d).unbind(2)  # bias-free projections P_q, P_k, P_v
    bq, bk, bv = bias.view(3, H, d).unbind(0)
    k_zero = attn.k_norm(bk)  # (H, d): the key of every zeroed token
    log_nz = torch.where(n_zero > 0, torch.log(n_zero.clamp(min=1).to(x.dtype)),
                         torch.full((), -math.inf, dtype=x.dtype, device=x.device))  # (N,)
    rows = pooled_rows(adapter)

    def finish_rows(ctx, u_rows, r):
        """Rest of the block for pooled-row contexts (..., D), then final norm and head on those rows only."""
        o = attn.norm(ctx)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(u_rows).sigmoid()
        y = r + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(o))))
        return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))

    # the unmodified prediction: only the pooled rows of the last block, attending over all T keys
    k_full, v_full = attn.k_norm(pk + bk), pv + bv
    z0 = []
    for p in rows:
        q = attn.q_norm(pq[:, p] + bq) * attn.scale  # (B, H, d)
        a = torch.einsum("bhd,bthd->bht", q, k_full).softmax(-1)
        ctx = torch.einsum("bht,bthd->bhd", a, v_full).reshape(B, H * d)
        z0.append(finish_rows(ctx, u[:, p], x[:, p]))
    logits = model.forward_head(model.norm(torch.stack(z0, 1)))
    del k_full, v_full

    hidden = getattr(getattr(blk.mlp, "fc1", None), "out_features", 4 * D)
    step = variant_chunk(A, D, hidden, x.element_size(), opts.get("chunk"))
    plain_qk = isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)

    scores = []
    for c0 in range(0, N, step):
        sl = slice(c0, min(c0 + step, N))
        idx, m, valid = idx_all[sl], m_all[sl], valid_all[sl]
        n = idx.shape[0]
        z_rows = []
        for p in rows:
            mp = 1.0 if opts["cls_token"] else 0.0  # weight of the pooled (prefix) row, the same in every variant
            q = attn.q_norm(mp * pq[:, p, None] + bq).expand(B, n, H, d) * attn.scale  # (B, n, H, d)
            if plain_qk:  # keys affine in m: the fused op (C++ on CPU, Triton on CUDA)
                ctx = masked_variant_attention(q, pk, pv, idx, m, valid, log_nz[sl], bk, bv).reshape(B, n, H * d)
            else:
                k_act = attn.k_norm(m[None, :, :, None, None] * pk[:, idx] + bk)  # (B, n, A, H, d)
                s_act = torch.einsum("bnhd,bnahd->bnha", q, k_act).masked_fill(~valid[None, :, None, :], -math.inf)
                s_zero = torch.einsum("bnhd,hd->bnh", q, k_zero) + log_nz[None, sl, None]
                probs = torch.cat([s_act, s_zero.unsqueeze(-1)], -1).softmax(-1)
                # sum_a alpha_a (m_a P_v + b_v) + alpha_z b_v = b_v + sum_a (alpha_a m_a) P_v[idx_a]: weights sum to 1
                wv = probs[..., :A] * m[None, :, None, :]
                ctx = (torch.einsum("bnha,bnahd->bnhd", wv, pv[:, idx]) + bv).reshape(B, n, H * d)
            if opts["residual"] == "unmasked":
                r = x[:, p, None].expand(B, n, D)
            elif opts["residual"] == "masked":
                r = (mp * x[:, p, None]).expand(B, n, D)
            else:
                r = (mp * u[:, p, None]).expand(B, n, D)
            z_rows.append(finish_rows(ctx, (mp * u[:, p, None]).expand(B, n, D), r))
        z = torch.stack(z_rows, dim=2).reshape(B * n, len(rows), D)  # only the rows the head pools
        scores.append(model.forward_head(model.norm(z)).view(B, n, -1))
    return torch.cat(scores, dim=1), logits


def _supports(adapter, opts) -> list[str]:
    reasons = []
    if opts["target_block"] % adapter.depth != adapter.depth - 1:
        reasons.append("the fused ReciproCAM path covers the last block (target_block=-1); other blocks run on the "
                       "reference path")
    if adapter.global_pool != "token" and not adapter.distilled:
        reasons.append(f"the fused ReciproCAM path needs a token-pooled head (global_pool='token'), the model "
                       f"pools with {adapter.global_pool!r}")
    return reasons


@ReciproCAM.instance.register("fused", resolves_targets=True, supports=_supports)
def reciprocam_fused(adapter, images, resolve, opts) -> MethodResult:
    with torch.no_grad():
        scores, logits = last_block_scores(adapter, images, opts)
    if opts["score"] == "softmax":
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1)
    targets = resolve(logits)
    maps = scores_to_maps(scores, targets, adapter.grid_for(*images.shape[-2:]), opts)
    return MethodResult(maps=maps, targets=targets, logits=logits)
