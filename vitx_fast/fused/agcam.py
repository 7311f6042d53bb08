"""AGCAM fast path (specs/agcam.md §6): one forward plus a CLS-only backward, no graph over the token stream.

Because every attention input is detached, only the CLS residual stream carries gradient. Walking down the blocks, a
one-row VJP through (residual, proj, LN2, MLP) gives delta^l = dy/dO^l[0] and the gradient on the block input's CLS
row; G^l_{h,0,j} = <delta^l_h, V^l_{h,j}>, so the attention gradient is never materialised.
"""
from __future__ import annotations

import torch

from vitx_fast.fused import backprop
from vitx_fast.fused.common import stack_columns, target_columns
from vitx_fast.methods.agcam import AGCAM, agcam_postprocess
from vitx_fast.methods.base import MethodResult
from vitx_fast.ops import agcam_epilogue


def agcam_forward(adapter, images: torch.Tensor):
    """No-grad forward keeping, per block, the CLS-row scores (B, H, T), V (B, H, T, d), and the CLS-path states."""
    with torch.no_grad():
        x = adapter.embed(images)
        keep = []
        for i in range(adapter.depth):
            rec = adapter.block(i, x, capture="cls")
            a = rec.attn
            keep.append((a.logits[:, :, 0, :], a.v, rec.x[:, 0], a.context[:, 0], rec.u[:, 0], rec.y[:, 0]))
            x = rec.z
        return x, keep


def cls_chain(adapter, z: torch.Tensor, keep, target: torch.Tensor) -> torch.Tensor:
    """delta (B, L, D): dy_c/dO^l[0] under detached attention inputs, from one-row VJPs. z: (B, T, D) last output."""
    model = adapter.model
    n_pool = 2 if adapter.distilled else 1
    with torch.enable_grad():
        rows = z[:, :n_pool].detach().requires_grad_(True)
        y = model.forward_head(model.norm(rows)).gather(1, target.view(-1, 1)).sum()
        g = torch.autograd.grad(y, rows)[0][:, 0]  # the dist row never reaches the CLS row
        deltas = [None] * adapter.depth
        for i in range(adapter.depth - 1, -1, -1):
            blk, attn = model.blocks[i], model.blocks[i].attn
            _, _, x0, ctx0, u0, _ = keep[i]
            x0 = x0.detach().requires_grad_(True)
            ctx0 = ctx0.detach().requires_grad_(True)
            o = attn.norm(ctx0)
            if getattr(attn, "gate", None) is not None:
                o = o * attn.gate(u0).sigmoid()  # from the detached input: a constant here
            y0 = x0 + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(o))))
            z0 = y0 + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y0))))
            g, deltas[i] = torch.autograd.grad(z0, [x0, ctx0], grad_outputs=g)
    return torch.stack(deltas, dim=1)


@AGCAM.instance.register("fused", resolves_targets=True)
def agcam_fused(adapter, images, resolve, opts) -> MethodResult:
    z, keep = agcam_forward(adapter, images)
    with torch.no_grad():
        logits = adapter.head(z)
    targets = resolve(logits)
    s = torch.stack([k[0] for k in keep], dim=1)  # (B, L, H, T)
    v = torch.stack([k[1] for k in keep], dim=1)  # (B, L, H, T, d)
    B, L, H, T, d = v.shape
    P, (gh, gw) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    maps = []
    manual = not backprop.unsupported_reasons(adapter)
    for t in target_columns(targets):
        if manual:  # explicit VJPs on the CLS rows: one traceable tensor program
            with torch.no_grad():
                seed = backprop.onehot(t, logits.shape[-1], logits.dtype)
                delta = backprop.cls_path_backward(adapter, [(k[2], k[5]) for k in keep], z, seed).view(B, L, H, d)
        else:
            delta = cls_chain(adapter, z, keep, t).view(B, L, H, d)
        cam = agcam_epilogue(delta, v, s)[:, P:]  # sum over layers and heads of ReLU(<delta, V>) * sigmoid(s)
        # a mean is the sum over the count: exact
        cam = cam / ((H if opts["head_fusion"] == "mean" else 1) * (L if opts["layer_fusion"] == "mean" else 1))
        maps.append(cam.reshape(B, gh, gw).detach())
    maps = agcam_postprocess(stack_columns(maps, targets), opts)
    return MethodResult(maps=maps, targets=targets, logits=logits)
