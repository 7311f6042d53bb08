"""Chefer Transformer LRP: the engine against the literal port of Transformer-Explainability's ViT_LRP.py +
layers_ours.py (method "grad") in tests/ports/chefer.py: maps, relevance conservation, start_layer, refusals
(docs/methods/lrp.md §3 and §6).
"""
import pytest
import torch
import torch.nn as nn
from ports.chefer import generate_LRP, port_from_timm, port_map
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
def test_lrp_matches_chefer_port(layout):
    model = make_vit(layout)
    port = port_from_timm(model)
    images = make_images(model, batch=3)
    h, w = model.patch_embed.grid_size
    with torch.no_grad():
        logits = model(images)
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    torch.testing.assert_close(port.forward_tokens(tokens), logits)  # (the port's hooks need grad mode)
    targets = torch.tensor([int(logits[0].argmax()), 3, 5])  # top-1 and two other classes
    for s in (0, 1):
        exp = vx.explain(model, images, method="lrp", target=targets, start_layer=s)
        assert exp.maps.shape == (3, h, w) and exp.maps.dtype == torch.float64
        assert_structured(exp.maps)
        for b in range(3):
            ref = port_map(model, port, images[b:b + 1], int(targets[b]), s).reshape(h, w)
            assert_maps_close(exp.maps[b], ref, atol=1e-6)
            torch.testing.assert_close(exp.maps[b], ref, rtol=1e-7, atol=1e-9)  # raw scale too


def test_literal_embedding_path_is_used():
    # the plain layout runs the port's own PatchEmbed + cls + pos-embed Add, not the timm embedding
    model = make_vit("plain")
    port = port_from_timm(model)
    x = make_images(model, 1)
    torch.testing.assert_close(port(x), model(x))


def test_start_layer_changes_map_and_validation():
    model = make_vit("plain")
    x = make_images(model, 2)
    m0 = vx.explain(model, x, method="lrp").maps
    m1 = vx.explain(model, x, method="lrp", start_layer=1).maps
    assert (m0 - m1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="start_layer=3 is out of range"):
        vx.explain(model, x, method="lrp", start_layer=3)
    with pytest.raises(ValueError, match="start_layer must be an int >= 0"):
        vx.explain(model, x, method="lrp", start_layer=-1)


@pytest.mark.parametrize("layout", ["plain", "distilled", "layerscale", "registers"])
def test_conservation(layout):
    """Every rule conserves sum R, so |sum R| at each block input equals the head's sum R (= 1 for a one-hot)."""
    model = make_vit(layout)
    x = make_images(model, 3)
    exp = vx.explain(model, x, method="lrp")
    sums = exp.extras["relevance_sums"]  # (B, 1 + L): head input tokens, then blocks L-1 .. 0
    assert sums.shape == (3, 1 + len(model.blocks))
    head = sums[:, :1]
    torch.testing.assert_close(head, torch.ones_like(head), rtol=0, atol=1e-6)
    assert ((sums[:, 1:].abs() - head.abs()).abs() < 1e-6).all(), sums
    # and the port agrees on the per-block sums for image 0
    port = port_from_timm(model)
    port_map(model, port, x[:1], int(exp.targets[0]), 0)
    torch.testing.assert_close(torch.tensor(port.block_input_sums, dtype=torch.float64), sums[0, 1:], rtol=0,
                               atol=1e-9)


@pytest.mark.parametrize("layout", ["plain", "registers", "distilled"])
def test_batched_equals_single_and_fused(layout):
    model = make_vit(layout)
    fused = make_vit(layout, fused=True)
    x = make_images(model, 3)
    batched = vx.explain(model, x, method="lrp", start_layer=1)
    for b in range(3):
        single = vx.explain(model, x[b:b + 1], method="lrp", start_layer=1)
        assert torch.equal(single.targets, batched.targets[b:b + 1])
        assert_maps_close(batched.maps[b], single.maps[0], atol=1e-10)
    assert_maps_close(vx.explain(fused, x, method="lrp", start_layer=1).maps, batched.maps, atol=1e-10)


