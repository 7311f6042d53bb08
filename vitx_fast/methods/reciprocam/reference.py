"""ViT-ReciproCAM reference path (docs/methods/reciprocam.md §1).

Each patch k gets a masked copy Ũ = diag(m^(k)) LN1_b(X) of the LayerNorm-1 output of block b; the tail of the network
re-runs on all copies and the class scores of copy k are the saliencies of patch k, for every class at once.
"""
from __future__ import annotations

import torch

from vitx_fast.engine.blocks import block_tail
from vitx_fast.methods.base import MethodResult, ReferenceImplementation
from vitx_fast.postprocess import normalize, to_uint8, upsample

# 3x3 kernel of the official code: centre 1/4, truncated (not renormalised) at the borders
GAUSSIAN = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))
MASKS = ("gaussian", "onehot")
RESIDUALS = ("unmasked", "masked", "ln1")
# working-set budget of one chunk of variants when chunk=None
CHUNK_BUDGET_BYTES = 256 * 2**20


def variant_weights(grid_h: int, grid_w: int, num_prefix: int, mask: str, cls_token: bool,
                    dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Per-token weights of the N = grid_h*grid_w variants, (N, T) with T = num_prefix + N.

    Row k = i*grid_w + j is the variant of patch (i, j); patch (i', j') is column num_prefix + i'*grid_w + j'.
    Prefix columns are 1 (cls_token=True) or 0; "onehot" keeps patch k only, "gaussian" weights its 3x3
    neighbourhood by GAUSSIAN, truncated at the borders.
    """
    if mask not in MASKS:
        raise ValueError(f"reciprocam: mask={mask!r} is not one of {MASKS}")
    n = grid_h * grid_w
    w = torch.zeros(n, num_prefix + n, dtype=torch.float64)
    w[:, :num_prefix] = 1.0 if cls_token else 0.0
    k = torch.arange(n)
    if mask == "onehot":
        w[k, num_prefix + k] = 1.0
    else:
        i, j = k // grid_w, k % grid_w
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                ii, jj = i + di, j + dj
                ok = (ii >= 0) & (ii < grid_h) & (jj >= 0) & (jj < grid_w)
                w[k[ok], num_prefix + ii[ok] * grid_w + jj[ok]] = GAUSSIAN[di + 1][dj + 1]
    return w.to(dtype=dtype, device=device)


def _auto_chunk(adapter, tokens: int, itemsize: int) -> int:
    """Variants per chunk so that one block's activations on the chunk stay within CHUNK_BUDGET_BYTES."""
    blk = adapter.model.blocks[-1]
    d, heads = adapter.embed_dim, adapter.num_heads
    hidden = getattr(getattr(blk.mlp, "fc1", None), "out_features", 4 * d)
    # logits + probs (H T^2 each), ~12 T x D tensors (qkv, q/k/v, context, out, y, z, norms), MLP hidden twice
    per_variant = (2 * heads * tokens * tokens + 12 * tokens * d + 3 * tokens * hidden) * itemsize
    return max(1, CHUNK_BUDGET_BYTES // per_variant)


def masked_tail(adapter, block: int, u_masked: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Rest of block `block` from its masked LN1 output, then every later block and the head.

    u_masked, residual: (n, T, D) -> head output (n, C).
    """
    blk = adapter.model.blocks[block]
    a = adapter.attention(blk, u_masked, keep_probs=False, index=block).out
    _, z = block_tail(blk, residual, a)
    return adapter.run_from(block + 1, z)


def reference_scores(adapter, images: torch.Tensor, opts) -> torch.Tensor:
    """Class scores of every variant of every image, images (B, 3, H, W) -> (B, N, C), N = h*w row-major."""
    block = opts["target_block"] % adapter.depth
    h, w = adapter.grid_for(*images.shape[-2:])
    with torch.no_grad():
        x = adapter.run_until(block, images)  # (B, T, D), runs once per image
        u = adapter.model.blocks[block].norm1(x)
        B, T, _ = x.shape
        weights = variant_weights(h, w, adapter.num_prefix_tokens, opts["mask"], opts["cls_token"], x.dtype, x.device)
        n = weights.shape[0]
        chunk = opts["chunk"] or _auto_chunk(adapter, T, x.element_size())
        outs = []
        for start in range(0, B * n, chunk):  # chunks over the flattened (image, variant) index
            idx = torch.arange(start, min(start + chunk, B * n), device=x.device)
            img, m = idx // n, weights[idx % n].unsqueeze(-1)  # (c,), (c, T, 1)
            u_m = m * u[img]
            if opts["residual"] == "unmasked":
                r = x[img]
            elif opts["residual"] == "masked":
                r = m * x[img]
            else:
                r = u_m
            outs.append(masked_tail(adapter, block, u_m, r))
        out = torch.cat(outs).view(B, n, -1)
    if opts["score"] == "softmax":
        out = out.to(torch.promote_types(out.dtype, torch.float32)).softmax(-1)  # fp32 at least for half models
    return out


def scores_to_maps(scores: torch.Tensor, targets: torch.Tensor, grid: tuple[int, int], opts) -> torch.Tensor:
    """scores (B, N, C) -> maps of the targets, (B, h, w) for targets (B,) or (B, K, h, w) for (B, K).

    Scaling (min-max per image and class) is done on the h x w grid, then the optional resize.
    """
    B, _, C = scores.shape
    h, w = grid
    maps = scores.transpose(1, 2).reshape(B, C, h, w)
    t = targets.view(B, -1).to(maps.device)
    maps = torch.gather(maps, 1, t[:, :, None, None].expand(-1, -1, h, w))  # (B, K, h, w)
    if opts["scale"] == "float":
        maps = normalize(maps, eps=float(opts["eps"]))
    elif opts["scale"] == "uint8":
        maps = to_uint8(maps, eps=float(opts["eps"]))
    if opts["upsample"] is not None:
        size = opts["upsample"] if isinstance(opts["upsample"], int) else tuple(opts["upsample"])
        resized = upsample(maps, size, mode=opts["upsample_mode"])
        # uint8 maps stay uint8, rounded like cv2.resize on a uint8 image
        maps = resized.round().clamp(0, 255).to(torch.uint8) if maps.dtype == torch.uint8 else resized
    return maps[:, 0] if targets.dim() == 1 else maps


class ReciproCAMReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        scores = reference_scores(adapter, images, opts)
        maps = scores_to_maps(scores, targets, adapter.grid_for(*images.shape[-2:]), opts)
        return MethodResult(maps=maps)
