"""Pieces shared by the fused (fast) implementations."""
from __future__ import annotations

import torch

from vitx_fast.models.timm_adapter import ForwardRecord


def graph_forward(adapter, images: torch.Tensor, capture: str = "full") -> ForwardRecord:
    """Forward with an autograd graph rooted at the block-0 input (works with frozen parameters and under no_grad);
    the caller differentiates the recorded tensors. images: (B, C, H, W). capture: see ViTAdapter.attention."""
    with torch.enable_grad():
        return adapter.forward(images, tokens_hook=lambda x: x.detach().requires_grad_(True), capture=capture)


def target_columns(targets: torch.Tensor) -> list[torch.Tensor]:
    """(B,) -> [targets]; (B, K) -> K columns (B,)."""
    return [targets] if targets.dim() == 1 else list(targets.unbind(1))


def stack_columns(maps: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return maps[0] if targets.dim() == 1 else torch.stack(maps, dim=1)


def row_chain_plus_identity(mats: list[torch.Tensor]) -> torch.Tensor:
    """Row 0 of (I + M_{L-1}) ... (I + M_0) for mats L x (B, T, T) in block order, as L GEMVs from the top:
    r <- r + r M_l. Returns (B, T)."""
    B, T, _ = mats[0].shape
    r = torch.zeros(B, 1, T, dtype=mats[0].dtype, device=mats[0].device)
    r[:, 0, 0] = 1
    for m in reversed(mats):
        r = r + torch.bmm(r, m)
    return r[:, 0]


def logit_grads(rec: ForwardRecord, target: torch.Tensor, tensors: list[torch.Tensor], retain: bool):
    """d(sum_b logits[b, target[b]]) / d(tensors); each image's logit depends only on that image."""
    with torch.enable_grad():
        score = rec.output.gather(1, target.view(-1, 1)).sum()
        return [g.detach() for g in torch.autograd.grad(score, tensors, retain_graph=retain)]
