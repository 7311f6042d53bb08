"""Explicit backward passes of timm ViT pieces as plain tensor ops.

The gradient methods need d(logit)/d(attention) or d(logit)/d(proj input). Written as ordinary operators (LayerNorm,
GELU, Linear, softmax and attention VJPs) the whole explanation is one tensor program with no autograd at run time:
torch.export traces it and ONNX can hold it. `not_supported_reasons` names the modules these formulas do not cover;
such models use autograd instead (`vitx_fast.engine.gradients` makes that choice once for every method).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def not_supported_reasons(adapter) -> list[str]:
    from timm.layers import LayerScale, Mlp

    m = adapter.model
    reasons = []

    def ln_ok(mod, name, identity_ok=False):
        if isinstance(mod, nn.Identity) and identity_ok:
            return
        if type(mod) is not nn.LayerNorm and not (type(mod).__name__ == "LayerNorm" and isinstance(mod, nn.LayerNorm)):
            reasons.append(f"{name} is {type(mod).__name__}, not LayerNorm")

    ln_ok(m.norm, "norm", identity_ok=True)
    ln_ok(m.fc_norm, "fc_norm", identity_ok=True)
    if not isinstance(m.head, nn.Linear):
        reasons.append(f"head is {type(m.head).__name__}, not Linear")
    if adapter.global_pool != "token" and not adapter.distilled:
        reasons.append(f"pooling {adapter.global_pool!r} (token pooling only)")
    for i, blk in enumerate(m.blocks):
        ln_ok(blk.norm1, f"blocks[{i}].norm1")
        ln_ok(blk.norm2, f"blocks[{i}].norm2")
        ln_ok(blk.attn.q_norm, f"blocks[{i}].attn.q_norm", identity_ok=True)
        ln_ok(blk.attn.k_norm, f"blocks[{i}].attn.k_norm", identity_ok=True)
        if not isinstance(blk.attn.norm, nn.Identity) or getattr(blk.attn, "gate", None) is not None:
            reasons.append(f"blocks[{i}].attn has an output norm or gate")
        for ls in (blk.ls1, blk.ls2):
            if not isinstance(ls, (nn.Identity, LayerScale)):
                reasons.append(f"blocks[{i}] layer scale {type(ls).__name__}")
        mlp = blk.mlp
        if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity) or not isinstance(mlp.act, nn.GELU):
            reasons.append(f"blocks[{i}].mlp is not a Linear-GELU-Linear Mlp")
    return sorted(set(reasons))


# ---------------------------------------------------------------- elementary VJPs
def layernorm_vjp(ln: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/dx of LayerNorm over the last dim, applied to g (same shape as x). Identity passes g through."""
    if isinstance(ln, nn.Identity):
        return g
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    inv = torch.rsqrt(var + ln.eps)
    xhat = (x - mu) * inv
    gh = g * ln.weight if ln.weight is not None else g
    return inv * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))