def test_float32_frozen_no_grad():
    model = make_vit("registers")
    x = make_images(model, 2)
    ref = vx.explain(model, x, method="lrp").maps
    m32 = model.float().requires_grad_(False)
    with torch.no_grad():
        e32 = vx.explain(m32, x.float(), method="lrp")
    assert e32.maps.dtype == torch.float32
    assert not any(p.grad is not None for p in m32.parameters())
    assert_maps_close(e32.maps, ref, atol=1e-3)


def test_refusals():
    from timm.layers import SwiGLUPacked

    x = make_images(make_vit("plain"), 1)
    cases = [
        (make_vit("plain", global_pool="avg"), "global_pool='avg'"),
        (make_vit("plain", class_token=False, global_pool="avg"), "no class token"),
        (make_vit("plain", global_pool="map"), "global_pool='map'"),
        (make_vit("plain", scale_attn_norm=True), "not plain"),
        (make_vit("plain", mlp_layer=SwiGLUPacked, act_layer=nn.SiLU), "SwiGLU"),
        (make_vit("plain", num_classes=0), "headless"),
    ]
    for model, match in cases:
        with pytest.raises(vx.UnsupportedModelError, match=match):
            vx.explain(model, x, method="lrp")
    # an fc_norm LayerNorm and an Mlp norm are allowed (identity rule); relevance is still conserved
    for model in (make_vit("plain", fc_norm=True), make_vit("plain", scale_mlp_norm=True)):
        e = vx.explain(model, x, method="lrp")
        assert_structured(e.maps)
        assert (e.extras["relevance_sums"] - 1).abs().max() < 1e-6


# ----------------------------------------------------------------------------------------- layouts beyond LAYOUTS
EXTRA, _extra = EXTRA_LAYOUTS, extra_model_and_images


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name,base,kw,size", EXTRA, ids=[e[0] for e in EXTRA])
def test_lrp_extra_layouts_match_port(name, base, kw, size, backend):
    model, x = _extra(base, kw, size, 2)
    port = port_from_timm(model)
    h, w = vx.ViTAdapter(model).grid_for(*x.shape[-2:])
    targets = torch.tensor([1, 4])
    for s in sorted({0, min(1, len(model.blocks) - 1)}):
        exp = vx.explain(model, x, method="lrp", target=targets, start_layer=s, backend=backend)
        assert exp.maps.shape == (2, h, w) and exp.maps.dtype == torch.float64
        assert_structured(exp.maps)
        for b in range(2):
            with torch.no_grad():  # the timm model's own embedding (resampled position embeddings)
                tokens = model.norm_pre(model._pos_embed(model.patch_embed(x[b:b + 1])))
            ref = generate_LRP(port, tokens, index=int(targets[b]), start_layer=s, tokens=True).detach().reshape(h, w)
            assert_maps_close(exp.maps[b], ref, atol=1e-10)
        one = vx.explain(model, x[1:], method="lrp", target=targets[1:], start_layer=s, backend=backend)
        assert_maps_close(one.maps[0], exp.maps[1], atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("layout", ["distilled", "plain", "registers"])
def test_lrp_matches_port_to_float64_precision(layout, backend):
    """The DeiT head's final tokens feed two IndexSelects (tokens 0 and 1) that a Clone joins, X * (R_a/X + R_b/X)
    with safe_divide's 1e-9: summing the two token relevances without that Clone leaves a ~1e-9 relative error, below
    the port test's tolerance but above float64 precision."""
    model = make_vit(layout)
    port = port_from_timm(model)
    x = make_images(model, 2)
    h, w = model.patch_embed.grid_size
    exp = vx.explain(model, x, method="lrp", backend=backend)
    for b in range(2):
        ref = port_map(model, port, x[b:b + 1], int(exp.targets[b]), 0).reshape(h, w)
        assert_maps_close(exp.maps[b], ref, atol=2e-10)
        torch.testing.assert_close(exp.maps[b], ref, rtol=2e-10, atol=2e-10 * float(ref.abs().max()))
