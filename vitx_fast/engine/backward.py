"""The gradient engine of the fast paths (GAE, DAAM, gradient rollout, LRP): one forward that keeps what the
backward needs, then one batched backward for K seeds per image, walking the blocks from the top down.

Why it is cheaper than autograd or the plain VJPs of `vitx_fast.engine.vjp` (docs/methods/gae.md §5):

- the forward keeps the qkv output, the MLP pre-activation (fc1 output) and the LayerNorm statistics instead of
  recomputing them in the backward ("save" mode); under a tight memory budget it keeps only each block's input and
  recomputes the block in the backward ("recompute" mode, one extra forward);
- the forward runs fused SDPA everywhere; the (H, T, T) probabilities are recomputed from the kept q and k, one block
  at a time, only where a method needs them (and with the same operations as the adapter's capture);
- no parameter gradient is formed; the fused backward kernels of LayerNorm, GELU and softmax replace hand-written
  element-wise formulas;
- the head reads only the pooled rows (the class token, and the distillation token of a distilled head), so the top
  block's forward after the attention scores, and its backward through the MLP, proj and softmax, are computed for
  those rows only; its key and value gradients are rank-r outer products;
- the backward stops at block `stop`, and in that block at the tensors a method asks for (nothing through its qkv);
- K target classes per image are one backward: the seeds are stacked (B, K, C) and every activation of the forward
  is broadcast over K, so each weight is read once per block for all classes.

Only models whose every module has an explicit VJP (`vjp.not_supported_reasons` empty) run here; the others use
autograd (`vitx_fast.engine.gradients`).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitx_fast.engine.blocks import attention_residual
from vitx_fast.engine.dispatch import tracing

_aten = torch.ops.aten


# ---------------------------------------------------------------- fused element-wise VJPs, batched over K
def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def ln_forward(ln: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """LayerNorm (or Identity) of x (..., D) and its (mean, rstd) (..., 1): the kernel nn.LayerNorm calls."""
    if _is_identity(ln):
        return x, None
    out, mean, rstd = _aten.native_layer_norm(x, list(ln.normalized_shape), ln.weight, ln.bias, ln.eps)
    return out, (mean, rstd)


def _repeat_k(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B, ...) -> (B * k, ...) with each image repeated k times (a copy: some kernels misread stride-0 inputs)."""
    return t.repeat_interleave(k, dim=0)


def ln_backward(ln: nn.Module, x: torch.Tensor, stats, g: torch.Tensor) -> torch.Tensor:
    """VJP of LayerNorm at x (B, *S) for cotangents g (B, K, *S); no weight or bias gradient."""
    if stats is None:
        return g
    mean, rstd = stats
    B, K = g.shape[:2]
    if K == 1:
        gi, xi, mi, ri = g.reshape(x.shape), x, mean, rstd
    else:
        gi, xi, mi, ri = g.reshape(B * K, *x.shape[1:]), _repeat_k(x, K), _repeat_k(mean, K), _repeat_k(rstd, K)
    out = _aten.native_layer_norm_backward(gi.to(x.dtype), xi, list(ln.normalized_shape), mi, ri, ln.weight,
                                           ln.bias, [True, False, False])[0]
    return out.view(g.shape)


