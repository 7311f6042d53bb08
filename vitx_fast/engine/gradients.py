"""Gradients of one forward for K seeds per image, written once for every gradient fast path (GAE, gradient
rollout, LRP, DAAM).

`GradientPass(adapter, images, ...)` runs the forward; `.blocks(seeds)` then walks the blocks from the top down and
yields, per block, the gradients of <seed_k, head output> a method asks for (`vitx_fast.engine.backward.BlockGrads`),
for all K seeds (B, K, C) in one backward.

- **Explicit** when every module on the path has an explicit VJP (`vjp.not_supported_reasons` empty): the engine of
  `vitx_fast.engine.backward` (no graph, no parameter gradient, saved or recomputed activations by `mode`). The whole
  explanation is then one traceable tensor program (torch.export, ONNX).
- **Autograd** otherwise (e.g. a SiLU MLP): the forward records a graph rooted at the block-0 input (so frozen
  parameters and `no_grad` callers still work) and the K seeds are one `torch.autograd.grad(..., is_grads_batched=
  True)`, a vmap over the seeds.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from vitx_fast.engine import vjp
from vitx_fast.engine.adapter import ForwardRecord
from vitx_fast.engine.backward import BlockGrads, backward_blocks, forward_saved, fused_attention_backward_available
from vitx_fast.engine.backward import scores as attention_scores
from vitx_fast.engine.memory import element_size


def graph_forward(adapter, images: torch.Tensor, capture: str = "full") -> ForwardRecord:
    """Forward with an autograd graph rooted at the block-0 input. images: (B, C, H, W); capture: see
    ViTAdapter.attention."""
    with torch.enable_grad():
        return adapter.forward(images, tokens_hook=lambda x: x.detach().requires_grad_(True), capture=capture)


def explicit_supported(adapter) -> bool:
    return not vjp.not_supported_reasons(adapter)


# measured peak resident memory over the tensors counted below (element-wise temporaries, allocator rounding):
# 1.27 on ViT-B/16 and 1.34 on ViT-Ti/16 at 224 px for GAE
ALLOCATOR_SLACK = 1.35


def memory_modes(adapter, tokens: int, k: int, *, keep_outputs: bool = False, probs: bool = True,
                 extra_per_block: int = 0, extra_working: int = 0) -> dict[str, int]:
    """Bytes per image of a gradient pass by mode, fastest first (see vitx_fast.engine.memory).

    tokens: T; k: seeds per image; keep_outputs: LRP's kept linear outputs; probs: the method reads (T, T)
    probabilities; extra_per_block: elements per image a method itself keeps per block (e.g. a per-block matrix);
    extra_working: elements per image of the method's own temporaries at one block.
    "save" keeps x, y, qkv and the fc1 output per block (9 D per token, 11 with the linear outputs); "recompute"
    keeps the block inputs only. Both add one block's working set: the forward's (10 D per token), the backward's
    cotangents (about 14 D per token and seed) and, with probs, about six (H, T, T) tensors per seed (the
    gradients at the probabilities and scores and the method's products of them) plus the probabilities.
    """
    T, D, H, L = tokens, adapter.embed_dim, adapter.num_heads, adapter.depth
    e = element_size(adapter.dtype)
    tt = H * T * T if probs else 0
    working = T * 10 * D + k * (14 * T * D + 6 * tt) + tt + extra_working
    per_block = (11 if keep_outputs else 9) * T * D + extra_per_block
    e *= ALLOCATOR_SLACK
    if not explicit_supported(adapter):
        # the graph keeps every activation and the unfused (H, T, T) scores and probabilities of every block
        return {"autograd": int(e * (L * (16 * T * D + 3 * H * T * T + extra_per_block) + k * L * (T * D + tt)
                                     + working))}
    return {"save": int(e * (L * per_block + working)),
            "recompute": int(e * (L * (T * D + extra_per_block) + working + per_block))}


class GradientPass:
    """One forward of `images` (B, C, H, W) that serves the prediction and the backward.

    mode: "save" or "recompute" (explicit path; see vitx_fast.engine.backward). keep_outputs: keep each block's
    linear outputs (LRP). context_only: the method reads only the proj-input gradients and the class-token attention
    row (DAAM): the forward keeps no (T, T) matrix, and the backward uses the fused CPU attention kernel where it can
    (autograd: SDPA both ways). explicit: force a path (default: explicit when every module has a VJP).
    """

    def __init__(self, adapter, images: torch.Tensor, *, mode: str = "save", keep_outputs: bool = False,
                 context_only: bool = False, explicit: bool | None = None):
        self.adapter = adapter
        self.explicit = explicit_supported(adapter) if explicit is None else explicit
        self.context_only = context_only
        self.mode = mode if self.explicit else "autograd"
        if self.explicit:
            self.saved = forward_saved(adapter, images, mode=mode, keep_outputs=keep_outputs,
                                       fused_backward=context_only and fused_attention_backward_available(adapter))
            self.logits = self.saved.logits
        else:
            self.record = graph_forward(adapter, images, capture="cls" if context_only else "full")
            self.logits = self.record.output.detach()  # (B, C), or pooled features of a headless model

    @property
    def path(self) -> str:
        """What ran, for Explanation.extras["gradients"]: "explicit/save", "explicit/recompute" or "autograd"."""
        return f"explicit/{self.mode}" if self.explicit else "autograd"

    def probs(self, i: int) -> torch.Tensor:
        """(B, H, T, T) post-softmax attention of block i (capture "full")."""
        if self.explicit:
            return self.saved.probs(i)
        return self.record.blocks[i].attn.probs.detach()

    def cls_attention(self, bg: BlockGrads) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (B, H, T) the class-token query's attention row, v (B, H, T, d)) of the block of `bg`."""
        if not self.explicit:
            at = self.record.blocks[bg.index].attn
            return at.probs[:, :, 0].detach(), at.v.detach()
        s = bg.saved
        if s.probs_rows is not None:
            return s.probs_rows[:, :, 0], s.v
        attn = self.adapter.model.blocks[bg.index].attn
        return attention_scores(attn, s.q[:, :, :1], s.k).softmax(dim=-1)[:, :, 0], s.v

    def blocks(self, seeds: torch.Tensor, stop: int = 0, probs: bool = True, scores: bool = False
               ) -> Iterator[BlockGrads]:
        """BlockGrads for blocks L-1 down to `stop`, seeds (B, K, C). Single use on the autograd path (the graph is
        freed)."""
        if self.explicit:
            with torch.no_grad():
                yield from backward_blocks(self.saved, seeds, stop=stop, probs=probs, scores=scores)
            return
        yield from self._autograd_blocks(seeds, stop, probs, scores)

    def _autograd_blocks(self, seeds, stop, probs, scores) -> Iterator[BlockGrads]:
        L = self.adapter.depth
        recs = [self.record.blocks[i].attn for i in range(stop, L)]
        names = (["probs"] if probs else []) + (["logits"] if scores else []) + ["context"]
        tensors = [getattr(a, n) for a in recs for n in names]
        out = self.record.output
        with torch.enable_grad():
            # one vmapped backward for the K seeds: grad_outputs (K, B, C)
            grads = torch.autograd.grad(out, tensors, grad_outputs=seeds.transpose(0, 1).to(out.dtype),
                                        is_grads_batched=True, allow_unused=True)
        grads = [(torch.zeros(seeds.shape[1], *t.shape, dtype=t.dtype, device=t.device) if g is None else g.detach())
                 .transpose(0, 1) for t, g in zip(tensors, grads, strict=True)]  # (B, K, ...)
        n = len(names)
        for j in range(len(recs) - 1, -1, -1):
            got = dict(zip(names, grads[j * n:(j + 1) * n], strict=True))
            a = recs[j]
            yield BlockGrads(index=stop + j, rows=None, probs=a.probs.detach() if probs else None,
                             g_probs=got.get("probs"), g_scores=got.get("logits"), g_context=got["context"],
                             saved=None)


def pass_mode(opts: dict) -> str:
    """The gradient pass mode of a run: the memory plan's (vitx_fast.engine.memory) when it chose one of the
    explicit modes, else "save" (also inside traced programs, where nothing is chunked)."""
    plan = opts.get("memory_plan")
    return plan.mode if plan is not None and plan.mode in ("save", "recompute") else "save"


HALF_DTYPES = (torch.float16, torch.bfloat16)


def reduced_precision(adapter) -> torch.dtype | None:
    """float16 / bfloat16 when the model runs in it (its parameters) or under autocast on its device; else None."""
    if adapter.dtype in HALF_DTYPES:
        return adapter.dtype
    dev = adapter.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def accumulate(t: torch.Tensor) -> torch.Tensor:
    """A method's per-block matrices and its chain accumulate in float32 when the backward ran in half precision
    (as flash attention accumulates); other dtypes pass unchanged."""
    return t.float() if t.dtype in HALF_DTYPES else t
