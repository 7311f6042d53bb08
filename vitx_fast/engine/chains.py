"""Chains of per-block token-mixing matrices, as rollout-style methods build them.

Rollout, gradient rollout, GAE and LRP all end in a product over blocks of (T, T) matrices read at the class-token
row. The reference paths form the product; the fast paths push one row vector through the chain from the top block
down (L GEMVs instead of L T^3 products), which is the same number in exact arithmetic.
"""
from __future__ import annotations

import torch


def identity_mix(fused: torch.Tensor, renorm: str) -> torch.Tensor:
    """Rollout's per-block step a = (F + I) / 2, renormalised. fused: (B, T, T).

    renorm="row": rows sum to 1. renorm="jacobgil": vit-explain's `a / a.sum(dim=-1)` without keepdim, which
    broadcasts the row sums over columns: a[i, j] / sum_k a[j, k] (vit-explain issue #16).
    """
    T = fused.shape[-1]
    a = (fused + torch.eye(T, dtype=fused.dtype, device=fused.device)) / 2
    if renorm == "row":
        return a / a.sum(dim=-1, keepdim=True)
    if renorm == "jacobgil":
        return a / a.sum(dim=-1).unsqueeze(-2)
    raise ValueError(f"renorm must be 'row' or 'jacobgil', got {renorm!r}")


def matrix_chain(mats: list[torch.Tensor]) -> torch.Tensor:
    """mats: L x (B, T, T) in block order -> a^{L-1} ... a^0, (B, T, T) (the reference form)."""
    B, T, _ = mats[0].shape
    result = torch.eye(T, dtype=mats[0].dtype, device=mats[0].device).expand(B, T, T)
    for a in mats:
        result = a @ result
    return result


def row_chain(mats: list[torch.Tensor], row: int = 0) -> torch.Tensor:
    """Row `row` of a^{L-1} ... a^0 for mats L x (B, T, T) in block order, as L GEMVs from the top. Returns (B, T)."""
    B, T, _ = mats[0].shape
    r = torch.zeros(B, 1, T, dtype=mats[0].dtype, device=mats[0].device)
    r[:, 0, row] = 1
    for a in reversed(mats):
        r = torch.bmm(r, a)
    return r[:, 0]


def row_chain_plus_identity(mats: list[torch.Tensor], row: int = 0) -> torch.Tensor:
    """Row `row` of (I + M_{L-1}) ... (I + M_0) for mats L x (B, T, T) in block order: r <- r + r M_l from the top.
    Returns (B, T)."""
    B, T, _ = mats[0].shape
    r = torch.zeros(B, 1, T, dtype=mats[0].dtype, device=mats[0].device)
    r[:, 0, row] = 1
    for m in reversed(mats):
        r = r + torch.bmm(r, m)
    return r[:, 0]


def matrix_chain_plus_identity(mats: list[torch.Tensor]) -> torch.Tensor:
    """(I + M_{L-1}) ... (I + M_0) as GAE's reference writes it, R <- R + M_l R. mats: L x (B, T, T) -> (B, T, T)."""
    B, T, _ = mats[0].shape
    R = torch.eye(T, dtype=mats[0].dtype, device=mats[0].device).expand(B, T, T)
    for m in mats:
        R = R + m @ R
    return R


def row_step_plus_identity(r: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    """One step r <- r + r M of `row_chain_plus_identity`, for K row vectors per image, from the top block down.

    r: (B, K, T), or None for the first step from r = e_0, which reads only row 0 of M (so the top block's matrix
    may hold just its pooled rows); m: (B, K, R, T) with R = T (or R >= 1 on the first step). Returns (B, K, T).
    """
    if r is None:
        r = m[..., 0, :].clone()
        r[..., 0] += 1
        return r
    return r + (r.unsqueeze(-2) @ m).squeeze(-2)


def row_step(r: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """One step r <- r a of `row_chain` for K row vectors per image (None: r = e_0, reading row 0 of a).
    a: (B, K, T, T) -> (B, K, T)."""
    if r is None:
        return a[..., 0, :].clone()
    return (r.unsqueeze(-2) @ a).squeeze(-2)
