"""DAAM fast path (specs/daam.md §4, §7): one forward for every requested class, one VJP per class to the CLS rows of
the proj inputs, and the per-block maps M_b[j] = ReLU(sum_h a_b[h,j] <V_b[h,j], g_b[h]>) without materialising S_b."""
from __future__ import annotations

import torch

from vitx_fast.fused import backprop
from vitx_fast.fused.common import graph_forward, stack_columns, target_columns
from vitx_fast.methods.base import MethodResult
from vitx_fast.ops import daam_block_maps
from vitx_fast.methods.daam import DAAM, _bank, display_maps, self_neighbour_weights


@DAAM.instance.register("fused", resolves_targets=True)
def daam_fused(adapter, images, resolve, opts) -> MethodResult:
    mode = opts["mode"]
    manual = not backprop.unsupported_reasons(adapter)
    if manual:  # explicit VJPs: one traceable tensor program
        with torch.no_grad():
            rec = adapter.forward(images)
    else:
        rec = graph_forward(adapter, images, capture="cls")  # SDPA both ways: no B x H x T x T probabilities
    out = rec.output
    ctx = [b.attn.context for b in rec.blocks]
    with torch.no_grad():
        a = torch.stack([b.attn.probs[:, :, 0, :] for b in rec.blocks], dim=1)  # (B, L, H, T)
        v = torch.stack([b.attn.v for b in rec.blocks], dim=1)  # (B, L, H, T, d)
    B, L, H, T, d = v.shape
    if mode == "ssl":
        f = out.detach()
        bank = _bank(opts["memory_bank"])
        if bank is None:
            w, voted = self_neighbour_weights(f), torch.full((B,), -1, dtype=torch.long, device=f.device)
        else:
            w, voted = bank.weights(f, k=opts["k"], temperature=float(opts["temperature"]))
        logits, targets, seeds = (out.detach() if adapter.has_head else None), voted, [w.to(out.dtype)]
    else:
        logits = out.detach()
        targets = resolve(logits)
        seeds = [torch.nn.functional.one_hot(t, out.shape[-1]).to(out.dtype) for t in target_columns(targets)]
    P, (gh, gw) = adapter.num_prefix_tokens, adapter.grid_for(*images.shape[-2:])
    flows, extras = [], []
    for j, seed in enumerate(seeds):
        if manual:
            with torch.no_grad():
                _, grads = backprop.backward_through_blocks(adapter, rec, seed, keep_rows=slice(0, 1))
        else:
            with torch.enable_grad():
                grads = torch.autograd.grad(out, ctx, grad_outputs=seed, retain_graph=j < len(seeds) - 1)
        C = torch.stack([gr[:, 0] for gr in grads], dim=1).view(B, L, H, d)
        g = torch.relu(C) if mode == "supervised" else C
        with torch.no_grad():
            M = daam_block_maps(a, v.contiguous(), g)[..., P:]
        if opts["norm"]:
            M = M - M.amin(-1, keepdim=True)
            M = M / (M.amax(-1, keepdim=True) + 1e-10)
        n, acc = display_maps(M, opts["display"], opts["output"])
        flows.append(n.reshape(B, L, gh, gw))
        extras.append({"accumulated": acc.reshape(B, L, gh, gw), "block_maps": M.reshape(B, L, gh, gw)})
    flow = stack_columns(flows, targets) if mode == "supervised" else flows[0]
    ex = extras[0] if len(extras) == 1 else {"per_target": extras}
    return MethodResult(maps=flow[..., -1, :, :], flow=flow, targets=targets, logits=logits, extras=ex)
