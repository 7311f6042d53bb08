"""Shared helpers for the T-TAME tests: explainers with random (non-trivial) weights and BN statistics. The literal
port of the authors' code (and its `literal_c` driver) is tests/ports/ttame.py."""
from __future__ import annotations

import math

import torch

from vitx_fast.methods.tame.module import TAMEExplainer


def randomize_am(am, seed: int = 0):
    """Re-draw every AM parameter and the BN running statistics (so that folding BN is exercised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in am.named_parameters():
            if name.startswith("fuser.weight") or (name.startswith("convs") and name.endswith("weight")):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.startswith("bns") and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        for bn in am.bns:
            bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
    return am


def random_explainer(model, seed: int = 0, layers=None) -> TAMEExplainer:
    ex = TAMEExplainer.for_model(model, layers)
    randomize_am(ex.attn_mech, seed)
    return ex.eval()
