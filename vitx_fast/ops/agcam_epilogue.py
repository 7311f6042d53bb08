"""agcam_epilogue: AGCAM's fused reduce over layers and heads (docs/methods/agcam.md §5). Maths in
`vitx_fast.kernels.reference.agcam_epilogue`."""
from __future__ import annotations

import torch

from vitx_fast.ops import _kernels

OP = "agcam_epilogue"
# Not the default on CPU: at ViT-B/16 sizes (B=8, L=12, H=12, T=197, d=64) the op is a memory-bound batched GEMV over
# v, and torch's einsum (MKL) plus its elementwise passes beats the fused C++ kernel with one thread (0.7x); the
# kernel only wins with two contended threads (benchmarks/results/ops.md). Only ops whose C++ kernel beats torch in
# every configuration measured are listed as default; kernels="cpp" still selects it.
CPP_DEFAULT = False


def agcam_epilogue(delta: torch.Tensor, v: torch.Tensor, s: torch.Tensor, *,
                   kernels: str | None = None) -> torch.Tensor:
    """out[b, t] = sum_{l,h} ReLU(<delta[b,l,h], v[b,l,h,t]>) * sigmoid(s[b,l,h,t]).

    delta: (B, L, H, d) CLS-row gradient at each layer's attention output, per head; v: (B, L, H, T, d) values;
    s: (B, L, H, T) pre-softmax scaled CLS-row logits. Returns (B, T), prefix columns included (the caller drops them).

    kernels: None (by device and availability: triton on CUDA, cpp on CPU where it beats torch, reference otherwise),
    or "reference" | "cpp" | "triton" (ValueError with the reasons when it cannot serve). Not differentiable except
    through "reference".
    """
    fn = _kernels.run(OP, [delta, v, s], kernels, CPP_DEFAULT)
    return fn(delta, v, s)
