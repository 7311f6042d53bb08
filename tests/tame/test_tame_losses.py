"""T-TAME objective and optimisation (docs/methods/tame.md §1.4 and §6).

- Area, TV (doubled corners, division by 2B) and CE against hand computations;
- the B x B "random" map selection and the weighted terms against a literal port of `Arrangement.classic_loss` and
  `Generic.get_a`; the masked input against `new_train_policy`;
- one (and two) full training steps against the literal pipeline (norm1 hooks, AttentionTAME, get_optim, OneCycleLR);
- OneCycle lr and momentum at step 0, at the 30% peak and at the end.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers_tame import random_explainer
from ports.ttame import RefGeneric, classic_loss, get_optim, get_schedule
from utils import make_images, make_vit

from vitx_fast.engine.adapter import ViTAdapter
from vitx_fast.methods.tame.losses import (
    AREA_COEFF,
    CE_COEFF,
    TV_COEFF,
    area_loss,
    mask_images,
    select_maps,
    tame_loss,
    tv_loss,
)
from vitx_fast.methods.tame.train import _frozen, make_optimizer, make_scheduler, train_step


def test_terms_by_hand_2x2():
    a, b, c, d = 0.1, 0.7, 0.4, 0.2
    m = torch.tensor([[[[a, b], [c, d]]]], dtype=torch.float64)
    vertical = (c - a) ** 2 + (d - b) ** 2
    horizontal = (b - a) ** 2 + (d - c) ** 2
    # last row, first row, last column, first column: each corner appears twice
    border = 0.3 * ((c * c + d * d) + (a * a + b * b) + (b * b + d * d) + (a * a + c * c))
    assert tv_loss(m).item() == pytest.approx((vertical + horizontal + border) / 2, abs=1e-15)
    assert tv_loss(m).item() == pytest.approx(0.58, abs=1e-15)
    area = sum((v + 5e-4) ** 0.3 for v in (a, b, c, d)) / 4
    assert area_loss(m).item() == pytest.approx(area, abs=1e-15)
    logits = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
    ce = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
    loss = tame_loss(logits, torch.tensor([0]), m)
    assert loss.ce.item() == pytest.approx(ce, abs=1e-15)
    assert loss.total.item() == pytest.approx(1.5 * ce + 2 * area + 0.01 * 0.58, abs=1e-14)


def test_tv_by_loops():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(3, 3, 4, 5, generator=g, dtype=torch.float64)
    B, K, h, w = m.shape
    v = m.tolist()
    total = 0.0
    for i in range(B):
        for k in range(K):
            x = v[i][k]
            total += sum((x[r + 1][s] - x[r][s]) ** 2 for r in range(h - 1) for s in range(w))
            total += sum((x[r][s + 1] - x[r][s]) ** 2 for r in range(h) for s in range(w - 1))
            edge = sum(x[h - 1][s] ** 2 + x[0][s] ** 2 for s in range(w)) + sum(x[r][w - 1] ** 2 + x[r][0] ** 2
                                                                                 for r in range(h))
            total += 0.3 * edge
    assert tv_loss(m).item() == pytest.approx(total / (2 * B), rel=1e-13)
    area = sum((e + 5e-4) ** 0.3 for e in m.flatten().tolist()) / m.numel()
    assert area_loss(m).item() == pytest.approx(area, rel=1e-13)


def test_random_masking_and_classic_loss_port():
    g = torch.Generator().manual_seed(1)
    B, C = 4, 6
    # square maps: the reference adds the border rows and columns elementwise, which only broadcasts for h == w
    a = torch.rand(B, C, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 5, 2, 0])  # duplicates are kept
    logits = torch.randn(B, C, generator=g, dtype=torch.float64)
    sel = select_maps(a, labels, "random")
    assert sel.shape == (B, B, 4, 4)
    assert torch.equal(sel, a[:, labels, :, :])  # Generic.get_a, masking="random"
    assert torch.equal(sel[:, 0], sel[:, 2])
    diag = select_maps(a, labels, "diagonal")
    assert torch.equal(diag, a[torch.arange(B), labels, :, :].unsqueeze(1))
    ref = classic_loss(logits, labels, a[:, labels, :, :])
    mine = tame_loss(logits, labels, sel)
    terms = [mine.total, CE_COEFF * mine.ce, AREA_COEFF * mine.area, TV_COEFF * mine.tv]
    for want, got in zip(ref, terms, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    # the diagonal set is a different objective
    assert not torch.allclose(tame_loss(logits, labels, diag).total, mine.total)


def test_mask_images_is_new_train_policy():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(3, 5, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([4, 0, 4])
    x = torch.randn(3, 3, 32, 48, generator=g, dtype=torch.float64)
    masks = a[torch.arange(3), labels, :, :].unsqueeze(1)
    masks = F.interpolate(masks, size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.equal(mask_images(a, labels, x), masks * x)


def _reference_steps(model, ex, batches, total_steps, lr=1e-3):
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    ref = RefGeneric(m, ex.layers, m.num_prefix_tokens, tuple(m.patch_embed.grid_size), ex.num_classes)
    ref.attn_mech.load_state_dict(ex.attn_mech.state_dict())
    ref = ref.double()
    ref.body.requires_grad_(False)
    optim = get_optim(ref.attn_mech)
    sched = get_schedule(optim, 0, lr=lr, epochs=1, total_steps=total_steps)
    losses = []
    for x in batches:
        ref.train()
        ref.body.eval()  # the backbone runs in eval mode throughout (docs/methods/tame.md §3)
        logits = ref(x)
        loss = classic_loss(logits, ref.labels, ref.get_a())
        optim.zero_grad()
        loss[0].backward()
        optim.step()
        sched.step()
        losses.append(loss[0].item())
    return ref.attn_mech, losses


def test_training_steps_match_reference_pipeline():
    model = make_vit("registers")
    ex = random_explainer(model, seed=7)
    batches = [make_images(model, 4, seed=s) for s in (0, 1)]
    ref_am, ref_losses = _reference_steps(model, ex, batches, total_steps=10)
    adapter = ViTAdapter(model)
    opt = make_optimizer(ex.attn_mech)
    sched = make_scheduler(opt, 1e-3, 10)
    grid = adapter.grid_for(32, 32)
    losses = []
    with adapter.session(), _frozen(model):
        for x in batches:
            ex.train()
            losses.append(train_step(adapter, ex, opt, sched, x, ex.layers, grid)["loss"])
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    ref_state = ref_am.state_dict()
    for k, v in ex.attn_mech.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=1e-12, msg=lambda s, k=k: f"{k}: {s}")
    moved = (ex.attn_mech.fuser.weight - random_explainer(model, seed=7).attn_mech.fuser.weight).abs().max()
    assert moved > 1e-6  # the steps did change the parameters
    assert all(p.requires_grad for p in model.parameters())  # backbone flags restored


def test_optimizer_groups():
    ex = random_explainer(make_vit("plain"))
    opt = make_optimizer(ex.attn_mech)
    no_decay, decay = opt.param_groups
    names = {id(p): n for n, p in ex.attn_mech.named_parameters()}
    assert all(names[id(p)].endswith("bias") for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    assert {names[id(p)] for p in decay["params"]} >= {"bns.0.weight", "convs.1.weight", "fuser.weight"}
    assert decay["weight_decay"] == 5e-4 and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert len(no_decay["params"]) + len(decay["params"]) == len(list(ex.attn_mech.parameters()))


def test_one_cycle_lr_and_momentum():
    ex = random_explainer(make_vit("plain"))
    opt = make_optimizer(ex.attn_mech, lr=1e-3)
    total = 100
    sched = make_scheduler(opt, 1e-3, total)
    seen = {}
    for step in range(total):
        seen[step] = [(g["lr"], g["momentum"]) for g in opt.param_groups]
        opt.step()
        sched.step()
    for lr, mom in seen[0]:
        assert lr == pytest.approx(1e-3 / 25, rel=1e-12) and mom == pytest.approx(0.95, rel=1e-12)
    for lr, mom in seen[29]:  # end of the warm-up phase: pct_start * total - 1
        assert lr == pytest.approx(1e-3, rel=1e-12) and mom == pytest.approx(0.85, rel=1e-12)
    for lr, mom in seen[total - 1]:
        assert lr == pytest.approx(1e-3 / 25 / 1e4, rel=1e-9) and mom == pytest.approx(0.95, rel=1e-12)
    assert max(s[0][0] for s in seen.values()) == pytest.approx(1e-3, rel=1e-12)
