"""AGCAM parity tests (docs/methods/agcam.md §6): the engine against the literal port of `AGCAM.generate` in
tests/ports/agcam.py (batch 1, hooks on an unfused timm model), the closed-form CLS-only backward against autograd,
target forms, fusions, the detach, refusals and the normalise / upsample options.
"""
from __future__ import annotations

import copy

import pytest
import torch
from ports.agcam import LiteralAGCAM, literal_maps
from utils import (
    LAYOUTS,
    assert_maps_close,
    assert_structured,
    backend_params,
    explain_on,
    images_at,
    make_images,
    make_vit,
)

import vitx_fast as vx

ALL_LAYOUTS = sorted(LAYOUTS)


def closed_form_G(model, image, cls):
    """The CLS-only backward of docs/methods/agcam.md §1.3 for one image (1, C, H, W):
    G^l_{h,0,j} = <δ^l_h, V^l_{h,j}>, list of (H, T)."""
    ad = vx.ViTAdapter(model)
    with torch.no_grad():
        rec = ad.forward(image)
    H, d = ad.num_heads, ad.head_dim
    z0 = rec.blocks[-1].z[0, 0].clone()

    def y_of(z):  # logit c from the CLS row of the last block's output; a distilled head contributes ½ W_head[c]
        f = model.norm(z)
        if ad.distilled:
            return 0.5 * model.head(f)[cls]
        return model.head(model.fc_norm(f))[cls]

    _, vjp = torch.func.vjp(y_of, z0)
    g = vjp(torch.ones((), dtype=z0.dtype))[0]
    Gs = [None] * ad.depth
    for i in reversed(range(ad.depth)):
        blk = model.blocks[i]
        y_row = rec.blocks[i].y[0, 0]
        _, vjp_mlp = torch.func.vjp(lambda r, blk=blk: blk.ls2(blk.mlp(blk.norm2(r))), y_row)
        g_u = g + vjp_mlp(g)[0]
        o_row = rec.blocks[i].attn.context[0, 0]
        _, vjp_proj = torch.func.vjp(lambda o, blk=blk: blk.ls1(blk.attn.proj(o)), o_row)
        delta = vjp_proj(g_u)[0].reshape(H, d)
        V = rec.blocks[i].attn.v[0]  # (H, T, d)
        Gs[i] = torch.einsum("hd,htd->ht", delta, V)
        g = g_u  # skip path only: the attention input was detached
    return Gs


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_closed_form_matches_autograd_and_rows_vanish(layout):
    model = make_vit(layout)
    x = make_images(model, 1)
    cls = int(model(x).argmax())
    ref = LiteralAGCAM(model)
    ref.generate(x, cls)
    full = list(reversed(ref.full_grads))  # backward hooks fire L-1..0
    Gs = closed_form_G(model, x, cls)
    assert len(full) == len(Gs) == len(model.blocks)
    read = 2 if layout == "distilled" else 1  # a distilled head also reads the dist row (it never reaches row 0)
    for i, (auto, cf) in enumerate(zip(full, Gs, strict=True)):
        assert torch.count_nonzero(auto[0, :, read:, :]) == 0, f"layer {i}: rows the head does not read are not 0"
        assert auto[0, :, 0].abs().max() > 0
        torch.testing.assert_close(cf, auto[0, :, 0], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("layout,fused", [(lay, False) for lay in ALL_LAYOUTS] +
                         [(lay, True) for lay in ("plain", "registers", "distilled", "nonsquare", "layerscale")])
def test_matches_literal_reference(layout, fused):
    model = make_vit(layout, fused=fused)
    x = make_images(model, 3)
    batched = vx.explain(model, x, method="agcam")
    expected = literal_maps(model, x)
    assert batched.maps.shape == (3, *model.patch_embed.grid_size)
    assert_structured(batched.maps)
    assert_maps_close(batched.maps, expected, atol=1e-6)
    # raw scale too (the reference returns the map un-normalised)
    torch.testing.assert_close(batched.maps, expected, atol=1e-10, rtol=1e-8)
    single = vx.explain(model, x[1:2], method="agcam")
    torch.testing.assert_close(single.maps[0], batched.maps[1], atol=1e-12, rtol=1e-10)


def test_given_targets_and_fusions():
    model = make_vit("registers")
    x = make_images(model, 2)
    t = torch.tensor([3, 5])
    for hf in ("sum", "mean"):
        for lf in ("sum", "mean"):
            got = vx.explain(model, x, method="agcam", target=t, head_fusion=hf, layer_fusion=lf).maps
            torch.testing.assert_close(got, literal_maps(model, x, t, head_fusion=hf, layer_fusion=lf),
                                       atol=1e-10, rtol=1e-8)
            # mean is sum divided by a constant: the same map after min-max
            ref = vx.explain(model, x, method="agcam", target=t).maps
            assert_maps_close(got, ref, atol=1e-9)


def test_detach_is_honoured():
    model = make_vit("plain", depth=4)
    x = make_images(model, 1)
    detached = vx.explain(model, x, method="agcam").maps
    ordinary = literal_maps(model, x, detach=False)
    assert_maps_close(detached, literal_maps(model, x), atol=1e-6)
    err = (vx.normalize(detached) - vx.normalize(ordinary)).abs().max()
    assert err > 1e-2, f"ordinary-gradient AGCAM equals the detached one (max diff {err:.2e}): detach not applied?"


@pytest.mark.parametrize("layout", ["plain", "registers", "nonsquare"])
def test_fused_on_off_identical(layout):
    a = make_vit(layout, fused=False)
    b = make_vit(layout, fused=True)
    x = make_images(a, 2)
    torch.testing.assert_close(vx.explain(a, x, method="agcam").maps, vx.explain(b, x, method="agcam").maps,
                               atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("depth,heads,dim,extra", [
    (1, 1, 16, {}),
    (2, 3, 24, {"reg_tokens": 4}),  # P = 5
    (12, 12, 48, {"init_values": 0.5, "img_size": (24, 40)}),  # LayerScale, 3 x 5 grid
    (12, 1, 16, {"distilled": True}),  # P = 2
], ids=["L1-H1-P1", "L2-H3-P5", "L12-H12-ls-3x5", "L12-H1-P2"])
def test_shapes(depth, heads, dim, extra):
    model = make_vit("plain", depth=depth, num_heads=heads, embed_dim=dim, **extra)
    x = make_images(model, 2)
    got = vx.explain(model, x, method="agcam").maps
    assert got.shape == (2, *model.patch_embed.grid_size)
    assert_maps_close(got, literal_maps(model, x), atol=1e-6)


@pytest.mark.parametrize("layout", ["plain", "distilled", "registers", "layerscale"])
def test_float32_agrees_with_float64(layout):
    m64 = make_vit(layout)
    m32 = copy.deepcopy(m64).float()
    x = make_images(m64, 2)
    t = vx.explain(m64, x, method="agcam").targets
    got32 = vx.explain(m32, x.float(), method="agcam", target=t).maps
    assert got32.dtype == torch.float32
    assert_maps_close(got32, vx.explain(m64, x, method="agcam").maps, atol=1e-4)


def test_refusals():
    x = make_images(make_vit("plain"), 1)
    with pytest.raises(vx.UnsupportedModelError, match=r"global_pool='avg'.*identically zero"):
        vx.explain(make_vit("plain", global_pool="avg"), x, method="agcam")
    with pytest.raises(vx.UnsupportedModelError, match="no class token"):
        vx.explain(make_vit("plain", class_token=False, global_pool="avg"), x, method="agcam")
    with pytest.raises(vx.UnsupportedModelError, match="headless"):
        vx.explain(make_vit("plain", num_classes=0), x, method="agcam")
    with pytest.raises(TypeError, match="unknown option"):
        vx.explain(make_vit("plain"), x, method="agcam", fusion="sum")
    with pytest.raises(ValueError, match="head_fusion"):
        vx.explain(make_vit("plain"), x, method="agcam", head_fusion="max")


def test_gap_map_would_be_zero():
    """Why the GAP refusal: under detached attention the CLS stream of an avg-pooled model never reaches the logit."""
    model = make_vit("plain", global_pool="avg")
    ref = LiteralAGCAM(model)
    ref.generate(make_images(model, 1))
    assert all(torch.count_nonzero(g) == 0 for g in ref.grad_attn)


def test_user_model_untouched_and_frozen_params():
    model = make_vit("plain")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    x = make_images(model, 2)
    got = vx.explain(model, x, method="agcam").maps
    assert model.training and all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    assert_maps_close(got, literal_maps(model.eval(), x), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- layouts, targets
# layouts the LAYOUTS table does not reach: dynamic_img_size run at another input size (with prefix tokens), depth 1
EXTRA_LAYOUTS = {
    "dynamic-24x40": ("plain", dict(dynamic_img_size=True), (24, 40)),
    "dynamic-registers-40x24": ("registers", dict(dynamic_img_size=True), (40, 24)),
    "dynamic-distilled-24x40": ("distilled", dict(dynamic_img_size=True), (24, 40)),
    "dynamic-no_embed_class-40x48": ("no_embed_class", dict(dynamic_img_size=True), (40, 48)),
    "depth1-1head-ls-qknorm": ("plain", dict(depth=1, num_heads=1, init_values=0.5, qk_norm=True), None),
    "depth1-no_qkv_bias-registers": ("registers", dict(depth=1, qkv_bias=False), None),
}


MUST_SERVE = ("reference", "fused")  # AGCAM's fast path serves every layout; cpp / triton refuse only on device / dtype


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(EXTRA_LAYOUTS), ids=list(EXTRA_LAYOUTS))
def test_extra_layouts_match_literal_every_backend(case, backend):
    """float64, batch 1 and 3, each backend against the literal AGCAM.generate port, on the input's own grid."""
    layout, overrides, size = EXTRA_LAYOUTS[case]
    model = make_vit(layout, scale=1.5, **overrides)
    for batch in (1, 3):
        x = images_at(model, batch, size, seed=batch)
        grid = tuple(s // p for s, p in zip(x.shape[-2:], model.patch_embed.patch_size, strict=True))
        expected = literal_maps(model, x)
        assert_structured(expected)
        got = explain_on(backend, model, x, "agcam", must_serve=MUST_SERVE)
        assert got.maps.shape == (batch, *grid) and got.maps.dtype == torch.float64, backend
        torch.testing.assert_close(got.maps, expected, atol=1e-10, rtol=1e-8, msg=lambda m: f"{backend}: {m}")


_PER_CLASS: dict = {}  # layout -> (model, x, literal map of every class), shared by the backend params of a layout


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["registers", "distilled"])
def test_target_forms_match_literal(layout, backend):
    """int, list, (B,), (B, K) targets give the literal port's map of each requested class, on each backend."""
    if layout not in _PER_CLASS:
        model = make_vit(layout)
        x = make_images(model, 2)
        per_class = {c: literal_maps(model, x, torch.tensor([c, c])) for c in range(model.num_classes)}
        _PER_CLASS[layout] = model, x, per_class
    model, x, per_class = _PER_CLASS[layout]
    cases = {
        "int": (4, torch.stack([per_class[4][0], per_class[4][1]])),
        "list": ([1, 6], torch.stack([per_class[1][0], per_class[6][1]])),
        "(B,)": (torch.tensor([2, 0]), torch.stack([per_class[2][0], per_class[0][1]])),
        "(B,K)": (torch.tensor([[5, 1, 5], [0, 3, 6]]),
                  torch.stack([torch.stack([per_class[c][b] for c in row])
                               for b, row in enumerate([[5, 1, 5], [0, 3, 6]])])),
    }
    for name, (target, expected) in cases.items():
        got = explain_on(backend, model, x, "agcam", must_serve=MUST_SERVE, target=target)
        assert got.maps.shape == expected.shape, (backend, name)
        torch.testing.assert_close(got.maps, expected, atol=1e-10, rtol=1e-8,
                                   msg=lambda m, name=name: f"{backend} {name}: {m}")


@pytest.mark.parametrize("backend", backend_params())
def test_normalize_and_upsample_options(backend):
    """docs/methods/agcam.md §2: raw maps by default; upsample is bilinear (align_corners=False) and comes before the
    min-max, which has +1e-12 in its denominator (the reference evaluation: Upsample, then (m - min) / (max - min))."""
    import torch.nn.functional as F

    model = make_vit("nonsquare")
    x = make_images(model, 2)
    t = torch.tensor([[1, 3], [2, 6]])
    raw = explain_on(backend, model, x, "agcam", must_serve=MUST_SERVE, target=t)
    assert raw.options["normalize"] is None and raw.options["upsample"] is None
    flat = raw.maps.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    mm = vx.explain(model, x, method="agcam", target=t, backend=backend, normalize="minmax").maps
    torch.testing.assert_close(mm, ((flat - lo) / (hi - lo + 1e-12)).view_as(raw.maps), atol=0, rtol=0)
    up = vx.explain(model, x, method="agcam", target=t, backend=backend, upsample=(24, 40)).maps
    ref_up = F.interpolate(raw.maps, size=(24, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, ref_up, atol=0, rtol=0)
    both = vx.explain(model, x, method="agcam", target=t, backend=backend, upsample=(24, 40),
                      normalize="minmax").maps
    f = ref_up.flatten(-2)
    expected = ((f - f.amin(-1, keepdim=True)) / (f.amax(-1, keepdim=True) - f.amin(-1, keepdim=True) + 1e-12))
    torch.testing.assert_close(both, expected.view_as(ref_up), atol=0, rtol=0)
    # the order matters: min-max first, then the resize, is not the same map
    assert not torch.allclose(both, F.interpolate(mm, size=(24, 40), mode="bilinear", align_corners=False),
                              atol=1e-3)
    single = vx.explain(model, x, method="agcam", target=t[:, 0], backend=backend, upsample=16,
                        normalize="minmax").maps
    assert single.shape == (2, 16, 16)


def test_normalize_and_upsample_validation():
    model = make_vit("nonsquare")
    x = make_images(model, 2)
    for bad in (dict(normalize="max"), dict(normalize=True), dict(upsample=0), dict(upsample=(16,)),
                dict(upsample="224"), dict(upsample=True)):
        with pytest.raises(ValueError):
            vx.explain(model, x, method="agcam", **bad)