def gelu_vjp(act: nn.GELU, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if act.approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = c * (x + 0.044715 * x ** 3)
        t = torch.tanh(inner)
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return g * (cdf + x * pdf)


def layerscale_vjp(ls: nn.Module, g: torch.Tensor) -> torch.Tensor:
    return g if isinstance(ls, nn.Identity) else g * ls.gamma


def mlp_branch_vjp(blk: nn.Module, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g at the block output z = y + ls2(mlp(norm2(y))) -> g at y (the residual path included)."""
    n2 = blk.norm2(y)
    h = blk.mlp.fc1(n2)
    gm = layerscale_vjp(blk.ls2, g) @ blk.mlp.fc2.weight
    gm = gelu_vjp(blk.mlp.act, h, gm) @ blk.mlp.fc1.weight
    return g + layernorm_vjp(blk.norm2, y, gm)


def head_vjp(adapter, z: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """seed (B, C) cotangent of the head output -> gradient at the last block's output z (B, T, D)."""
    m = adapter.model
    if adapter.distilled:
        heads = [(0, m.head, 0.5), (1, m.head_dist, 0.5)]
    else:
        heads = [(0, m.head, 1.0)]
    final = m.norm(z)
    gf = torch.zeros_like(z)
    for tok, head, w in heads:
        gp = (w * seed) @ head.weight  # (B, D) at the pooled (fc_norm'd) row
        if not adapter.distilled:
            gp = layernorm_vjp(m.fc_norm, final[:, tok], gp)
        gf[:, tok] = gf[:, tok] + gp
    return layernorm_vjp(m.norm, z, gf)


def attention_vjp(blk: nn.Module, u: torch.Tensor, probs: torch.Tensor, v: torch.Tensor, g_out: torch.Tensor):
    """Backward of out = proj(A V) with A = softmax(q_norm(q) k_norm(k)^T * scale), q, k, v = qkv(u).

    u: (B, T, D) norm1 output; probs: (B, H, T, T); v: (B, H, T, d); g_out: (B, T, D) at the proj output.
    Returns (g_u (B, T, D), g_probs (B, H, T, T), g_ctx (B, T, D)).
    """
    attn = blk.attn
    B, T, _ = u.shape
    H, d = attn.num_heads, attn.head_dim
    g_ctx = g_out @ attn.proj.weight  # (B, T, H*d)
    gc = g_ctx.view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
    g_probs = gc @ v.transpose(-2, -1)
    g_v = probs.transpose(-2, -1) @ gc
    g_s = probs * (g_probs - (g_probs * probs).sum(-1, keepdim=True))
    qkv = attn.qkv(u).view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)
    q_raw, k_raw = qkv[0], qkv[1]
    q, k = attn.q_norm(q_raw), attn.k_norm(k_raw)
    g_q = layernorm_vjp(attn.q_norm, q_raw, (g_s @ k) * attn.scale)
    g_k = layernorm_vjp(attn.k_norm, k_raw, (g_s.transpose(-2, -1) @ q) * attn.scale)
    g_qkv = torch.stack([g_q, g_k, g_v], dim=0).permute(1, 3, 0, 2, 4).reshape(B, T, 3 * H * d)
    return g_qkv @ attn.qkv.weight, g_probs, g_ctx


def backward_through_blocks(adapter, rec, seed: torch.Tensor, stop: int = 0, keep_rows: slice | None = None):
    """Ordinary gradient of <seed, head output> down to block `stop`, from a no-grad ForwardRecord with full
    probabilities. Returns per block (from `stop` up) the gradients at the probabilities (B, H, T, T) and at the proj
    input (B, T, D) (rows `keep_rows` only when given)."""
    g = head_vjp(adapter, rec.blocks[-1].z, seed)
    g_probs, g_ctx = [None] * adapter.depth, [None] * adapter.depth
    for i in range(adapter.depth - 1, stop - 1, -1):
        blk, b = adapter.model.blocks[i], rec.blocks[i]
        g_y = mlp_branch_vjp(blk, b.y, g)
        g_u, g_probs[i], gc = attention_vjp(blk, b.u, b.attn.probs, b.attn.v, layerscale_vjp(blk.ls1, g_y))
        g_ctx[i] = gc if keep_rows is None else gc[:, keep_rows]
        if i > stop:
            g = g_y + layernorm_vjp(blk.norm1, b.x, g_u)
    return g_probs[stop:], g_ctx[stop:]


def cls_path_backward(adapter, states, z: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """AGCAM's gradient under detached attention inputs: only the CLS residual stream carries gradient.

    states: per block (x0 (B, D) CLS row of the block input, y0 (B, D) CLS row after the attention residual);
    z: (B, T, D) last block output; seed (B, C). Returns delta (B, L, D) = d<seed, logits>/d(proj input, CLS row).
    """
    g = head_vjp(adapter, z, seed)[:, 0]
    deltas = [None] * adapter.depth
    for i in range(adapter.depth - 1, -1, -1):
        blk = adapter.model.blocks[i]
        _, y0 = states[i]
        g = mlp_branch_vjp(blk, y0, g)
        deltas[i] = layerscale_vjp(blk.ls1, g) @ blk.attn.proj.weight
    return torch.stack(deltas, dim=1)


