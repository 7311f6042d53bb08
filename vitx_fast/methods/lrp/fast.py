"""Chefer LRP fast path (docs/methods/lrp.md §5): one forward for every requested class, then one walk from the top
block down in which the batched gradient backward (vitx_fast.engine.gradients) and the relevance propagation
(`fused_rules.py`, the rules of `rules.py` batched over the K classes and reusing the forward's linear outputs) meet
at each block, and the row-vector chain r <- r + r * mean_h(relu(dA * R_A)) replaces the T x T products."""
from __future__ import annotations

import torch

from vitx_fast.engine.chains import row_step_plus_identity
from vitx_fast.engine.gradients import GradientPass, memory_modes, pass_mode
from vitx_fast.engine.targets import onehot, stack_columns, target_columns
from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.methods.lrp import fused_rules
from vitx_fast.methods.lrp.rules import check_precision, chefer_relprop


class LRPFast(Implementation):
    OPS = ("safe_divide",)

    def memory_modes(self, adapter, tokens, opts, k):
        # the relevance propagation holds about twice as many per-class tensors as the backward
        return memory_modes(adapter, tokens, 3 * k, keep_outputs=True)

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        check_precision(adapter)
        s = int(opts["start_layer"])
        gp = GradientPass(adapter, images, mode=pass_mode(opts), keep_outputs=True)
        targets = resolve(gp.logits)
        cols = targets if targets.dim() == 2 else targets[:, None]  # (B, K)
        seeds = onehot(cols, gp.logits.shape[-1], gp.logits.dtype)
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        if gp.explicit:
            r, sums = self._explicit(adapter, gp, seeds, s, kernels)
        else:
            r, sums = self._autograd(adapter, gp, cols, seeds, s)
        maps = r[..., P:].reshape(*cols.shape, h, w)
        if targets.dim() == 1:
            maps, sums = maps[:, 0], sums[:, 0]
        return MethodResult(maps=maps, targets=targets, logits=gp.logits,
                            extras={"relevance_sums": sums, "gradients": gp.path})

    @staticmethod
    def _explicit(adapter, gp, seeds, s, kernels=None):
        """Gradients and relevances in one walk; r (B, K, T), sums (B, K, 1 + L - s). kernels: the family of
        `ops.safe_divide` (None: by device)."""
        sf, blocks = gp.saved, adapter.model.blocks
        with torch.no_grad():
            R = fused_rules.head(adapter, sf.final_rows, seeds)  # (B, K, r, D)
            sums, r = [R.sum((-2, -1))], None
            for bg in gp.blocks(seeds, stop=s):
                R, R_A = fused_rules.block(blocks[bg.index], bg.saved, bg.probs, R, kernels=kernels)
                sums.append(R.sum((-2, -1)))
                # (B, K, R, T): relu before the head mean
                r = row_step_plus_identity(r, (bg.g_probs * R_A.transpose(1, 2)).clamp(min=0).mean(dim=2))
        return r, torch.stack(sums, dim=-1)

    @staticmethod
    def _autograd(adapter, gp, cols, seeds, s):
        """Modules without explicit VJPs: batched autograd gradients, the reference rules per class."""
        plain = gp.record.detached()
        grads = {bg.index: bg.g_probs for bg in gp.blocks(seeds, stop=s)}  # (B, K, H, T, T)
        rs, sums = [], []
        for j, t in enumerate(target_columns(cols)):
            cams, sums_j = chefer_relprop(adapter, plain, t, s)
            r = None
            for i in range(adapter.depth - 1, s - 1, -1):
                r = row_step_plus_identity(r, (grads[i][:, j:j + 1] * cams[i].unsqueeze(1)).clamp(min=0)
                                           .mean(dim=2))
            rs.append(r[:, 0])
            sums.append(sums_j)
        return stack_columns(rs, cols), stack_columns(sums, cols)
