"""GAE fast path (specs/rollout_lrp.md §3): one forward serves every requested class; per class one backward to the
attention probabilities and the row-vector chain r <- r + r * mean_h(relu(dA * A)) from the top block down."""
from __future__ import annotations

import torch

from vitx_fast.fused import backprop
from vitx_fast.fused.common import graph_forward, logit_grads, row_chain_plus_identity, stack_columns, target_columns
from vitx_fast.methods.base import MethodResult
from vitx_fast.methods.gae import GAE


@GAE.instance.register("fused", resolves_targets=True)
def gae_fused(adapter, images, resolve, opts) -> MethodResult:
    manual = not backprop.unsupported_reasons(adapter)
    if manual:  # explicit VJPs: one traceable tensor program
        with torch.no_grad():
            rec = adapter.forward(images)
    else:
        rec = graph_forward(adapter, images)
    logits = rec.output.detach()
    targets = resolve(logits)
    probs = [b.attn.probs for b in rec.blocks]
    cols = target_columns(targets)
    P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    maps = []
    for j, t in enumerate(cols):
        if manual:
            with torch.no_grad():
                grads, _ = backprop.backward_through_blocks(adapter, rec, backprop.onehot(t, logits.shape[-1],
                                                                                         logits.dtype))
        else:
            grads = logit_grads(rec, t, probs, retain=j < len(cols) - 1)
        cams = [(g * a.detach()).clamp(min=0).mean(dim=1) for g, a in zip(grads, probs)]
        maps.append(row_chain_plus_identity(cams)[:, P:].reshape(-1, h, w))
    return MethodResult(maps=stack_columns(maps, targets), targets=targets, logits=logits)
