"""DAAM fast path (docs/methods/daam.md §5): one forward for every requested class, one VJP per class to the CLS rows
of the proj inputs, and the per-block maps M_b[j] = ReLU(sum_h a_b[h,j] <V_b[h,j], g_b[h]>) without materialising
the spatial features S_b."""
from __future__ import annotations

import torch

from vitx_fast.engine.gradients import Backward
from vitx_fast.engine.targets import onehot, stack_columns, target_columns
from vitx_fast.methods.base import Implementation, MethodResult
from vitx_fast.methods.daam.memory_bank import resolve_bank, self_neighbour_weights
from vitx_fast.methods.daam.reference import display_maps, max_min_normalize
from vitx_fast.ops import daam_block_maps


def backward_seeds(bw: Backward, adapter, resolve, opts):
    """(logits or None, targets, seeds): one (B, C) seed per explained column. Supervised: one-hot rows of the
    resolved targets; SSL: the kNN weights of the output features (targets = the voted classes, -1 without a bank)."""
    out = bw.logits
    if opts["mode"] == "ssl":
        bank = resolve_bank(opts["memory_bank"])
        if bank is None:
            w, voted = self_neighbour_weights(out), torch.full((out.shape[0],), -1, dtype=torch.long,
                                                               device=out.device)
        else:
            w, voted = bank.weights(out, k=opts["k"], temperature=float(opts["temperature"]))
        return (out if adapter.has_head else None), voted, [w.to(out.dtype)]
    targets = resolve(out)
    return out, targets, [onehot(t, out.shape[-1], out.dtype) for t in target_columns(targets)]


class DAAMFast(Implementation):
    OPS = ("daam_block_maps",)

    def __call__(self, adapter, images, resolve, opts, kernels=None) -> MethodResult:
        bw = Backward(adapter, images, capture="cls")  # autograd: SDPA both ways, no B x H x T x T probabilities
        with torch.no_grad():
            a = torch.stack([b.attn.probs[:, :, 0, :] for b in bw.record.blocks], dim=1).detach()  # (B, L, H, T)
            v = torch.stack([b.attn.v for b in bw.record.blocks], dim=1).detach()  # (B, L, H, T, d)
        B, L, H, T, d = v.shape
        logits, targets, seeds = backward_seeds(bw, adapter, resolve, opts)
        P, (gh, gw) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
        flows, extras = [], []
        for j, seed in enumerate(seeds):
            C = torch.stack(bw.context_grads(seed, last=j == len(seeds) - 1), dim=1).view(B, L, H, d)
            g = torch.relu(C) if opts["mode"] == "supervised" else C
            with torch.no_grad():
                M = daam_block_maps(a, v.contiguous(), g, kernels=kernels)[..., P:]
            if opts["norm"]:
                M = max_min_normalize(M)
            n, acc = display_maps(M, opts["display"], opts["output"])
            flows.append(n.reshape(B, L, gh, gw))
            extras.append({"accumulated": acc.reshape(B, L, gh, gw), "block_maps": M.reshape(B, L, gh, gw)})
        flow = stack_columns(flows, targets) if opts["mode"] == "supervised" else flows[0]
        ex = extras[0] if len(extras) == 1 else {"per_target": extras}
        return MethodResult(maps=flow[..., -1, :, :], flow=flow, targets=targets, logits=logits, extras=ex)
