"""Attention Rollout: the engine against the literal ports of jacobgil/vit-explain `rollout`
(tests/ports/vit_explain.py) and of Chefer's `Baselines.generate_rollout` (tests/ports/chefer.py)."""

import numpy as np
import pytest
import torch
from ports.chefer import chefer_rollout_baseline
from ports.vit_explain import vit_explain_rollout
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


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("fusion,ratio", [("mean", 0.0), ("max", 0.9), ("min", 0.5), ("mean", 0.9)])
def test_rollout_matches_vit_explain(layout, fusion, ratio):
    model = make_vit(layout)
    images = make_images(model, batch=3)
    exp = vx.explain(model, images, method="rollout", head_fusion=fusion, discard_ratio=ratio, renorm="jacobgil")
    h, w = model.patch_embed.grid_size
    assert exp.maps.shape == (3, h, w)
    for b in range(3):
        ref = vit_explain_rollout(model, images[b:b + 1], ratio, fusion).reshape(h, w)
        # the matrix chain is the reference: bit-for-bit up to matmul association
        torch.testing.assert_close(exp.maps[b], ref, rtol=1e-12, atol=1e-14)
    assert_structured(exp.maps)


@pytest.mark.parametrize("layout", ["plain", "registers", "nonsquare", "distilled"])
def test_default_equals_chefer_baseline_and_jacobgil_mean(layout):
    model = make_vit(layout)
    images = make_images(model, batch=2)
    exp = vx.explain(model, images, method="rollout")
    h, w = model.patch_embed.grid_size
    for b in range(2):
        torch.testing.assert_close(exp.maps[b].flatten(), chefer_rollout_baseline(model, images[b:b + 1])[0])
        torch.testing.assert_close(exp.maps[b].flatten(), vit_explain_rollout(model, images[b:b + 1], 0.0, "mean"))


def test_row_and_jacobgil_renorm_differ_for_max_fusion():
    model = make_vit("plain")
    images = make_images(model, batch=1)
    a = vx.explain(model, images, method="rollout", head_fusion="max", renorm="row").maps
    b = vx.explain(model, images, method="rollout", head_fusion="max", renorm="jacobgil").maps
    assert (vx.normalize(a) - vx.normalize(b)).abs().max() > 1e-3


def test_presets():
    model = make_vit("plain")
    images = make_images(model, batch=1)
    a = vx.explain(model, images, method="rollout", jacobgil_cli=True).maps[0].flatten()
    ref = vit_explain_rollout(model, images, 0.9, "max")
    torch.testing.assert_close(a, ref)
    np.testing.assert_allclose(vx.normalize(a.view(1, -1)).numpy(), vx.normalize(ref.view(1, -1)).numpy())


def test_fused_equals_unfused_and_float32():
    m64 = make_vit("registers")
    x = make_images(m64, batch=2)
    fused = make_vit("registers", fused=True)
    assert_maps_close(vx.explain(fused, x, method="rollout").maps, vx.explain(m64, x, method="rollout").maps, 1e-10)
    m32 = make_vit("registers", dtype=torch.float32)
    assert_maps_close(vx.explain(m32, x.float(), method="rollout").maps, vx.explain(m64, x, method="rollout").maps,
                      1e-5)


def test_bad_discard_ratio():
    model = make_vit("plain")
    with pytest.raises(ValueError, match="discard_ratio"):
        vx.explain(model, make_images(model, 1), method="rollout", discard_ratio=1.0)


# ----------------------------------------------------------------------------------------- layouts beyond LAYOUTS
EXTRA, _extra = EXTRA_LAYOUTS, extra_model_and_images


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name,base,kw,size", EXTRA, ids=[e[0] for e in EXTRA])
@pytest.mark.parametrize("fusion,ratio", [("mean", 0.0), ("max", 0.9), ("min", 0.5)])
def test_rollout_extra_layouts_match_vit_explain(name, base, kw, size, fusion, ratio, backend):
    model, x = _extra(base, kw, size, 3)
    h, w = vx.ViTAdapter(model).grid_for(*x.shape[-2:])
    exp = vx.explain(model, x, method="rollout", head_fusion=fusion, discard_ratio=ratio, renorm="jacobgil",
                     backend=backend)
    assert exp.maps.shape == (3, h, w) and exp.maps.dtype == torch.float64
    if ratio < 0.9:  # depth 1 with 90 % discarded can leave a CLS row of zeros
        assert_structured(exp.maps)
    for b in range(3):
        ref = vit_explain_rollout(model, x[b:b + 1], ratio, fusion).reshape(h, w)
        torch.testing.assert_close(exp.maps[b], ref, rtol=1e-10, atol=1e-14)
    one = vx.explain(model, x[2:], method="rollout", head_fusion=fusion, discard_ratio=ratio, renorm="jacobgil",
                     backend=backend)
    torch.testing.assert_close(one.maps[0], exp.maps[2], rtol=1e-10, atol=1e-14)
