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
from vitx_fast.methods.reciprocam import ReciproCAM, scores_to_maps, variant_weights


def active_table(weights: torch.Tensor):
    """weights (N, T) -> idx (N, A) active token indices, m (N, A) their weights (0 where padded), n_zero (N,)."""
    active = weights != 0
    counts = active.sum(1)
    a = int(counts.max())
    # stable sort puts active columns first, in token order
    idx = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :a]
    valid = torch.arange(a, device=weights.device)[None] < counts[:, None]
    m = torch.where(valid, weights.gather(1, idx), torch.zeros((), dtype=weights.dtype, device=weights.device))
    return idx, m, valid, weights.shape[1] - counts


def pooled_rows(adapter) -> list[int]:
    """Prefix rows the head reads: CLS, plus the distillation token for a distilled head."""
    return [0, 1] if adapter.distilled else [0]


def last_block_scores(adapter, images: torch.Tensor, opts, chunk: int | None = None):
    """Head outputs of every variant, (B, N, C), and the unmasked logits (B, C). images: (B, 3, H, W)."""
    model = adapter.model
    L = adapter.depth
    blk = model.blocks[L - 1]
    attn = blk.attn
    H, d = attn.num_heads, attn.head_dim
    gh, gw = adapter.grid_for(*images.shape[-2:])
    x = adapter.run_until(L - 1, images)  # (B, T, D), the input of the masked block
    rec = adapter.block(L - 1, x)
    logits = adapter.head(rec.z)  # the unmodified prediction, from the same pass
    u = rec.u
    B, T, _ = x.shape
    w_all = variant_weights(gh, gw, adapter.num_prefix_tokens, opts["mask"], opts["cls_token"], x.dtype, x.device)
    idx, m, valid, n_zero = active_table(w_all)
    N, A = idx.shape

    weight = attn.qkv.weight
    bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
    proj = F.linear(u, weight).view(B, T, 3, H, d)  # bias-free projections P_q, P_k, P_v
    pq, pk, pv = proj.unbind(2)
    bq, bk, bv = bias.view(3, H, d).unbind(0)
    k_zero = attn.k_norm(bk)  # (H, d): the key of every zeroed token
    log_nz = torch.where(n_zero > 0, torch.log(n_zero.clamp(min=1).to(x.dtype)),
                         torch.full((), -math.inf, dtype=x.dtype, device=x.device))  # (N,)

    rows = pooled_rows(adapter)
    z_rows = []
    for p in rows:
        mp = w_all[:, p]  # (N,) weight of the pooled row in each variant
        q = attn.q_norm(mp[None, :, None, None] * pq[:, p, None] + bq) * attn.scale  # (B, N, H, d)
        k_act = attn.k_norm(m[None, :, :, None, None] * pk[:, idx] + bk)  # (B, N, A, H, d)
        v_act = m[None, :, :, None, None] * pv[:, idx] + bv
        s_act = torch.einsum("bnhd,bnahd->bnha", q, k_act).masked_fill(~valid[None, :, None, :], -math.inf)
        s_zero = torch.einsum("bnhd,hd->bnh", q, k_zero) + log_nz[None, :, None]
        probs = torch.cat([s_act, s_zero.unsqueeze(-1)], -1).softmax(-1)
        ctx = torch.einsum("bnha,bnahd->bnhd", probs[..., :A], v_act) + probs[..., A:] * bv
        ctx = ctx.reshape(B, N, H * d)
        o = attn.norm(ctx)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(mp[None, :, None] * u[:, p, None]).sigmoid()
        out = attn.proj_drop(attn.proj(o))
        if opts["residual"] == "unmasked":
            r = x[:, p, None].expand(B, N, -1)
        elif opts["residual"] == "masked":
            r = mp[None, :, None] * x[:, p, None]
        else:
            r = mp[None, :, None] * u[:, p, None]
        y = r + blk.drop_path1(blk.ls1(out))
        z_rows.append(y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y)))))
    z = torch.stack(z_rows, dim=2).reshape(B * N, len(rows), -1)  # only the rows the head pools
    scores = model.forward_head(model.norm(z)).view(B, N, -1)
    return scores, logits


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
