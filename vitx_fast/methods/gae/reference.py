"""GAE reference path (docs/methods/gae.md §1), as hila-chefer/Transformer-MM-Explainability's
`Transformer_MM_explainability_ViT.ipynb` writes it:

    R = I;  for each block: R += mean_h(max(dA * A, 0)) @ R;  map = R[0, P:]

with A the post-softmax attention and dA its gradient (ordinary autograd) of the target logit.
"""
from __future__ import annotations

import torch

from vitx_fast.engine.adapter import ForwardRecord
from vitx_fast.engine.chains import matrix_chain_plus_identity
from vitx_fast.methods.base import MethodResult, ReferenceImplementation


def _graph_root(x: torch.Tensor) -> torch.Tensor:
    # a leaf that requires grad at the block-0 input, so the graph exists even with frozen parameters / no_grad
    return x.detach().requires_grad_(True)


def attention_grads(adapter, images: torch.Tensor, targets: torch.Tensor, wrt: str = "probs"
                    ) -> tuple[ForwardRecord, list[torch.Tensor]]:
    """Forward with a graph, then d(sum_b logits[b, targets[b]]) / d(per-block attention tensor).

    images: (B, C, H, W); targets: (B,) long. wrt: "probs" (post-softmax A, dA) or "logits" (the scaled pre-softmax
    scores S, what a legacy module backward hook on timm's `attn_drop` captures).
    Returns the ForwardRecord (tensors still attached to the graph; detach before use) and L grads (B, H, T, T).
    Each image's logit depends only on that image, so the batch sum gives per-image gradients.
    """
    with torch.enable_grad():
        rec = adapter.forward(images, tokens_hook=_graph_root)
        score = rec.output.gather(1, targets.view(-1, 1).to(rec.output.device)).sum()
        grads = torch.autograd.grad(score, [getattr(b.attn, wrt) for b in rec.blocks])
    return rec, [g.detach() for g in grads]


def gae_matrix(attns: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """attns, grads: L x (B, H, T, T) in block order -> R = (I + Abar^{L-1}) ... (I + Abar^0), (B, T, T)."""
    return matrix_chain_plus_identity([(g * a).clamp(min=0).mean(dim=1)  # relu before the head mean
                                       for a, g in zip(attns, grads, strict=True)])


class GAEReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        rec, grads = attention_grads(adapter, images, targets)
        R = gae_matrix([b.attn.probs.detach() for b in rec.blocks], grads)
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        return MethodResult(maps=R[:, 0, P:].reshape(-1, h, w))
