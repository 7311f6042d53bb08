"""Gradients of one forward for many seeds, written once for every gradient fast path (GAE, LRP, DAAM).

When every module on the path has an explicit VJP (`vitx_fast.engine.vjp.not_supported_reasons` is empty), the
forward runs without a graph and each backward is ordinary tensor operators: the whole explanation is one traceable
program (torch.export, ONNX). Otherwise the forward records an autograd graph rooted at the block-0 input (so frozen
parameters and `no_grad` callers still work) and each seed is one `torch.autograd.grad` call that keeps the graph
for the next seed.
"""
from __future__ import annotations

import torch

from vitx_fast.engine import vjp
from vitx_fast.engine.adapter import ForwardRecord


def graph_forward(adapter, images: torch.Tensor, capture: str = "full") -> ForwardRecord:
    """Forward with an autograd graph rooted at the block-0 input. images: (B, C, H, W); capture: see
    ViTAdapter.attention."""
    with torch.enable_grad():
        return adapter.forward(images, tokens_hook=lambda x: x.detach().requires_grad_(True), capture=capture)


class Backward:
    """One forward of `images`, then per seed the gradient of <seed, head output> at per-block tensors.

    explicit: explicit VJPs (True) or autograd (False); chosen from the model unless given.
    capture: "full" keeps the (B, H, T, T) probabilities; "cls" (autograd only) uses fused SDPA and keeps only the
    class-token row, for methods that need no full attention gradient.
    """

    def __init__(self, adapter, images: torch.Tensor, capture: str = "full", explicit: bool | None = None):
        self.adapter = adapter
        self.explicit = not vjp.not_supported_reasons(adapter) if explicit is None else explicit
        if self.explicit:
            with torch.no_grad():
                self.record = adapter.forward(images)
        else:
            self.record = graph_forward(adapter, images, capture=capture)
        self.logits = self.record.output.detach()  # (B, C), or pooled features of a headless model

    @property
    def probs(self) -> list[torch.Tensor]:
        """L x (B, H, T, T) detached attention probabilities (capture="full")."""
        return [b.attn.probs.detach() for b in self.record.blocks]

    def _autograd(self, tensors: list[torch.Tensor], seed: torch.Tensor, last: bool) -> list[torch.Tensor]:
        with torch.enable_grad():
            out = self.record.output
            grads = torch.autograd.grad(out, tensors, grad_outputs=seed.to(out.dtype), retain_graph=not last,
                                        allow_unused=True)
        return [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(tensors, grads, strict=True)]

    def probs_grads(self, seed: torch.Tensor, stop: int = 0, last: bool = True) -> list[torch.Tensor]:
        """d<seed, output>/dA^l for blocks l = stop..L-1, each (B, H, T, T). seed: (B, C).
        last: no later seed follows (autograd frees its graph)."""
        if self.explicit:
            with torch.no_grad():
                grads, _ = vjp.backward_through_blocks(self.adapter, self.record, seed.to(self.logits.dtype),
                                                       stop=stop)
            return grads
        return self._autograd([b.attn.probs for b in self.record.blocks[stop:]], seed, last)

    def context_grads(self, seed: torch.Tensor, last: bool = True, row: int = 0) -> list[torch.Tensor]:
        """d<seed, output>/dO^l[:, row] at each block's proj input (the merged attention context), L x (B, H*d)."""
        if self.explicit:
            with torch.no_grad():
                _, grads = vjp.backward_through_blocks(self.adapter, self.record, seed.to(self.logits.dtype),
                                                       keep_rows=slice(row, row + 1))
            return [g[:, 0] for g in grads]
        grads = self._autograd([b.attn.context for b in self.record.blocks], seed, last)
        return [g[:, row] for g in grads]
