"""DAAM fast path (docs/methods/daam.md §5): one forward for every requested class, one batched VJP for all of them
to the CLS rows of the proj inputs, and the per-block maps M_b[j] = ReLU(sum_h a_b[h,j] <V_b[h,j], g_b[h]>) without
materialising the spatial features S_b."""
from __future__ import annotations

import torch

from vitx_fast.engine.gradients import GradientPass, accumulate, memory_modes, pass_mode, reduced_precision
from vitx_fast.engine.targets import onehot, stack_columns
from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.methods.daam.memory_bank import resolve_bank, self_neighbour_weights
from vitx_fast.methods.daam.reference import display_maps, max_min_normalize
from vitx_fast.ops import daam_block_maps


def backward_seeds(logits: torch.Tensor, adapter, resolve, opts):
    """(logits or None, targets, seeds (B, K, C)): the cotangents of the model output, K per image. Supervised:
    one-hot rows of the resolved (B,) or (B, K) targets; SSL: the kNN weights of the output features, K = 1
    (targets = the voted classes, -1 without a bank)."""
    out = logits
    if opts["mode"] == "ssl":
        bank = resolve_bank(opts["memory_bank"])
        if bank is None:
            w, voted = self_neighbour_weights(out), torch.full((out.shape[0],), -1, dtype=torch.long,
                                                               device=out.device)
        else:
            w, voted = bank.weights(out, k=opts["k"], temperature=float(opts["temperature"]))
        return (out if adapter.has_head else None), voted, w.to(out.dtype)[:, None]
    targets = resolve(out)
    cols = targets if targets.dim() == 2 else targets[:, None]
    return out, targets, onehot(cols, out.shape[-1], out.dtype)


class DAAMFast(Implementation):
    OPS = ("daam_block_maps",)

    def memory_modes(self, adapter, tokens, opts, k):
        # no (T, T) matrix; the fused attention keeps its output and log-sum-exp, and the maps step every block's
        # values and class-token row: 2 (D + H) per token and block
        return memory_modes(adapter, tokens, k, probs=False,
                            extra_per_block=2 * tokens * (adapter.embed_dim + adapter.num_heads))

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        # context_only: fused attention both ways (SDPA forward; the CPU flash backward, or autograd's SDPA
        # backward), so no B x H x T x T probabilities are formed
        gp = GradientPass(adapter, images, mode=pass_mode(opts), context_only=True)
        logits, targets, seeds = backward_seeds(gp.logits, adapter, resolve, opts)
        B, K = seeds.shape[:2]
        L, H, d = adapter.depth, adapter.num_heads, adapter.head_dim
        a, v, C = [None] * L, [None] * L, [None] * L
        for bg in gp.blocks(seeds, probs=False):
            a[bg.index], v[bg.index] = gp.cls_attention(bg)
            C[bg.index] = bg.g_context[:, :, 0]  # (B, K, D) at the class-token row of the proj input
        with torch.no_grad():
            a = torch.stack(a, dim=1).detach()  # (B, L, H, T)
            v = torch.stack(v, dim=1).detach().contiguous()  # (B, L, H, T, d)
            C = torch.stack(C, dim=2).detach().view(B, K, L, H, d)
            if reduced_precision(adapter) is not None:  # the maps step accumulates in float32
                a, v, C = accumulate(a), accumulate(v), accumulate(C)
        P, (gh, gw) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        flows, extras = [], []
        for j in range(K):  # the maps step is memory-bound and cheap: one call per class
            g = torch.relu(C[:, j]) if opts["mode"] == "supervised" else C[:, j]
            with torch.no_grad():
                M = daam_block_maps(a, v, g, kernels=kernels)[..., P:]
            if opts["norm"]:
                M = max_min_normalize(M)
            n, acc = display_maps(M, opts["display"], opts["output"])
            flows.append(n.reshape(B, L, gh, gw))
            extras.append({"accumulated": acc.reshape(B, L, gh, gw), "block_maps": M.reshape(B, L, gh, gw)})
        flow = stack_columns(flows, targets) if opts["mode"] == "supervised" else flows[0]
        ex = extras[0] if len(extras) == 1 else {"per_target": extras}
        ex["gradients"] = gp.path
        return MethodResult(maps=flow[..., -1, :, :], flow=flow, targets=targets, logits=logits, extras=ex)
