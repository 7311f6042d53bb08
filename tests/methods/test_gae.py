"""GAE: the engine against the notebook's full-matrix formula (Transformer_MM_explainability_ViT.ipynb), ported in
tests/ports/chefer_gae.py with A and its gradient taken by hooks on an unfused timm model's attn_drop (batch 1)."""
import copy

import pytest
import torch
from ports.chefer_gae import generate_relevance
from utils import (
    EXTRA_LAYOUTS,
    LAYOUTS,
    assert_maps_close,
    assert_structured,
    extra_model_and_images,
    make_images,
    make_vit,
)

import vitx_fast as vx


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: thread start-up dominates on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gae_matches_notebook(layout):
    model = make_vit(layout)
    images = make_images(model, batch=3)
    h, w = model.patch_embed.grid_size
    with torch.no_grad():
        top1 = int(model(images[:1]).argmax())
    targets = torch.tensor([top1, 2, 6])
    exp = vx.explain(model, images, method="gae", target=targets)
    assert exp.maps.shape == (3, h, w) and exp.maps.dtype == torch.float64
    assert_structured(exp.maps)
    for b in range(3):
        ref = generate_relevance(model, images[b:b + 1], int(targets[b])).detach().reshape(h, w)
        assert_maps_close(exp.maps[b], ref, atol=1e-6)
        torch.testing.assert_close(exp.maps[b], ref, rtol=1e-9, atol=1e-12)  # raw scale too
    # default target is the top-1 class
    torch.testing.assert_close(vx.explain(model, images[:1], method="gae").maps, exp.maps[:1])


@pytest.mark.parametrize("layout", ["plain", "registers", "distilled"])
def test_batched_equals_single_and_fused(layout):
    model = make_vit(layout)
    fused = make_vit(layout, fused=True)
    x = make_images(model, 3)
    batched = vx.explain(model, x, method="gae")
    for b in range(3):
        assert_maps_close(batched.maps[b], vx.explain(model, x[b:b + 1], method="gae").maps[0], atol=1e-10)
    assert_maps_close(vx.explain(fused, x, method="gae").maps, batched.maps, atol=1e-10)


def test_target_matters():
    model = make_vit("plain")
    x = make_images(model, 2)
    a = vx.explain(model, x, method="gae", target=1).maps
    b = vx.explain(model, x, method="gae", target=4).maps
    assert (a - b).abs().max() > 1e-3


def test_float32_frozen_no_grad():
    model = make_vit("plain")
    x = make_images(model, 2)
    ref = vx.explain(model, x, method="gae").maps
    m32 = copy.deepcopy(model).float().requires_grad_(False)
    with torch.no_grad():
        e32 = vx.explain(m32, x.float(), method="gae")
    assert e32.maps.dtype == torch.float32
    assert all(p.grad is None for p in m32.parameters())
    assert_maps_close(e32.maps, ref, atol=1e-4)


def test_refusals():
    x = make_images(make_vit("plain"), 1)
    with pytest.raises(vx.UnsupportedModelError, match="no class token"):
        vx.explain(make_vit("plain", class_token=False, global_pool="avg"), x, method="gae")
    with pytest.raises(vx.UnsupportedModelError, match="headless"):
        vx.explain(make_vit("plain", num_classes=0), x, method="gae")
    with pytest.raises(TypeError, match="unknown option"):
        vx.explain(make_vit("plain"), x, method="gae", start_layer=1)


# ----------------------------------------------------------------------------------------- layouts beyond LAYOUTS
EXTRA, _extra = EXTRA_LAYOUTS, extra_model_and_images


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name,base,kw,size", EXTRA, ids=[e[0] for e in EXTRA])
def test_gae_extra_layouts_match_notebook(name, base, kw, size, backend):
    model, x = _extra(base, kw, size, 3)
    h, w = vx.ViTAdapter(model).grid_for(*x.shape[-2:])
    targets = torch.tensor([0, 2, 6])
    exp = vx.explain(model, x, method="gae", target=targets, backend=backend)
    assert exp.maps.shape == (3, h, w) and exp.maps.dtype == torch.float64
    assert_structured(exp.maps)
    for b in range(3):
        ref = generate_relevance(model, x[b:b + 1], int(targets[b])).detach().reshape(h, w)
        torch.testing.assert_close(exp.maps[b], ref, rtol=1e-9, atol=1e-12)
    # (B, K) targets: each column equals its own (B,) run
    two = vx.explain(model, x, method="gae", target=torch.stack([targets, targets.flip(0)], 1), backend=backend)
    assert two.maps.shape == (3, 2, h, w)
    torch.testing.assert_close(two.maps[:, 0], exp.maps, rtol=1e-10, atol=1e-14)
