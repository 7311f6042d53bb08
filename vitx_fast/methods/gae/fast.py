"""GAE fast path (docs/methods/gae.md §5): one forward serves every requested class; per class one backward to the
attention probabilities and the row-vector chain r <- r + r * mean_h(relu(dA * A)) from the top block down."""
from __future__ import annotations

from vitx_fast.engine.chains import row_chain_plus_identity
from vitx_fast.engine.gradients import Backward
from vitx_fast.engine.targets import onehot, stack_columns, target_columns
from vitx_fast.methods.base import Implementation, MethodResult


class GAEFast(Implementation):
    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        bw = Backward(adapter, images)
        targets = resolve(bw.logits)
        probs = bw.probs
        cols = target_columns(targets)
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        maps = []
        for j, t in enumerate(cols):
            grads = bw.probs_grads(onehot(t, bw.logits.shape[-1], bw.logits.dtype), last=j == len(cols) - 1)
            cams = [(g * a).clamp(min=0).mean(dim=1) for g, a in zip(grads, probs, strict=True)]
            maps.append(row_chain_plus_identity(cams)[:, P:].reshape(-1, h, w))
        return MethodResult(maps=stack_columns(maps, targets), targets=targets, logits=bw.logits)
