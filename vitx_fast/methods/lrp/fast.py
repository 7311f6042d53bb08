"""Chefer LRP fast path (docs/methods/lrp.md §5): one forward for every requested class, the relevance rules of
`rules.py` per class, and the row-vector chain r <- r + r * mean_h(relu(dA * R_A)) instead of T x T products."""
from __future__ import annotations

from vitx_fast.engine.chains import row_chain_plus_identity
from vitx_fast.engine.gradients import Backward
from vitx_fast.engine.targets import onehot, stack_columns, target_columns
from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.methods.lrp.rules import chefer_relprop


class LRPFast(Implementation):
    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        s = int(opts["start_layer"])
        bw = Backward(adapter, images)
        plain = bw.record if bw.explicit else bw.record.detached()
        targets = resolve(bw.logits)
        cols = target_columns(targets)
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        maps, sums = [], []
        for j, t in enumerate(cols):
            grads = bw.probs_grads(onehot(t, bw.logits.shape[-1], bw.logits.dtype), stop=s, last=j == len(cols) - 1)
            cams, sums_j = chefer_relprop(adapter, plain, t, s)
            sums.append(sums_j)
            mats = [(g * c).clamp(min=0).mean(dim=1) for g, c in zip(grads, cams[s:], strict=True)]
            maps.append(row_chain_plus_identity(mats)[:, P:].reshape(-1, h, w))
        return MethodResult(maps=stack_columns(maps, targets), targets=targets, logits=bw.logits,
                            extras={"relevance_sums": stack_columns(sums, targets)})
