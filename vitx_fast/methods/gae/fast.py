"""GAE fast path (docs/methods/gae.md §5): one forward serves every requested class; the K classes of each image
are one batched backward (vitx_fast.engine.gradients), and the row-vector chain r <- r + r * mean_h(relu(dA * A))
runs from the top block down, each block's matrix reduced as soon as its gradient exists."""
from __future__ import annotations

from vitx_fast.engine.chains import row_step_plus_identity
from vitx_fast.engine.gradients import GradientPass, accumulate, memory_modes, pass_mode
from vitx_fast.engine.targets import onehot
from vitx_fast.methods.base import Implementation, MethodResult


class GAEFast(Implementation):
    def memory_modes(self, adapter, tokens, opts, k):
        return memory_modes(adapter, tokens, k)

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        gp = GradientPass(adapter, images, mode=pass_mode(opts))
        targets = resolve(gp.logits)
        cols = targets if targets.dim() == 2 else targets[:, None]  # (B, K)
        r = None
        for bg in gp.blocks(onehot(cols, gp.logits.shape[-1], gp.logits.dtype)):
            # (B, K, R, T): relu before the head mean; R = the pooled rows in the top block
            r = row_step_plus_identity(r, (accumulate(bg.g_probs) * accumulate(bg.probs).unsqueeze(1)).clamp(min=0)
                                       .mean(dim=2))
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        maps = r[..., P:].reshape(*cols.shape, h, w).to(gp.logits.dtype)
        return MethodResult(maps=maps if targets.dim() == 2 else maps[:, 0], targets=targets, logits=gp.logits,
                            extras={"gradients": gp.path})