def gelu_backward(act: nn.GELU, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """VJP of GELU at its input h (B, *S) for g (B, K, *S)."""
    g = g.to(h.dtype)
    if g.shape[1] == 1:
        return _aten.gelu_backward(g.reshape(h.shape), h, approximate=act.approximate).view(g.shape)
    # the derivative once for all K cotangents
    return g * _aten.gelu_backward(torch.ones_like(h), h, approximate=act.approximate).unsqueeze(1)


def softmax_backward(g: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """VJP of softmax over the last dim: probs * (g - sum(g * probs)); probs broadcast to g's shape."""
    return _aten._softmax_backward_data(g.to(probs.dtype), probs.expand(g.shape), -1, probs.dtype)


def layerscale_backward(ls: nn.Module, g: torch.Tensor) -> torch.Tensor:
    return g if _is_identity(ls) else g * ls.gamma


def pooled_rows(adapter) -> int:
    """Rows of the last block the head reads: the class token, and the distillation token of a distilled head."""
    return 2 if adapter.distilled else 1


# ---------------------------------------------------------------- forward with saves
@dataclass
class BlockSaved:
    """What the backward of one block reads; B images, T tokens, D = H * d, R = T (or the pooled rows r of the top
    block).

    x: (B, T, D) block input; ln1: its LayerNorm (mean, rstd) (B, T, 1); qkv: (B, T, 3D) qkv output (bias included);
    q, k, v: (B, H, T, d) after q_norm / k_norm, q not scaled; y: (B, R, D) after the attention residual; ln2: (mean,
    rstd) of y; h: (B, R, 4D) fc1 output (the GELU input); probs_rows: (B, H, r, T) the top block's probabilities of
    its r query rows (None elsewhere); attn_out, mlp_out: (B, R, D) the proj and fc2 outputs (bias included; kept
    only when asked for, e.g. LRP); sdpa_out (B, H, T, d) and lse (B, H, T): the fused attention's output and
    log-sum-exp, for the fused attention backward.
    """

    x: torch.Tensor
    ln1: tuple | None
    qkv: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    y: torch.Tensor
    ln2: tuple | None
    h: torch.Tensor
    rows: int | None = None
    probs_rows: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    sdpa_out: torch.Tensor | None = None
    lse: torch.Tensor | None = None


def scores(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scaled scores exactly as the adapter's capture forms them: (q * scale) @ k^T."""
    return (q * attn.scale) @ k.transpose(-2, -1)


def block_forward(blk: nn.Module, x: torch.Tensor, *, rows: int | None = None, keep_outputs: bool = False,
                  fused_backward: bool = False) -> tuple[BlockSaved, torch.Tensor]:
    """One pre-norm block on x (B, T, D) -> (saved tensors, block output z (B, R, D)).

    rows: carry only the first `rows` query rows past the attention scores (the top block: the head reads no other).
    fused_backward: call the CPU flash-attention kernel directly and keep its log-sum-exp for its backward.
    """
    attn = blk.attn
    B, T, _ = x.shape
    H, d = attn.num_heads, attn.head_dim
    u, ln1 = ln_forward(blk.norm1, x)
    qkv = attn.qkv(u)
    q_raw, k_raw, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q_raw), attn.k_norm(k_raw)
    probs_rows = sdpa_out = lse = None
    if rows is not None:
        probs_rows = scores(attn, q[:, :, :rows], k).softmax(dim=-1)
        ctx = (probs_rows @ v).transpose(1, 2).reshape(B, rows, H * d)
        x_rows = x[:, :rows]
    else:
        if fused_backward:
            sdpa_out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False,
                                                                              scale=attn.scale)[:2]
            o = sdpa_out
        else:
            o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        ctx = o.transpose(1, 2).reshape(B, T, H * d)
        x_rows = x
    out = attn.proj(ctx)  # plain attention: no output norm, no gate (vjp.not_supported_reasons)
    # an in-place LayerScale would overwrite a kept output
    y = attention_residual(blk, x_rows, out.clone() if keep_outputs and _inplace(blk.ls1) else out)
    n2, ln2 = ln_forward(blk.norm2, y)
    h = blk.mlp.fc1(n2)
    m = blk.mlp.fc2(blk.mlp.act(h))
    z = y + blk.drop_path2(blk.ls2(m.clone() if keep_outputs and _inplace(blk.ls2) else m))
    saved = BlockSaved(x=x, ln1=ln1, qkv=qkv, q=q, k=k, v=v, y=y, ln2=ln2, h=h, rows=rows, probs_rows=probs_rows,
                       attn_out=out if keep_outputs else None, mlp_out=m if keep_outputs else None,
                       sdpa_out=sdpa_out, lse=lse)
    return saved, z


def _inplace(ls: nn.Module) -> bool:
    return bool(getattr(ls, "inplace", False))


@dataclass
class SavedForward:
    """A no-grad forward of B images with what the backward needs.

    blocks: per block a BlockSaved ("save" mode), or only the block input x (B, T, D) ("recompute" mode; the top
    block is always saved); z_rows: (B, r, D) the top block's pooled rows; final_rows: model.norm of them, with
    norm_stats; logits: (B, C).
    """

    adapter: object
    blocks: list
    z_rows: torch.Tensor
    final_rows: torch.Tensor
    norm_stats: tuple | None
    logits: torch.Tensor
    mode: str
    keep_outputs: bool
    fused_backward: bool

    def block(self, i: int) -> BlockSaved:
        """The saved tensors of block i, recomputed from its input in "recompute" mode (same kernels: identical)."""
        b = self.blocks[i]
        if isinstance(b, BlockSaved):
            return b
        return block_forward(self.adapter.model.blocks[i], b, keep_outputs=self.keep_outputs,
                             fused_backward=self.fused_backward)[0]

    def probs(self, i: int) -> torch.Tensor:
        """(B, H, T, T) post-softmax attention of block i, recomputed from its q and k as the adapter forms it (the
        top block's q is kept for every row, so this also serves the top block)."""
        s = self.block(i)
        return scores(self.adapter.model.blocks[i].attn, s.q, s.k).softmax(dim=-1)


def fused_attention_backward_available(adapter) -> bool:
    """The CPU flash-attention backward (eager only: it is not an operator ONNX can hold)."""
    return (adapter.device.type == "cpu" and adapter.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu") and not tracing())


def forward_saved(adapter, images: torch.Tensor, *, mode: str = "save", keep_outputs: bool = False,
                  fused_backward: bool = False) -> SavedForward:
    """images (B, C, H, W) -> SavedForward. mode: "save" or "recompute" (see the module docstring). keep_outputs:
    also keep each block's proj and fc2 outputs (LRP's z+ denominators reuse them). fused_backward: keep what the
    fused attention backward needs (methods that need no attention probabilities, e.g. DAAM)."""
    if mode not in ("save", "recompute"):
        raise ValueError(f"mode must be 'save' or 'recompute', got {mode!r}")
    m = adapter.model
    r = pooled_rows(adapter)
    with torch.no_grad():
        x = adapter.embed(images)
        blocks = []
        for i in range(adapter.depth):
            top = i == adapter.depth - 1
            s, z = block_forward(m.blocks[i], x, rows=r if top else None, keep_outputs=keep_outputs,
                                 fused_backward=fused_backward and not top)
            blocks.append(s if (mode == "save" or top) else x)
            x = z
        final, norm_stats = ln_forward(m.norm, x)
        logits = m.forward_head(final)
    return SavedForward(adapter, blocks, x, final, norm_stats, logits, mode, keep_outputs, fused_backward)


# ---------------------------------------------------------------- batched backward
@dataclass
class BlockGrads:
    """Gradients of <seed_k, head output> at one block, for K seeds per image; R = T, or the pooled rows r of the
    top block (every other row of its probabilities' gradient is exactly zero).

    probs: (B, H, R, T) post-softmax attention (None when not asked for); g_probs: (B, K, H, R, T) at the
    probabilities; g_scores: (B, K, H, R, T) at the scaled pre-softmax scores; g_context: (B, K, R, D) at the proj
    input (the merged attention context); saved: the block's BlockSaved.
    """

    index: int
    rows: int | None
    probs: torch.Tensor | None
    g_probs: torch.Tensor | None
    g_scores: torch.Tensor | None
    g_context: torch.Tensor
    saved: BlockSaved


def head_backward(sf: SavedForward, seeds: torch.Tensor) -> torch.Tensor:
    """seeds (B, K, C) cotangents of the logits -> gradient at the top block's pooled rows z (B, K, r, D)."""
    adapter, m = sf.adapter, sf.adapter.model
    B, K = seeds.shape[:2]
    seeds = seeds.to(sf.final_rows.dtype)
    g = sf.final_rows.new_zeros(B, K, *sf.final_rows.shape[1:])
    if adapter.distilled:
        g[:, :, 0] = (0.5 * seeds) @ m.head.weight
        g[:, :, 1] = (0.5 * seeds) @ m.head_dist.weight
    else:
        gp = seeds @ m.head.weight  # (B, K, D) at the pooled, fc_norm'd class-token row
        if not _is_identity(m.fc_norm):
            _, st = ln_forward(m.fc_norm, sf.final_rows[:, 0])
            gp = ln_backward(m.fc_norm, sf.final_rows[:, 0], st, gp)
        g[:, :, 0] = gp
    return ln_backward(m.norm, sf.z_rows, sf.norm_stats, g)


def _qk_norm_backward(norm: nn.Module, raw: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """q_norm / k_norm VJP. raw: (B, H, R, d) before the norm; g: (B, H, K, R, d) -> (B, H, K, R, d)."""
    if _is_identity(norm):
        return g
    _, st = ln_forward(norm, raw)
    return ln_backward(norm, raw, st, g.transpose(1, 2)).transpose(1, 2)


def backward_blocks(sf: SavedForward, seeds: torch.Tensor, *, stop: int = 0, probs: bool = True,
                    scores: bool = False) -> Iterator[BlockGrads]:
    """Yield BlockGrads for blocks L-1 down to `stop`, for seeds (B, K, C).

    probs: the method reads the probabilities and their gradient (GAE, LRP, gradient rollout); scores: it reads the
    gradient at the pre-softmax scores. With neither (DAAM) only g_context is formed, and on CPU the attention
    backward is the fused flash kernel when the forward kept its log-sum-exp.
    """
    adapter = sf.adapter
    model = adapter.model
    g = head_backward(sf, seeds)  # (B, K, r, D), rows of z
    L = adapter.depth
    for i in range(L - 1, stop - 1, -1):
        blk, s = model.blocks[i], sf.block(i)
        attn = blk.attn
        T = s.x.shape[1]
        R = T if s.rows is None else s.rows
        down = i > stop
        # MLP residual: z = y + ls2(fc2(gelu(fc1(norm2(y)))))
        gh = layerscale_backward(blk.ls2, g) @ blk.mlp.fc2.weight
        gn = gelu_backward(blk.mlp.act, s.h, gh) @ blk.mlp.fc1.weight
        del gh
        g_y = g + ln_backward(blk.norm2, s.y, s.ln2, gn)
        del gn, g
        g_ctx = layerscale_backward(blk.ls1, g_y) @ attn.proj.weight  # (B, K, R, D)
        p = g_p = g_s = g_u = None
        if probs or scores or down:
            if s.rows is None and not (probs or scores) and s.lse is not None:
                g_u = _fused_attention_backward(attn, s, g_ctx)
            else:
                p, g_p, g_s, g_u = _attention_backward(attn, s, g_ctx, need_scores=scores or down, down=down)
        yield BlockGrads(index=i, rows=s.rows, probs=p if probs else None,
                         g_probs=None if g_p is None or not probs else g_p.transpose(1, 2),
                         g_scores=None if g_s is None or not scores else g_s.transpose(1, 2), g_context=g_ctx,
                         saved=s)
        del p, g_p, g_s, g_ctx
        if down:
            g = ln_backward(blk.norm1, s.x, s.ln1, g_u)
            if R == T:
                g = g + g_y
            else:  # the residual carries gradient on the pooled rows only
                g[:, :, :R] += g_y
        del g_u, g_y


def _attention_backward(attn, s: BlockSaved, g_ctx: torch.Tensor, need_scores: bool, down: bool):
    """Explicit backward of ctx = softmax(q k^T * scale) v for R query rows. g_ctx: (B, K, R, D).

    Returns probs (B, H, R, T), g_probs and g_scores (B, H, K, R, T) (g_scores None unless need_scores), and g_u
    (B, K, T, D) at the qkv input (None unless down).
    """
    B, K, R, D = g_ctx.shape
    H, d, T = attn.num_heads, attn.head_dim, s.k.shape[2]
    p = s.probs_rows if s.rows is not None else scores(attn, s.q, s.k).softmax(dim=-1)  # (B, H, R, T)
    gc = g_ctx.view(B, K, R, H, d).permute(0, 3, 1, 2, 4)  # (B, H, K, R, d)
    g_p = (gc.reshape(B, H, K * R, d) @ s.v.transpose(-2, -1)).view(B, H, K, R, T)
    g_s = softmax_backward(g_p, p.unsqueeze(2)) if need_scores else None
    if not down:
        return p, g_p, g_s, None
    q_rows = s.q[:, :, :R]
    g_q = (g_s.reshape(B, H, K * R, T) @ s.k).view(B, H, K, R, d) * attn.scale
    g_k = (q_rows.transpose(-2, -1).unsqueeze(2) @ g_s).transpose(-2, -1) * attn.scale  # (B,H,K,T,d)
    # g_v[k] = p^T gc[k]: the K cotangents side by side as columns, so p is read once
    g_v = (p.transpose(-2, -1) @ gc.permute(0, 1, 3, 2, 4).reshape(B, H, R, K * d)).view(B, H, T, K, d)
    if not _is_identity(attn.q_norm) or not _is_identity(attn.k_norm):
        q_raw, k_raw, _ = s.qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        g_q = _qk_norm_backward(attn.q_norm, q_raw[:, :, :R], g_q)
        g_k = _qk_norm_backward(attn.k_norm, k_raw, g_k)
    w = attn.qkv.weight  # (3D, D)
    g_kv = torch.stack([g_k.permute(0, 2, 3, 1, 4), g_v.permute(0, 3, 2, 1, 4)], dim=3)  # (B, K, T, 2, H, d)
    if R == T:
        g_qkv = torch.cat([g_q.permute(0, 2, 3, 1, 4).unsqueeze(3), g_kv], dim=3).view(B, K, T, 3 * D)
        return p, g_p, g_s, g_qkv @ w
    # top block: the query gradient lives on the pooled rows only
    g_u = g_kv.view(B, K, T, 2 * D) @ w[D:]
    g_u[:, :, :R] += g_q.permute(0, 2, 3, 1, 4).reshape(B, K, R, D) @ w[:D]
    return p, g_p, g_s, g_u


def _fused_attention_backward(attn, s: BlockSaved, g_ctx: torch.Tensor) -> torch.Tensor:
    """The CPU flash-attention backward (no (T, T) matrix is formed) -> g_u (B, K, T, D) at the qkv input."""
    B, K, T, D = g_ctx.shape
    H, d = attn.num_heads, attn.head_dim
    go = g_ctx.view(B * K, T, H, d).transpose(1, 2)
    rep = (lambda t: t) if K == 1 else (lambda t: _repeat_k(t, K))
    g_q, g_k, g_v = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        go, rep(s.q), rep(s.k), rep(s.v), rep(s.sdpa_out), rep(s.lse), 0.0, False, scale=attn.scale)
    g_q, g_k, g_v = (t.view(B, K, H, T, d).transpose(1, 2) for t in (g_q, g_k, g_v))  # (B, H, K, T, d)
    if not _is_identity(attn.q_norm) or not _is_identity(attn.k_norm):
        q_raw, k_raw, _ = s.qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        g_q = _qk_norm_backward(attn.q_norm, q_raw, g_q)
        g_k = _qk_norm_backward(attn.k_norm, k_raw, g_k)
    g_qkv = torch.stack([t.permute(0, 2, 3, 1, 4) for t in (g_q, g_k, g_v)], dim=3).view(B, K, T, 3 * D)
    return g_qkv @ attn.qkv.weight
