"""vx.overlay: maps drawn on the original images at their own size (on the region the model saw), batched, with an
optional colour bar; the callers that share its drawing (vitx render, the service's PNG, the demo)."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vitx_fast as vx
from vitx_fast.imaging import blend, colormap, model_view
from vitx_fast.models.demo import load_demo_model


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


def picture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_sizes_follow_the_originals(demo, tmp_path):
    pics = [picture(50, 90), picture(120, 64, 1), picture(64, 64, 2)]
    path = tmp_path / "a.png"
    Image.fromarray(pics[0]).save(path)
    inputs = [path, Image.fromarray(pics[1]), torch.from_numpy(pics[2]).permute(2, 0, 1)]
    exp = vx.explain(demo, inputs, method="gae")
    out = vx.overlay(inputs, exp, model=demo)
    assert [o.size for o in out] == [(90, 50), (64, 120), (64, 64)]
    assert all(isinstance(o, Image.Image) and o.mode == "RGB" for o in out)
    assert [o.size for o in vx.overlay(inputs, exp.maps.numpy())] == [(90, 50), (64, 120), (64, 64)]
    one = vx.overlay(pics[1], exp.maps[1])  # one image, one (h, w) map
    assert len(one) == 1 and one[0].size == (64, 120)
    batch = vx.overlay(np.stack([pics[2]] * 2), exp.maps[[2, 2]])
    assert len(batch) == 2 and batch[0].size == (64, 64)


def test_several_targets_per_image(demo):
    pics = [picture(40, 60), picture(70, 50, 1)]
    exp = vx.explain(demo, pics, method="reciprocam", target=[[1, 2, 3], [4, 5, 6]])
    out = vx.overlay(pics, exp.maps)
    assert len(out) == 2 and all(len(row) == 3 for row in out)
    assert out[0][0].size == (60, 40) and out[1][2].size == (50, 70)
    assert np.asarray(out[0][0]).tobytes() != np.asarray(out[0][1]).tobytes()


def test_colorbar_widens_the_image(demo):
    img = picture(80, 100)
    m = torch.rand(8, 8)
    plain = vx.overlay(img, m)[0]
    bar = vx.overlay(img, m, colorbar=True, cmap="viridis")[0]
    assert bar.height == plain.height == 80 and bar.width > plain.width == 100
    assert np.array_equal(np.asarray(bar)[:, :100], np.asarray(vx.overlay(img, m, cmap="viridis")[0]))


def test_drawing(demo):
    img = picture(30, 40)
    m = torch.arange(12.0).view(3, 4)
    assert np.array_equal(blend(img, m, alpha=0.0), img)
    full = blend(img, m, alpha=1.0, cmap="gray")
    assert full[0, 0].tolist() == [0, 0, 0] and full[-1, -1].tolist() == [255, 255, 255]
    assert np.array_equal(np.asarray(vx.overlay(img, m, alpha=1.0, cmap="gray")[0]), full)
    assert colormap(np.array([[0.0, 1.0]]), "gray").tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_the_map_covers_the_region_the_model_saw():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1,
                              num_classes=3)  # pretrained_cfg: crop_pct 0.9, centre crop
    cfg = vx.imaging.data_config(model)
    img = picture(100, 200)
    x0, y0, x1, y1 = model_view(200, 100, cfg)
    assert 0 < x0 < x1 < 200 and y0 > 0 and y1 < 100  # the centre crop of the shorter side, less 10 %
    out = np.asarray(vx.overlay(img, torch.rand(2, 2), model=model)[0])
    assert out.shape == img.shape
    assert np.array_equal(out[:, : int(x0)], img[:, : int(x0)]) and np.array_equal(out[:, int(x1) + 1:],
                                                                                   img[:, int(x1) + 1:])
    inside = out[int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1]
    assert not np.array_equal(inside, img[int(y0) + 1:int(y1) - 1, int(x0) + 1:int(x1) - 1])
    whole = np.asarray(vx.overlay(img, torch.rand(2, 2))[0])  # no model: the whole image
    assert not np.array_equal(whole[:, :5], img[:, :5])


def test_normalised_tensor_is_denormalised(demo):
    img = picture(64, 64)  # the demo model's size: its view of the image is the image itself
    x = vx.preprocess(demo, img)
    shown = np.asarray(vx.overlay(x, torch.zeros(1, 8, 8), alpha=0.0, model=demo)[0])
    assert shown.shape == (64, 64, 3) and np.abs(shown.astype(int) - img.astype(int)).max() <= 1
    stretched = np.asarray(vx.overlay(x[0], torch.zeros(8, 8), alpha=0.0)[0])  # no model: stretched to 0..255
    assert stretched.min() == 0 and stretched.max() == 255


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(maps=torch.rand(3, 8, 8)), ValueError, r"for 2 image\(s\): expected \(2, h, w\)"),
    (dict(maps=torch.rand(8, 8)), ValueError, "one map"),
    (dict(maps=torch.rand(2, 8)), ValueError, "expected"),
    (dict(maps=[[0.0]]), TypeError, "maps must be"),
    (dict(maps=torch.rand(2, 8, 8), alpha=1.5), ValueError, "alpha"),
    (dict(maps=torch.rand(2, 8, 8), cmap="jetty"), ValueError, "unknown cmap 'jetty'"),
])
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        vx.overlay([picture(10, 10), picture(12, 12)], **kwargs)
    with pytest.raises(ValueError, match="empty list"):
        vx.overlay([], torch.rand(0, 8, 8))


def test_service_png_is_the_original_size(demo):
    import io
    import types

    from vitx_fast.serve.core import ServeConfig, ServingModel  # the replica's model itself: no Ray needed

    sm = ServingModel(ServeConfig(model="demo"))
    item = types.SimpleNamespace(original=Image.fromarray(picture(90, 120)))
    png = sm.overlay_png(item, {"maps_tensor": torch.rand(1, 8, 8)})
    assert Image.open(io.BytesIO(png)).size == (120, 90)
