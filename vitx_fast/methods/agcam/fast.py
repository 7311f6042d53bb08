"""AGCAM fast path (docs/methods/agcam.md §5): one forward plus a CLS-only backward, no graph over the token stream.

Because every attention input is detached, only the CLS residual stream carries gradient. Walking down the blocks, a
one-row VJP through (residual, proj, LN2, MLP) gives delta^l = dy/dO^l[0] and the gradient on the block input's CLS
row; G^l_{h,0,j} = <delta^l_h, V^l_{h,j}>, so the attention gradient is never materialised.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from vitx_fast.engine import vjp
from vitx_fast.engine.blocks import attention_output, block_tail
from vitx_fast.engine.targets import onehot, stack_columns, target_columns
from vitx_fast.methods.agcam.reference import agcam_postprocess
from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.ops import agcam_epilogue


class ClsRowState(NamedTuple):
    """What the CLS-only backward needs of one block, B images."""

    scores: torch.Tensor  # (B, H, T) pre-softmax scaled CLS-row logits
    v: torch.Tensor  # (B, H, T, d) values
    x0: torch.Tensor  # (B, D) CLS row of the block input
    context0: torch.Tensor  # (B, H*d) CLS row of the merged attention context
    u0: torch.Tensor  # (B, D) CLS row of norm1's output (the gate's input)
    y0: torch.Tensor  # (B, D) CLS row after the attention residual


def agcam_forward(adapter, images: torch.Tensor) -> tuple[torch.Tensor, list[ClsRowState]]:
    """No-grad forward with fused SDPA; returns the last block output z (B, T, D) and per block its ClsRowState."""
    with torch.no_grad():
        x = adapter.embed(images)
        states = []
        for i in range(adapter.depth):
            rec = adapter.block(i, x, capture="cls")
            a = rec.attn
            states.append(ClsRowState(a.logits[:, :, 0, :], a.v, rec.x[:, 0], a.context[:, 0], rec.u[:, 0],
                                      rec.y[:, 0]))
            x = rec.z
        return x, states


def cls_chain_autograd(adapter, z: torch.Tensor, states: list[ClsRowState], target: torch.Tensor) -> torch.Tensor:
    """delta (B, L, D) = dy_c/dO^l[0] under detached attention inputs, by one-row autograd VJPs (for modules without
    an explicit VJP). z: (B, T, D) last block output; target: (B,)."""
    model = adapter.model
    n_pool = 2 if adapter.distilled else 1
    with torch.enable_grad():
        rows = z[:, :n_pool].detach().requires_grad_(True)
        y = model.forward_head(model.norm(rows)).gather(1, target.view(-1, 1)).sum()
        g = torch.autograd.grad(y, rows)[0][:, 0]  # the dist row never reaches the CLS row
        deltas = [None] * adapter.depth
        for i in range(adapter.depth - 1, -1, -1):
            blk, st = model.blocks[i], states[i]
            x0 = st.x0.detach().requires_grad_(True)
            ctx0 = st.context0.detach().requires_grad_(True)
            # the gate reads the detached attention input: a constant here
            _, z0 = block_tail(blk, x0, attention_output(blk.attn, ctx0, st.u0))
            g, deltas[i] = torch.autograd.grad(z0, [x0, ctx0], grad_outputs=g)
    return torch.stack(deltas, dim=1)


class AGCAMFast(Implementation):
    OPS = ("agcam_epilogue",)

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        z, states = agcam_forward(adapter, images)
        with torch.no_grad():
            logits = adapter.head(z)
        targets = resolve(logits)
        s = torch.stack([st.scores for st in states], dim=1)  # (B, L, H, T)
        v = torch.stack([st.v for st in states], dim=1)  # (B, L, H, T, d)
        B, L, H, T, d = v.shape
        P, (gh, gw) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        explicit = not vjp.not_supported_reasons(adapter)
        maps = []
        for t in target_columns(targets):
            if explicit:  # explicit VJPs on the CLS rows: one traceable tensor program
                with torch.no_grad():
                    seed = onehot(t, logits.shape[-1], logits.dtype)
                    delta = vjp.cls_path_backward(adapter, [(st.x0, st.y0) for st in states], z, seed)
            else:
                delta = cls_chain_autograd(adapter, z, states, t)
            # sum over layers and heads of ReLU(<delta, V>) * sigmoid(s)
            cam = agcam_epilogue(delta.view(B, L, H, d), v, s, kernels=kernels)[:, P:]
            # a mean is the sum over the count: exact
            cam = cam / ((H if opts["head_fusion"] == "mean" else 1) * (L if opts["layer_fusion"] == "mean" else 1))
            maps.append(cam.reshape(B, gh, gw).detach())
        maps = agcam_postprocess(stack_columns(maps, targets), opts)
        return MethodResult(maps=maps, targets=targets, logits=logits)
