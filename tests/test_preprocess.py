"""vx.preprocess and the inputs vx.explain takes besides a float tensor: PIL images, paths, uint8 arrays / tensors,
lists of them; the data config of timm and Hugging Face models; the errors for what cannot be used."""
import os

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from utils import make_vit

import vitx_fast as vx
from vitx_fast.data.images import ImageDecodeError, read_image
from vitx_fast.imaging import data_config
from vitx_fast.models.demo import load_demo_model


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


def pictures(n=3, seed=0):
    """RGB uint8 pictures of different sizes, none the demo model's 64 x 64."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (50 + 13 * i, 90 - 7 * i, 3), dtype=np.uint8) for i in range(n)]


def by_hand(model, pil_images):
    """timm's own eval transform of the model's pretrained_cfg, applied without vitx_fast."""
    tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    return torch.stack([tf(im) for im in pil_images])


def test_explain_on_paths_and_pil_equals_the_preprocessed_tensor(demo, tmp_path):
    pics = pictures()
    paths = []
    for i, a in enumerate(pics):
        paths.append(tmp_path / f"p{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(a).save(paths[-1])
    decoded = [read_image(p) for p in paths]
    x = by_hand(demo, decoded)
    assert torch.equal(vx.preprocess(demo, paths), x)
    assert torch.equal(vx.preprocess(demo, [str(p) for p in paths]), x)
    want = vx.explain(demo, x, method="gae")
    for images in (paths, decoded, [str(paths[0]), decoded[1], np.asarray(decoded[2])]):
        got = vx.explain(demo, images, method="gae")
        assert torch.equal(got.maps, want.maps) and torch.equal(got.targets, want.targets)
    one = vx.explain(demo, decoded[1], method="rollout")  # one image: a batch of one
    assert one.maps.shape == (1, 8, 8)
    assert torch.equal(one.maps, vx.explain(demo, x[1:2], method="rollout").maps)


def test_uint8_arrays_and_tensors(demo):
    pics = [np.random.default_rng(i).integers(0, 256, (70, 70, 3), dtype=np.uint8) for i in range(2)]
    want = by_hand(demo, [Image.fromarray(a) for a in pics])
    nhwc = np.stack(pics)
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    for images in (nhwc, list(nhwc), nchw, [nchw[0], nchw[1]], [pics[0], nchw[1:]]):
        x = vx.preprocess(demo, images)
        assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
        assert torch.equal(x, want)
    assert vx.preprocess(demo, pics[0]).shape == (1, 3, 64, 64)
    assert vx.preprocess(demo, nchw[0]).shape == (1, 3, 64, 64)
    got = vx.explain(demo, nchw, method="reciprocam", target="all")
    assert got.maps.shape == (2, 10, 8, 8)
    assert torch.equal(got.maps, vx.explain(demo, want, method="reciprocam", target="all").maps)


def test_float_tensors_are_passed_unchanged(demo):
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(vx.explain(demo, x, method="rollout").maps, vx.explain(demo, x.clone(), method="rollout").maps)


def test_model_dtype_and_fixed_input_size():
    model = make_vit("nonsquare")  # float64, 24 x 40, no pretrained_cfg: timm's defaults would say 224 x 224
    x = vx.preprocess(model, pictures(2))
    assert x.shape == (2, 3, 24, 40) and x.dtype == torch.float64
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 24, 40) and cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    assert vx.explain(model, pictures(2), method="gae").maps.shape == (2, 3, 5)


def test_config_overrides(demo):
    a = np.random.default_rng(5).integers(0, 256, (90, 90, 3), dtype=np.uint8)  # square: the crop keeps it all
    x = vx.preprocess(demo, a, config={"mean": (0, 0, 0), "std": (1, 1, 1)})
    plain = torch.tensor(np.asarray(Image.fromarray(a).resize((64, 64), Image.BILINEAR))).permute(2, 0, 1) / 255
    assert x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(x[0], plain.float(), atol=1.01 / 255, rtol=0)
    assert vx.preprocess(demo, a, config={"input_size": 48}).shape == (1, 3, 48, 48)
    assert vx.preprocess(demo, a, config={"input_size": (32, 40), "crop_pct": 1.0, "crop_mode": "squash"}).shape \
        == (1, 3, 32, 40)
    from vitx_fast.models.demo import demo_data_config

    assert torch.equal(vx.preprocess(demo, a, config=demo_data_config()), vx.preprocess(demo, a))  # load_model's cfg
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['meen'\]"):
        vx.preprocess(demo, a, config={"meen": (0, 0, 0)})
    with pytest.raises(ValueError, match="std must be 3 numbers > 0"):
        vx.preprocess(demo, a, config={"std": (0, 1, 1)})
    with pytest.raises(ValueError, match="crop_mode must be one of"):
        vx.preprocess(demo, a, config={"crop_mode": "middle"})
    with pytest.raises(TypeError, match="config must be a dict"):
        vx.preprocess(demo, a, config=[1, 2])


@pytest.mark.parametrize("images,error,match", [
    (np.zeros((8, 8, 3), np.float32), TypeError, "uint8 pixels.*torch tensor"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, "4 channels"),
    (np.zeros((8, 8), np.uint8), ValueError, r"expected uint8 \(H, W, 3\)"),
    (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty batch"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int64), TypeError, "float tensor"),
    (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), ValueError, "1 channels"),
    (torch.zeros(3, 8, 8), TypeError, "already preprocessed"),
    ([], ValueError, "empty list"),
    ([np.zeros((8, 8, 3), np.uint8), torch.zeros(3, 8, 8)], TypeError, r"images\[1\].*inside a list"),
    ([[np.zeros((8, 8, 3), np.uint8)]], TypeError, "nested list"),
    ({"image": 1}, TypeError, "expected a PIL image, a path"),
    (b"\x89PNG", TypeError, "a bytes"),
])
def test_errors(demo, images, error, match):
    with pytest.raises(error, match=match):
        vx.preprocess(demo, images)


def test_explain_refuses_the_same(demo):
    with pytest.raises(TypeError, match="uint8 pixels"):
        vx.explain(demo, np.zeros((64, 64, 3), np.float64), method="rollout")
    with pytest.raises(ValueError, match="empty list"):
        vx.explain(demo, [], method="rollout")


def test_paths_that_are_not_images(demo, tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read"):
        vx.preprocess(demo, tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageDecodeError, match="not an image"):
        vx.explain(demo, str(tmp_path / "notes.png"), method="rollout")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.png")  # refused before opening: no wait for a writer
        with pytest.raises(ImageDecodeError, match="FIFO"):
            vx.preprocess(demo, [tmp_path / "pipe.png"])


def test_pil_modes_are_converted(demo):
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 0))  # fully transparent: composited on white
    grey = Image.new("L", (30, 20), 255)
    x = vx.preprocess(demo, [rgba, grey], config={"mean": (0, 0, 0), "std": (1, 1, 1)})
    assert torch.allclose(x, torch.ones_like(x))


# ------------------------------------------------------------------------------------------- Hugging Face
def _hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    return transformers, transformers.ViTForImageClassification(cfg).eval()


def test_hf_defaults_and_image_processor():
    transformers, hm = _hf_vit()
    cfg = data_config(hm)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.5, 0.5) and cfg["crop_mode"] == "squash"
    pics = pictures(2)
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    pixel_values = proc(images=pics, return_tensors="pt").pixel_values
    for config in (None, proc):
        x = vx.preprocess(hm, pics, config=config)
        assert x.shape == (2, 3, 32, 32)
        assert (x - pixel_values).abs().max() <= 1.01 / 255 / 0.5  # at most one pixel level (the resize's rounding)
    bit = transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    got = vx.preprocess(hm, pics, config=bit)
    assert (got - bit(images=pics, return_tensors="pt").pixel_values).abs().max() <= 1.01 / 255 / min(bit.image_std)
    assert data_config(hm, bit)["crop_pct"] == pytest.approx(0.8)
    e = vx.explain(hm, pics, method="gae")
    assert torch.equal(e.maps, vx.explain(hm, vx.preprocess(hm, pics), method="gae").maps)
