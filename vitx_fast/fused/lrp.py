"""Chefer LRP fast path (specs/rollout_lrp.md §2.4): one forward for every requested class, the relprop of the
reference rules per class, and the row-vector chain r <- r + r * mean_h(relu(dA * R_A)) instead of T x T products."""
from __future__ import annotations

from vitx_fast.fused.common import graph_forward, logit_grads, row_chain_plus_identity, stack_columns, target_columns
from vitx_fast.methods.base import MethodResult
from vitx_fast.methods.chefer_lrp import CheferLRP, chefer_relprop, detached


@CheferLRP.instance.register("fused", resolves_targets=True)
def lrp_fused(adapter, images, resolve, opts) -> MethodResult:
    s = int(opts["start_layer"])
    rec = graph_forward(adapter, images)
    logits = rec.output.detach()
    targets = resolve(logits)
    plain = detached(rec)
    probs = [b.attn.probs for b in rec.blocks]
    cols = target_columns(targets)
    P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    maps, sums = [], []
    for j, t in enumerate(cols):
        grads = logit_grads(rec, t, probs[s:], retain=j < len(cols) - 1)
        cams, sums_j = chefer_relprop(adapter, plain, t, s)
        sums.append(sums_j)
        mats = [(g * c).clamp(min=0).mean(dim=1) for g, c in zip(grads, cams[s:])]
        maps.append(row_chain_plus_identity(mats)[:, P:].reshape(-1, h, w))
    return MethodResult(maps=stack_columns(maps, targets), targets=targets, logits=logits,
                        extras={"relevance_sums": stack_columns(sums, targets)})
