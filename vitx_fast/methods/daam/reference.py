"""DAAM reference path (docs/methods/daam.md §1).

Per block b the CLS row of the attention output splits into one term per key token, S_b[j] = a_b[:, j] ⊙ V_b[:, j]
(heads merged). Channel coefficients C_b = ∂y/∂O_b[0] (ordinary autograd, O_b = the input of attn.proj) weight it:
M_b = ReLU(Σ_e g_b[e] S_b[P:, e]) with g_b = ReLU(C_b) (supervised) or C_b (self-supervised, y = Σ_d w_d f_d with
kNN weights w). The maps are accumulated over blocks and shown through the authors' display pipeline.
"""
from __future__ import annotations

import torch

from vitx_fast.methods.base import MethodResult, ReferenceImplementation
from vitx_fast.methods.daam.memory_bank import MemoryBank, resolve_bank, self_neighbour_weights


def daam_captures(adapter, images: torch.Tensor, grad_outputs: torch.Tensor | None, mode: str,
                  bank: MemoryBank | None = None, k: int = 20, temperature: float = 0.07):
    """One forward and one VJP.

    Returns a (B, L, H, T) CLS-query attention rows, v (B, L, H, T, d), C (B, L, D) = ∂y/∂O_b[:, 0] and the voted
    classes (B,) (SSL; -1 without a bank; None in supervised mode). grad_outputs: (B, C) one-hot rows of the targets
    (supervised); in SSL mode the kNN weights w (B, D) are computed here from f = model(x).
    """
    # images rarely require grad; make the token stream do so, so that frozen models still build a graph
    rec = adapter.forward(images, tokens_hook=lambda x: x if x.requires_grad else x.detach().requires_grad_(True))
    out, voted = rec.output, None
    if mode == "ssl":
        f = out.detach()
        if bank is None:
            grad_outputs = self_neighbour_weights(f)
            voted = torch.full((f.shape[0],), -1, dtype=torch.long, device=f.device)
        else:
            grad_outputs, voted = bank.weights(f, k=k, temperature=temperature)
    ctx = [b.attn.context for b in rec.blocks]
    grads = torch.autograd.grad(out, ctx, grad_outputs=grad_outputs.to(out.dtype), allow_unused=True)
    C = torch.stack([torch.zeros_like(c[:, 0]) if g is None else g[:, 0]
                     for c, g in zip(ctx, grads, strict=True)], dim=1)
    a = torch.stack([b.attn.probs[:, :, 0, :] for b in rec.blocks], dim=1).detach()
    v = torch.stack([b.attn.v for b in rec.blocks], dim=1).detach()
    return a, v, C.detach(), voted


def spatial_features(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """S[j, h*d + e] = a[h, j] * v[h, j, e]. a: (..., H, T), v: (..., H, T, d) -> S (..., T, H*d)."""
    s = a.unsqueeze(-1) * v  # (..., H, T, d)
    return s.transpose(-3, -2).reshape(*s.shape[:-3], s.shape[-2], s.shape[-3] * s.shape[-1])


def block_maps(S: torch.Tensor, C: torch.Tensor, P: int, mode: str, norm: bool = False) -> torch.Tensor:
    """S: (B, L, T, D), C: (B, L, D) -> M (B, L, N) = ReLU(Σ_e g[e] S[P:, e]), g = ReLU(C) only when supervised."""
    g = torch.relu(C) if mode == "supervised" else C
    M = torch.relu((g.unsqueeze(2) * S[:, :, P:, :]).sum(-1))
    return max_min_normalize(M) if norm else M


def max_min_normalize(M: torch.Tensor) -> torch.Tensor:
    """The authors' `max_min_normalize` over the last dim: (M - min) / (max - min + 1e-10)."""
    M = M - M.amin(-1, keepdim=True)
    return M / (M.amax(-1, keepdim=True) + 1e-10)


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den <= 0 (the reference divides by 0 there and returns NaN)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def display_maps(M: torch.Tensor, display: str = "nonlinear", output: str = "float"):
    """M: (B, L, N) per-block maps >= 0 -> (n (B, L, N) display maps, acc (B, L, N) accumulated maps).

    nonlinear (`global_max_min_norm_nonlinearmapping`): u = acc_b / max(acc_{L-1}), s = sigmoid(5u) - 0.5, n = per-map
    min-max of s. linear (`global_max_min_norm`): clip((acc_b - gmin)/(cur_max - gmin + 1e-10), 0) scaled by
    (cur_max - cur_min)/(gmax - gmin). output="uint8" truncates 255·n as np.uint8 does.
    """
    acc = M.cumsum(dim=1)
    final = acc[:, -1:, :]  # (B, 1, N)
    gmax, gmin = final.amax(-1, keepdim=True), final.amin(-1, keepdim=True)
    if display == "nonlinear":
        u = _div(acc, gmax)
        s = 1 / (1 + torch.exp(-(5 * u))) - 0.5  # the reference's sigmod_variant(u, 5), same op order
        lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
        n = _div(s - lo, hi - lo)
        return ((255 * n).to(torch.uint8) if output == "uint8" else n), acc
    cur_max, cur_min = acc.amax(-1, keepdim=True), acc.amin(-1, keepdim=True)
    img = ((acc - gmin) / (cur_max - gmin + 1e-10)).clamp_min(0)
    ratio = _div(cur_max - cur_min, gmax - gmin)
    if output == "uint8":
        return ((255 * ratio) * img).to(torch.uint8), acc
    return ratio * img, acc


class DAAMReference(ReferenceImplementation):
    def explain_targets(self, adapter, images, targets, opts) -> MethodResult:
        mode = opts["mode"]
        onehot = None
        with torch.enable_grad():
            if mode == "supervised":
                onehot = torch.zeros(images.shape[0], adapter.num_classes, dtype=images.dtype, device=images.device)
                onehot.scatter_(1, targets.view(-1, 1).to(images.device), 1)
            a, v, C, voted = daam_captures(adapter, images, onehot, mode, resolve_bank(opts["memory_bank"]),
                                           opts["k"], float(opts["temperature"]))
        S = spatial_features(a, v)  # (B, L, T, D)
        M = block_maps(S, C, adapter.num_prefix_tokens, mode, opts["norm"])
        n, acc = display_maps(M, opts["display"], opts["output"])
        B, L = M.shape[:2]
        h, w = adapter.grid_for(*images.shape[-2:])
        flow = n.reshape(B, L, h, w)
        extras = {"accumulated": acc.reshape(B, L, h, w), "block_maps": M.reshape(B, L, h, w)}
        return MethodResult(maps=flow[:, -1], flow=flow, targets=voted, extras=extras)
