"""T-TAME on token layouts that combine what the single-layout tests cover one at a time (docs/methods/tame.md
§1.1 and §3: drop all P prefix rows, the model's (h, w) grid): register tokens with a non-square grid, a distilled
model with a tall grid, no class token (P = 0, average pooling), `no_embed_class` with registers; float64, batch 1 and
> 1, both backends against the literal port, batched against per-image, and one training step against the reference
pipeline on a non-square grid."""
from __future__ import annotations

import copy

import pytest
import torch
from helpers_tame import random_explainer
from ports.ttame import RefGeneric, classic_loss_any_grid, get_optim, get_schedule, literal_c
from utils import assert_structured, explain_on, make_images, make_vit

import vitx_fast as vx
from vitx_fast.engine.adapter import ViTAdapter
from vitx_fast.methods.tame.train import _frozen, make_optimizer, make_scheduler, train_step

TAME_BACKENDS = ("reference", "fused")  # the fast path calls no fused op, so there is no cpp / triton backend
COMBOS = {
    "registers_nonsquare": ("registers", dict(img_size=(24, 40))),  # P = 5, grid 3 x 5
    "distilled_tall": ("distilled", dict(img_size=(40, 24))),  # P = 2, grid 5 x 3
    "no_class_token": ("plain", dict(class_token=False, global_pool="avg", img_size=(32, 24))),  # P = 0, grid 4 x 3
    "no_embed_class_nonsquare": ("no_embed_class", dict(img_size=(16, 40))),  # P = 3, grid 2 x 5
}


def _model(name, **kw):
    layout, overrides = COMBOS[name]
    return make_vit(layout, **overrides, **kw)


@pytest.mark.parametrize("backend", TAME_BACKENDS)
@pytest.mark.parametrize("name", list(COMBOS))
def test_engine_vs_literal_port_float64(name, backend):
    model = _model(name)
    assert next(model.parameters()).dtype == torch.float64
    ex = random_explainer(model, seed=5)
    grid = tuple(model.patch_embed.grid_size)
    for batch in (1, 4):
        images = make_images(model, batch, seed=batch)
        c_ref, labels = literal_c(model, ex, images)
        assert c_ref.dtype == torch.float64
        e = explain_on(backend, model, images, "tame", must_serve=TAME_BACKENDS, explainer=ex)
        assert e.maps.dtype == torch.float64 and e.maps.shape == (batch, *grid)
        assert torch.equal(e.targets, labels)
        assert_structured(e.maps)
        torch.testing.assert_close(e.maps, c_ref[torch.arange(batch), labels], rtol=0, atol=1e-10)
        some = torch.arange(3)[None].expand(batch, -1) % ex.num_classes
        multi = vx.explain(model, images, method="tame", explainer=ex, target=some, backend=backend)
        torch.testing.assert_close(multi.maps, c_ref[:, :3], rtol=0, atol=1e-10)


@pytest.mark.parametrize("backend", TAME_BACKENDS)
@pytest.mark.parametrize("name", list(COMBOS))
def test_batched_equals_per_image(name, backend):
    model = _model(name)
    ex = random_explainer(model, seed=6)
    images = make_images(model, 3)
    batched = explain_on(backend, model, images, "tame", must_serve=TAME_BACKENDS, explainer=ex)
    for i in range(3):
        single = vx.explain(model, images[i:i + 1], method="tame", explainer=ex, backend=backend)
        torch.testing.assert_close(batched.maps[i:i + 1], single.maps, rtol=0, atol=1e-12)
        assert torch.equal(batched.targets[i:i + 1], single.targets)


@pytest.mark.parametrize("name", ["registers_nonsquare", "no_class_token"])
def test_training_steps_match_reference_pipeline_nonsquare(name):
    model = _model(name)
    ex = random_explainer(model, seed=8)
    batches = [make_images(model, b, seed=s) for s, b in ((0, 4), (1, 1), (2, 3))]  # incl. a batch of one
    m = copy.deepcopy(model).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    ref = RefGeneric(m, ex.layers, m.num_prefix_tokens, tuple(m.patch_embed.grid_size), ex.num_classes).double()
    ref.attn_mech.load_state_dict(ex.attn_mech.state_dict())
    ref.body.requires_grad_(False)
    optim = get_optim(ref.attn_mech)
    sched = get_schedule(optim, 0, lr=1e-3, epochs=1, total_steps=10)
    ref_losses = []
    for x in batches:
        ref.train()
        ref.body.eval()
        logits = ref(x)
        loss = classic_loss_any_grid(logits, ref.labels, ref.get_a())
        optim.zero_grad()
        loss.backward()
        optim.step()
        sched.step()
        ref_losses.append(loss.item())

    adapter = ViTAdapter(model)
    opt = make_optimizer(ex.attn_mech)
    sch = make_scheduler(opt, 1e-3, 10)
    losses = []
    with adapter.session(), _frozen(model):
        for x in batches:
            ex.train()
            losses.append(train_step(adapter, ex, opt, sch, x, ex.layers, adapter.grid_for(*x.shape[-2:]))["loss"])
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    ref_state = ref.attn_mech.state_dict()
    for k, v in ex.attn_mech.state_dict().items():
        assert v.dtype == ref_state[k].dtype
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=1e-12, msg=lambda s, k=k: f"{k}: {s}")
