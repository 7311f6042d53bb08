"""The public API: targets, errors on bad input, dispatch, post-processing."""
import os

import numpy as np
import pytest
import torch
from utils import make_images, make_vit

import vitx_fast as vx


@pytest.fixture(scope="module")
def model():
    return make_vit("plain")


def test_list_methods_has_all():
    assert {"reciprocam", "agcam", "daam", "rollout", "lrp", "gae"} <= set(vx.list_methods())


@pytest.mark.parametrize("images,match", [
    (torch.randn(3, 32, 32, dtype=torch.float64), "add a batch dimension"),
    (torch.randn(1, 1, 32, 32, dtype=torch.float64), "1 channels but the model expects 3"),
    (torch.randn(1, 3, 48, 48, dtype=torch.float64), "does not match the model's input size"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.int64), "float tensor"),
    (torch.zeros(0, 3, 32, 32, dtype=torch.float64), "empty batch"),
])
def test_bad_images(model, images, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vx.explain(model, images, method="rollout")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_rejected(model, bad):
    x = make_images(model, 2)
    x[1, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        vx.explain(model, x, method="rollout")


def test_unknown_method_and_option(model):
    x = make_images(model, 1)
    with pytest.raises(ValueError, match="unknown method 'gradcam'.*available methods"):
        vx.explain(model, x, method="gradcam")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['head_fuson'\]"):
        vx.explain(model, x, method="rollout", head_fuson="max")
    with pytest.raises(ValueError, match="head_fusion='median' is not one of"):
        vx.explain(model, x, method="rollout", head_fusion="median")


@pytest.mark.parametrize("target,match", [
    (7, "class index 7 out of range for a model with 7 classes"),
    (-1, "class index -1 out of range"),
    ([1, 2, 3], "3 entries but the batch has 2"),
    ("top", "target must be"),
    (torch.tensor([0.5, 1.0]), "integer class indices"),
])
def test_bad_targets(model, target, match):
    with pytest.raises((ValueError, TypeError), match=match):
        vx.explain(model, make_images(model, 2), method="rollout", target=target)


def test_target_forms(model):
    x = make_images(model, 2)
    logits = model(x)
    e = vx.explain(model, x, method="rollout")
    assert torch.equal(e.targets, logits.argmax(-1))
    torch.testing.assert_close(e.logits, logits)
    assert vx.explain(model, x, method="rollout", target=3).targets.tolist() == [3, 3]
    assert vx.explain(model, x, method="rollout", target=[1, 4]).targets.tolist() == [1, 4]
    e2 = vx.explain(model, x, method="rollout", target=torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert e2.maps.shape == (2, 3, 4, 4) and e2.targets.shape == (2, 3)
    torch.testing.assert_close(e2.maps[:, 1], e.maps)  # class-agnostic: the same map for every class
    with pytest.raises(ValueError, match="target='all' needs a method"):
        vx.explain(model, x, method="agcam", target="all")


def test_headless_model():
    model = make_vit("plain", num_classes=0)
    x = make_images(model, 2)
    e = vx.explain(model, x, method="rollout")
    assert e.logits is None and e.targets.tolist() == [-1, -1] and e.maps.shape == (2, 4, 4)
    for method in ("reciprocam", "agcam", "gae", "lrp"):
        with pytest.raises(vx.UnsupportedModelError, match="headless"):
            vx.explain(model, x, method=method)
    with pytest.raises(ValueError, match="no classification head"):
        vx.explain(model, x, method="rollout", target=1)


def test_backend_selection(model, monkeypatch):
    x = make_images(model, 1)
    assert vx.explain(model, x, method="rollout").backend == "fused"  # the fastest that can serve
    assert vx.explain(model, x, method="rollout", backend="reference").backend == "reference"
    with pytest.raises(ValueError, match="unknown backend 'cuda9'"):
        vx.explain(model, x, method="rollout", backend="cuda9")
    with vx.set_backend("reference"):
        assert vx.explain(model, x, method="rollout").backend == "reference"
    monkeypatch.setenv("VITX_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        vx.explain(model, x, method="rollout")


def test_normalize_and_upsample():
    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]], dtype=torch.float64)
    n = vx.normalize(m)
    torch.testing.assert_close(n, m / (4.0 + 1e-12))
    assert torch.equal(vx.normalize(torch.ones(1, 3, 3)), torch.zeros(1, 3, 3))
    up = vx.upsample(m, 6)
    assert up.shape == (1, 6, 6)
    torch.testing.assert_close(up, torch.nn.functional.interpolate(m[None], size=(6, 6), mode="bilinear",
                                                                  align_corners=False)[0])
    with pytest.raises(ValueError, match="unknown upsample mode"):
        vx.upsample(m, 4, mode="lanczos")


@pytest.mark.parametrize("src,dst", [((4, 4), (32, 32)), ((3, 5), (24, 40)), ((14, 14), (224, 224)), ((8, 8), (5, 7))])
def test_bicubic_pil_matches_pillow(src, dst):
    from PIL import Image

    rng = np.random.default_rng(0)
    a = rng.random(src).astype(np.float32)
    pil = np.asarray(Image.fromarray(a, mode="F").resize((dst[1], dst[0]), Image.BICUBIC))
    ours = vx.upsample(torch.from_numpy(a).double()[None], dst, mode="bicubic_pil")[0].numpy()
    np.testing.assert_allclose(ours, pil, atol=2e-5)
    assert os.environ.get("VITX_FAST_BACKEND") is None
