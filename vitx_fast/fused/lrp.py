"""Chefer LRP fast path (specs/rollout_lrp.md §2.4): one forward for every requested class, the relprop of the
reference rules per class, and the row-vector chain r <- r + r * mean_h(relu(dA * R_A)) instead of T x T products."""
from __future__ import annotations

import torch

from vitx_fast.fused import backprop
from vitx_fast.fused.common import graph_forward, logit_grads, row_chain_plus_identity, stack_columns, target_columns
from vitx_fast.methods.base import MethodResult
from vitx_fast.methods.chefer_lrp import CheferLRP, chefer_relprop, detached


@CheferLRP.instance.register("fused", resolves_targets=True)
def lrp_fused(adapter, images, resolve, opts) -> MethodResult:
    s = int(opts["start_layer"])
    manual = not backprop.unsupported_reasons(adapter)
    if manual:  # explicit VJPs: one traceable tensor program
        with torch.no_grad():
            rec = plain = adapter.forward(images)
    else:
        rec = graph_forward(adapter, images)
        plain = detached(rec)
    logits = rec.output.detach()
    targets = resolve(logits)
    probs = [b.attn.probs for b in rec.blocks]
    cols = target_columns(targets)
    P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    maps, sums = [], []
    for j, t in enumerate(cols):
        if manual:
            with torch.no_grad():
                grads, _ = backprop.backward_through_blocks(adapter, rec, backprop.onehot(t, logits.shape[-1],
                                                                                         logits.dtype), stop=s)
        else:
            grads = logit_grads(rec, t, probs[s:], retain=j < len(cols) - 1)
        cams, sums_j = chefer_relprop(adapter, plain, t, s)
        sums.append(sums_j)
        mats = [(g * c).clamp(min=0).mean(dim=1) for g, c in zip(grads, cams[s:])]
        maps.append(row_chain_plus_identity(mats)[:, P:].reshape(-1, h, w))
    return MethodResult(maps=stack_columns(maps, targets), targets=targets, logits=logits,
                        extras={"relevance_sums": stack_columns(sums, targets)})
