"""Gradient Attention Rollout fast path (docs/methods/grad_rollout.md §5): one forward for every requested class, the
K classes of each image as one batched backward (vitx_fast.engine.gradients), each block's matrix formed as soon as
its gradient exists, and the row-vector chain e_0^T a^{L-1} ... a^0 (L GEMVs) instead of T x T products.

Every option of the reference is served: `pairing="jacobgil"` pairs the gradient of block j with the attention of
block L-1-j (recomputed from that block's kept q and k), `grad_wrt="logits"` reads the gradient at the pre-softmax
scores, `discard_ratio` zeroes the int(T*T*ratio) smallest entries per image and class (one batched top-k), and both
renormalisations run through `chains.identity_mix`.
"""
from __future__ import annotations

import torch

from vitx_fast.engine.chains import identity_mix, row_step
from vitx_fast.engine.gradients import GradientPass, accumulate, memory_modes, pass_mode
from vitx_fast.engine.targets import onehot
from vitx_fast.methods.base import Implementation, MethodResult


def discard_smallest_batched(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the int(T*T*ratio) smallest entries of each (T, T) matrix, index 0 not protected (vit-explain's
    gradient rollout). fused: (N, T, T) >= 0.

    The reference zeroes the k smallest (one top-k per image); this keeps the T*T - k largest of every matrix in one
    batched top-k, 3-4x cheaper for ratio 0.9. The two sets are the same unless equal positive values straddle the
    k-th place (then either choice is "the k smallest"); zeros, which the clamp makes common, tie harmlessly."""
    if ratio <= 0:
        return fused
    N, T, _ = fused.shape
    n = T * T
    flat = fused.reshape(N, n)
    keep = flat.topk(n - int(n * ratio), dim=-1).indices
    return torch.zeros_like(flat).scatter_(1, keep, flat.gather(1, keep)).view(N, T, T)


class GradRolloutFast(Implementation):
    def memory_modes(self, adapter, tokens, opts, k):
        # jacobgil pairing keeps every block's (T, T) matrix until the chain can start from the top block; forming
        # one (discard, identity mix) takes about six (T, T) temporaries per class
        tt = k * tokens * tokens
        return memory_modes(adapter, tokens, k, extra_per_block=tt if opts["pairing"] == "jacobgil" else 0,
                            extra_working=6 * tt)

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        gp = GradientPass(adapter, images, mode=pass_mode(opts))
        targets = resolve(gp.logits)
        cols = targets if targets.dim() == 2 else targets[:, None]  # (B, K)
        B, K = cols.shape
        L, ratio, renorm = adapter.depth, float(opts["discard_ratio"]), opts["renorm"]
        logits_grad = opts["grad_wrt"] == "logits"
        jacobgil = opts["pairing"] == "jacobgil"
        mats, r = [None] * L, None
        for bg in gp.blocks(onehot(cols, gp.logits.shape[-1], gp.logits.dtype), scores=logits_grad):
            G = accumulate(bg.g_scores if logits_grad else bg.g_probs)  # (B, K, H, R, T)
            R = G.shape[-2]
            # block l's attention meets this gradient: l = its own block, or L-1-j (vit-explain issue #6)
            l = L - 1 - bg.index if jacobgil else bg.index
            A = accumulate(gp.probs(l)[:, :, :R] if jacobgil else bg.probs)  # (B, H, R, T)
            F = (A.unsqueeze(1) * G).mean(dim=2).clamp(min=0)  # clamp after the head mean, (B, K, R, T)
            T = F.shape[-1]
            if R < T:  # the top block's gradient is zero outside its pooled rows
                F = torch.cat([F, F.new_zeros(B, K, T - R, T)], dim=2)
            a = identity_mix(discard_smallest_batched(F.reshape(B * K, T, T), ratio), renorm).view(B, K, T, T)
            if jacobgil:
                mats[l] = a
            else:  # blocks arrive from the top: the chain runs as they come
                r = row_step(r, a)
        if jacobgil:
            for a in reversed(mats):
                r = row_step(r, a)
        P, (h, w) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        maps = r[..., P:].reshape(B, K, h, w).to(gp.logits.dtype)
        return MethodResult(maps=maps if targets.dim() == 2 else maps[:, 0], targets=targets, logits=gp.logits,
                            extras={"gradients": gp.path})
