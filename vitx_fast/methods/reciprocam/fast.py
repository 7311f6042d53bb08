"""ViT-ReciproCAM fast path for the last-block target (docs/methods/reciprocam.md §5): exact, O(B*N*D) memory.

With a token-pooled head only the pooled prefix rows of the last block matter. In every variant the zeroed tokens share
one key k_norm(b_k) and one value b_v, so the pooled row's softmax over T keys collapses exactly to a softmax over the
<= P + 9 active keys plus one zero-group entry with logit beta + ln(n_z) (the fused op `masked_variant_attention`).
Nothing of size T x T or B x N x T x D exists.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitx_fast.engine.blocks import attention_output, block_tail
from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.methods.reciprocam.reference import GAUSSIAN, scores_to_maps
from vitx_fast.ops import masked_variant_attention

# working set of one chunk of variants per image (gathered active keys/values and the MLP rows); the chunk size
# depends on no input value or batch size, so the program traces with a dynamic batch
CHUNK_BUDGET_BYTES_PER_IMAGE = 8 * 2**20


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


def variant_chunk(active: int, dim: int, hidden: int, itemsize: int, chunk: int | None) -> int:
    """Variants per chunk: the user's `chunk`, or as many as fit CHUNK_BUDGET_BYTES_PER_IMAGE."""
    if chunk:
        return int(chunk)
    per_variant = (3 * active * dim + 2 * hidden + 8 * dim) * itemsize
    return max(1, CHUNK_BUDGET_BYTES_PER_IMAGE // per_variant)


@dataclass
class LastBlockInputs:
    """The last block's input and its bias-free projections, shared by the unmasked prediction and every variant.
    x, u: (B, T, D) input and norm1 output; pq, pk, pv: (B, T, H, d); bq, bk, bv: (H, d) qkv biases."""

    x: torch.Tensor
    u: torch.Tensor
    pq: torch.Tensor
    pk: torch.Tensor
    pv: torch.Tensor
    bq: torch.Tensor
    bk: torch.Tensor
    bv: torch.Tensor


def last_block_inputs(adapter, images: torch.Tensor) -> LastBlockInputs:
    """Blocks 0..L-2 natively (fused SDPA, nothing captured), then the last block's norm1 and bias-free qkv."""
    blk = adapter.model.blocks[-1]
    attn = blk.attn
    H, d = attn.num_heads, attn.head_dim
    x = adapter.run_until(adapter.depth - 1, images, native=True)
    u = blk.norm1(x)
    B, T, _ = x.shape
    weight = attn.qkv.weight
    bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
    pq, pk, pv = F.linear(u, weight).view(B, T, 3, H, d).unbind(2)
    bq, bk, bv = bias.view(3, H, d).unbind(0)
    return LastBlockInputs(x, u, pq, pk, pv, bq, bk, bv)


def finish_rows(blk, ctx: torch.Tensor, u_rows: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The rest of the last block for pooled-row contexts (..., H*d): attention output, then both residuals."""
    return block_tail(blk, residual, attention_output(blk.attn, ctx, u_rows))[1]


def unmasked_logits(adapter, inp: LastBlockInputs) -> torch.Tensor:
    """The model's prediction (B, C) from the pooled rows of the last block only, attending over all T keys."""
    model, blk = adapter.model, adapter.model.blocks[-1]
    attn = blk.attn
    B = inp.x.shape[0]
    k_full, v_full = attn.k_norm(inp.pk + inp.bk), inp.pv + inp.bv
    z0 = []
    for p in pooled_rows(adapter):
        q = attn.q_norm(inp.pq[:, p] + inp.bq) * attn.scale  # (B, H, d)
        a = torch.einsum("bhd,bthd->bht", q, k_full).softmax(-1)
        ctx = torch.einsum("bht,bthd->bhd", a, v_full).reshape(B, -1)
        z0.append(finish_rows(blk, ctx, inp.u[:, p], inp.x[:, p]))
    return model.forward_head(model.norm(torch.stack(z0, 1)))


def variant_scores(adapter, inp: LastBlockInputs, table, log_nz: torch.Tensor, opts, kernels) -> torch.Tensor:
    """Head outputs (B, n, C) of the n variants of one chunk: table = (idx, m, valid) rows of `active_table`."""
    model, blk = adapter.model, adapter.model.blocks[-1]
    attn = blk.attn
    idx, m, valid = table
    B, _, D = inp.x.shape
    H, d, n = attn.num_heads, attn.head_dim, idx.shape[0]
    mp = 1.0 if opts["cls_token"] else 0.0  # weight of the pooled (prefix) row, the same in every variant
    residual = {"unmasked": lambda p: inp.x[:, p], "masked": lambda p: mp * inp.x[:, p],
                "ln1": lambda p: mp * inp.u[:, p]}[opts["residual"]]
    z_rows = []
    for p in pooled_rows(adapter):
        q = attn.q_norm(mp * inp.pq[:, p, None] + inp.bq).expand(B, n, H, d) * attn.scale  # (B, n, H, d)
        ctx = masked_variant_attention(q, inp.pk, inp.pv, idx, m, valid, log_nz, inp.bk, inp.bv, k_norm=attn.k_norm,
                                       kernels=kernels).reshape(B, n, H * d)
        r = residual(p)[:, None].expand(B, n, D)
        z_rows.append(finish_rows(blk, ctx, (mp * inp.u[:, p, None]).expand(B, n, D), r))
    z = torch.stack(z_rows, dim=2).reshape(B * n, len(z_rows), D)  # only the rows the head pools
    return model.forward_head(model.norm(z)).view(B, n, -1)


def last_block_scores(adapter, images: torch.Tensor, opts, kernels=None):
    """Head outputs of every variant, (B, N, C), and the unmasked logits (B, C). images: (B, 3, H, W).

    Memory is O(B*T*D) for the one forward plus O(B*n*A*D) for a chunk of n variants (A <= P + 9 active keys).
    """
    inp = last_block_inputs(adapter, images)
    gh, gw = adapter.grid_for(*images.shape[-2:])
    x = inp.x
    idx, m, valid, n_zero = active_table(gh, gw, adapter.num_prefix_tokens, opts["mask"], opts["cls_token"], x.dtype,
                                         x.device)
    N, A = idx.shape
    log_nz = torch.where(n_zero > 0, torch.log(n_zero.clamp(min=1).to(x.dtype)),
                         torch.full((), -math.inf, dtype=x.dtype, device=x.device))  # (N,)
    logits = unmasked_logits(adapter, inp)
    blk = adapter.model.blocks[-1]
    hidden = getattr(getattr(blk.mlp, "fc1", None), "out_features", 4 * x.shape[-1])
    step = variant_chunk(A, x.shape[-1], hidden, x.element_size(), opts.get("chunk"))
    scores = [variant_scores(adapter, inp, (idx[sl], m[sl], valid[sl]), log_nz[sl], opts, kernels)
              for sl in (slice(c0, min(c0 + step, N)) for c0 in range(0, N, step))]
    return torch.cat(scores, dim=1), logits


def _plain_qk(adapter) -> bool:
    attn = adapter.model.blocks[-1].attn
    return isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)


class ReciproCAMFast(Implementation):
    OPS = ("masked_variant_attention",)

    def not_supported_reasons(self, adapter, opts, kernels=None, auto=False):
        reasons = super().not_supported_reasons(adapter, opts, kernels, auto)
        if adapter is None:
            return reasons
        if opts["target_block"] % adapter.depth != adapter.depth - 1:
            reasons.append("the fast ReciproCAM path covers the last block (target_block=-1); other blocks run on the "
                           "reference path")
        if adapter.global_pool != "token" and not adapter.distilled:
            reasons.append(f"the fast ReciproCAM path needs a token-pooled head (global_pool='token'), the model "
                           f"pools with {adapter.global_pool!r}")
        if kernels not in (None, "reference") and not _plain_qk(adapter):
            reasons.append("qk_norm makes the masked keys non-affine in the mask weight: the fused op's "
                           f"{kernels} kernel does not apply")
        return reasons

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        with torch.no_grad():
            scores, logits = last_block_scores(adapter, images, opts, kernels)
        if opts["score"] == "softmax":
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1)
        targets = resolve(logits)
        maps = scores_to_maps(scores, targets, adapter.grid_for(*images.shape[-2:]), opts)
        return MethodResult(maps=maps, targets=targets, logits=logits)
