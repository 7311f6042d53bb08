"""Chefer et al. CVPR'21 Transformer attribution ("LRP"): the relevance rules (docs/methods/lrp.md §1).

Reference: hila-chefer/Transformer-Explainability, `baselines/ViT/ViT_LRP.py` + `modules/layers_ours.py`, method
"grad". The user's stock timm model is run as-is; the relevance rules of `layers_ours` (alpha = 1, beta = 0) are
applied here in plain torch to the tensors the adapter records, one image at a time in every sum:

- Linear (head, qkv, proj, fc1, fc2): z+ rule with the bias ignored (the beta = 0 inhibitor term is dropped: exact).
- LayerNorm (norm1, norm2, q_norm, k_norm, final norm, fc_norm, Mlp.norm), GELU, softmax, dropout, drop-path and
  LayerScale: identity.
- Both attention matmuls: gradient x input, halved; matmul1 on the unscaled q k^T.
- Residual Add: proportional split rescaled to the operands' |sums|; Clone: sum of the branches; token pool:
  IndexSelect on token 0.
- Distilled heads (DeiT): logits = head(x0) / 2 + head_dist(x1) / 2 is an Add of the two halves; each half goes
  through its Linear and its IndexSelect (tokens 0 and 1), and the two token relevances are summed (Clone).

Map: Abar^l = mean_h(max(dA^l * R_A^l, 0)); C = (I + Abar^{L-1}) ... (I + Abar^s); map = C[0, P:] (no row norm).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def precision_reasons(adapter) -> list[str]:
    """LRP refuses float16 / bfloat16 (the model's dtype, or autocast at call time): safe_divide's stabiliser 1e-9
    is below float16's smallest subnormal (6e-8), so 1e-9 rounds to 0 and zero sums divide to NaN, and the z+ and
    Add rules divide by sums that bfloat16's 8-bit mantissa resolves so coarsely that maps move by ~0.3 of their
    range (docs/methods/lrp.md §4)."""
    from vitx_fast.engine.gradients import reduced_precision

    dt = reduced_precision(adapter)
    if dt is None:
        return []
    how = "the model is" if adapter.dtype == dt else "torch.autocast runs the model in"
    why = ("float16 rounds to 0 (NaN maps)" if dt == torch.float16
           else "bfloat16 resolves too coarsely (maps off by ~0.3 of their range)")
    return [f"{how} {dt}: the relevance rules divide by sums stabilised with 1e-9 (layers_ours.safe_divide), which "
            f"{why}; run LRP in float32 or float64 (model.float(), outside autocast)"]


def check_precision(adapter) -> None:
    """Raise UnsupportedModelError at call time (autocast may be entered after the plan was made)."""
    reasons = precision_reasons(adapter)
    if reasons:
        from vitx_fast.engine.adapter import UnsupportedModelError

        raise UnsupportedModelError("lrp cannot explain this model: " + "; ".join(reasons))


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """layers_ours.safe_divide, literally: a / (b + 1e-9), 0 where b == 0."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + (den == 0).to(den.dtype) * 1e-9
    return a / den * (b != 0).to(b.dtype)


def linear_relprop(R: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """z+ rule, bias ignored. R: (..., out), x: (..., in), weight: (out, in) -> (..., in)."""
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    S = safe_divide(R, xp @ wp.T + xn @ wn.T)
    return xp * (S @ wp) + xn * (S @ wn)


def add_relprop(R: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Proportional split of R over Z = a + b, rescaled by |sums|; sums per sample. All (B, ...)."""
    dims = tuple(range(1, R.dim()))
    S = safe_divide(R, a + b)
    ra, rb = a * S, b * S
    sa, sb, sr = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True), R.sum(dims, keepdim=True)
    fa = safe_divide(sa.abs(), sa.abs() + sb.abs()) * sr
    fb = safe_divide(sb.abs(), sa.abs() + sb.abs()) * sr
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def clone_relprop(x: torch.Tensor, *branches: torch.Tensor) -> torch.Tensor:
    """Relevance of x from the relevances of its copies: x * sum_i (R_i / x)."""
    return x * sum(safe_divide(r, x) for r in branches)


def matmul_relprop(R: torch.Tensor, a: torch.Tensor, b: torch.Tensor, b_t: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x input for Z = a @ b (b_t False) or a @ b^T (b_t True), each half. a, b, R: (B, H, ., .)."""
    S = safe_divide(R, a @ (b.transpose(-2, -1) if b_t else b))
    ra = a * (S @ (b if b_t else b.transpose(-2, -1)))
    rb = b * ((S.transpose(-2, -1) @ a) if b_t else (a.transpose(-2, -1) @ S))
    return ra / 2, rb / 2


def _block_relprop(blk: nn.Module, rec, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """R: (B, T, D) at the block output z -> (R at the block input x (B, T, D), R_A (B, H, T, T) after halving)."""
    x, y, at = rec.x, rec.y, rec.attn
    B, T, _ = x.shape
    mlp = blk.mlp
    # the MLP branch's intermediates are recomputed (the adapter keeps only the block states)
    n2 = blk.norm2(y)
    g = mlp.norm(mlp.drop1(mlp.act(mlp.fc1(n2))))
    b2 = blk.drop_path2(blk.ls2(mlp.drop2(mlp.fc2(g))))
    b1 = blk.drop_path1(blk.ls1(at.out))

    R_skip, R_mlp = add_relprop(R, y, b2)
    R_mlp = linear_relprop(linear_relprop(R_mlp, g, mlp.fc2.weight), n2, mlp.fc1.weight)
    R = clone_relprop(y, R_skip, R_mlp)

    R_skip, R_att = add_relprop(R, x, b1)
    R_ctx = linear_relprop(R_att, at.context, blk.attn.proj.weight)
    H, d = at.v.shape[1], at.v.shape[-1]
    R_ctx = R_ctx.view(B, T, H, d).transpose(1, 2)  # 'b n (h d) -> b h n d'
    R_A, R_v = matmul_relprop(R_ctx, at.probs, at.v, b_t=False)
    R_q, R_k = matmul_relprop(R_A, at.q, at.k, b_t=True)  # unscaled q k^T, after q_norm / k_norm
    R_qkv = torch.stack([R_q, R_k, R_v], dim=2).permute(0, 3, 2, 1, 4).reshape(B, T, 3 * H * d)
    R_att = linear_relprop(R_qkv, rec.u, blk.attn.qkv.weight)
    return clone_relprop(x, R_skip, R_att), R_A


def _head_relprop(adapter, rec, targets: torch.Tensor) -> torch.Tensor:
    """One-hot R at the logits -> R at the final-norm output (B, T, D)."""
    m, final = adapter.model, rec.final
    R = torch.nn.functional.one_hot(targets, rec.output.shape[-1]).to(final.dtype)
    if adapter.distilled:
        x0, x1 = m.head_drop(final[:, 0]), m.head_drop(final[:, 1])
        Ra, Rb = add_relprop(R, m.head(x0) / 2, m.head_dist(x1) / 2)
        Ra, Rb = linear_relprop(Ra, x0, m.head.weight), linear_relprop(Rb, x1, m.head_dist.weight)
        pooled = [(0, Ra), (1, Rb)]
    else:
        pooled = [(0, linear_relprop(R, m.head_drop(m.fc_norm(final[:, 0])), m.head.weight))]
    outs = []
    for tok, r in pooled:  # IndexSelect: X * (R / X) on the selected token, zeros elsewhere
        out = torch.zeros_like(final)
        out[:, tok] = final[:, tok] * safe_divide(r, final[:, tok])
        outs.append(out)
    if len(outs) == 1:
        return outs[0]
    # distilled: the final tokens feed two IndexSelects, so a Clone joins them: X * (R_a / X + R_b / X)
    return clone_relprop(final, *outs)


def chefer_relprop(adapter, rec, targets: torch.Tensor, start_layer: int = 0):
    """Relevance propagation from the one-hot logits down to the input of block `start_layer`.

    Returns (cams, sums): cams[l] = R_A^l (B, H, T, T) for l >= start_layer (None below); sums (B, 1 + L - s) holds
    sum R per image at the head's input tokens, then at the inputs of blocks L-1, ..., s (conservation check).
    """
    blocks = adapter.model.blocks
    with torch.no_grad():
        R = _head_relprop(adapter, rec, targets)
        sums, cams = [R.sum((1, 2))], [None] * len(blocks)
        for i in range(len(blocks) - 1, start_layer - 1, -1):
            R, cams[i] = _block_relprop(blocks[i], rec.blocks[i], R)
            sums.append(R.sum((1, 2)))
    return cams, torch.stack(sums, dim=1)
