"""The pre-norm ViT block, written once: every path that re-runs part of a block (the adapter's instrumented
forward, ReciproCAM's masked tail, AGCAM's CLS-row chain, T-TAME's feature capture) calls these.

    y = x + drop_path1(ls1(attn(norm1(x))))        attention residual
    z = y + drop_path2(ls2(mlp(norm2(y))))         MLP residual
with attn(u) = proj_drop(proj(gate(u) * norm(context))) and context = softmax(q k^T * scale) v, heads merged.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def attention_output(attn: nn.Module, context: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """The rest of timm's Attention after the merged context: output norm, gate (from the attention input u), proj.

    context: (..., H*d) heads merged; u: (..., D) the attention input (only read when the attention is gated).
    Returns (..., D).
    """
    o = attn.norm(context)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(u).sigmoid()
    return attn.proj_drop(attn.proj(o))


def attention_residual(blk: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """y = x + drop_path1(ls1(attn_out)); x, attn_out: (..., D)."""
    return x + blk.drop_path1(blk.ls1(attn_out))


def mlp_residual(blk: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """z = y + drop_path2(ls2(mlp(norm2(y)))); y: (..., D)."""
    return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))


def block_tail(blk: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z) of one block from its residual input x and attention output; all (..., D)."""
    y = attention_residual(blk, x, attn_out)
    return y, mlp_residual(blk, y)
