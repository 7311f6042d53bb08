"""T-TAME checkpoints: round trip; malformed files raise TameCheckpointError naming the problem; an explainer applied
to a different backbone (architecture or weights) is refused at load time and at explain time; the shipped one."""
from __future__ import annotations

import json

import pytest
import torch
from helpers_tame import random_explainer
from safetensors.torch import load_file, save_file
from utils import make_images, make_vit

import vitx_fast as vx
from vitx_fast.engine.adapter import UnsupportedModelError
from vitx_fast.methods.tame import checkpoint as ckpt
from vitx_fast.methods.tame.checkpoint import BackboneMismatchError, TameCheckpointError


@pytest.fixture()
def saved(tmp_path):
    model = make_vit("plain")
    ex = random_explainer(model, seed=1)
    path = ckpt.save_explainer(tmp_path / "ex.safetensors", ex)
    return model, ex, path


def _rewrite(path, out, tensors=None, meta=None, raw_meta=None):
    t = load_file(str(path)) if tensors is None else tensors
    md = raw_meta if raw_meta is not None else {ckpt.META_KEY: json.dumps(meta)}
    save_file(t, str(out), metadata=md)
    return out


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[ckpt.META_KEY])


def test_round_trip(saved):
    model, ex, path = saved
    loaded = vx.load_tame(path, model=model)
    assert not loaded.training and loaded.layers == ex.layers and loaded.grid == ex.grid
    assert loaded.attn_mech.fuser.weight.dtype == torch.float64
    for k, v in ex.attn_mech.state_dict().items():
        assert torch.equal(loaded.attn_mech.state_dict()[k], v)
    images = make_images(model, 2)
    a = vx.explain(model, images, method="tame", explainer=ex)
    b = vx.explain(model, images, method="tame", explainer=path)
    assert torch.equal(a.maps, b.maps)
    assert not list(path.parent.glob(".*tmp*"))


def test_malformed_files(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(FileNotFoundError, match="not found"):
        vx.load_tame(tmp_path / "nope.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(TameCheckpointError, match="not a readable safetensors"):
        vx.load_tame(tmp_path / "garbage.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TameCheckpointError, match="not a readable safetensors"):
        vx.load_tame(tmp_path / "cut.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(TameCheckpointError, match="no 'vitx_tame' metadata"):
        vx.load_tame(bare)
    with pytest.raises(TameCheckpointError, match="not valid JSON"):
        vx.load_tame(_rewrite(path, tmp_path / "j.safetensors", raw_meta={ckpt.META_KEY: "{oops"}))
    meta = _meta(path)
    with pytest.raises(TameCheckpointError, match="format"):
        vx.load_tame(_rewrite(path, tmp_path / "f.safetensors", meta={**meta, "format": "other"}))
    with pytest.raises(TameCheckpointError, match="field 'layers'"):
        vx.load_tame(_rewrite(path, tmp_path / "l.safetensors", meta={k: v for k, v in meta.items() if k != "layers"}))
    with pytest.raises(TameCheckpointError, match="newer"):
        vx.load_tame(_rewrite(path, tmp_path / "v.safetensors", meta={**meta, "version": 99}))
    with pytest.raises(TameCheckpointError, match="inconsistent"):
        vx.load_tame(_rewrite(path, tmp_path / "i.safetensors", meta={**meta, "dims": [32, 32]}))
    tensors = load_file(str(path))
    missing = {k: v for k, v in tensors.items() if k != "attn_mech.fuser.bias"}
    with pytest.raises(TameCheckpointError, match="missing \\['fuser.bias'\\]"):
        vx.load_tame(_rewrite(path, tmp_path / "m.safetensors", tensors=missing, meta=meta))
    with pytest.raises(TameCheckpointError, match="attn_mech.fuser.weight has shape"):
        vx.load_tame(_rewrite(path, tmp_path / "s.safetensors", meta={**meta, "num_classes": 9}))
    nan = dict(tensors)
    nan["attn_mech.convs.0.weight"] = nan["attn_mech.convs.0.weight"].clone()
    nan["attn_mech.convs.0.weight"][0, 0] = float("nan")
    with pytest.raises(TameCheckpointError, match="NaN"):
        vx.load_tame(_rewrite(path, tmp_path / "n.safetensors", tensors=nan, meta=meta))
    # a malformed explicit path is reported as such by explain
    model = make_vit("plain")
    with pytest.raises(TameCheckpointError):
        vx.explain(model, make_images(model, 1), method="tame", explainer=str(tmp_path / "garbage.safetensors"))


def test_mismatched_backbones(saved):
    model, ex, path = saved
    other_arch = make_vit("deep_1head")
    with pytest.raises(BackboneMismatchError, match="different backbone architecture.*embed_dim: trained 32, model 24"):
        vx.load_tame(path, model=other_arch)
    with pytest.raises(UnsupportedModelError, match="tame cannot explain this model.*architecture"):
        vx.explain(other_arch, make_images(other_arch, 1), method="tame", explainer=ex)
    registers = make_vit("registers")  # same widths, other token layout
    with pytest.raises(BackboneMismatchError, match="num_prefix_tokens"):
        vx.load_tame(path, model=registers)
    other_weights = make_vit("plain", seed=5)
    with pytest.raises(BackboneMismatchError, match="weights differ"):
        vx.load_tame(path, model=other_weights)
    with pytest.raises(UnsupportedModelError, match="weights differ"):
        vx.explain(other_weights, make_images(model, 1), method="tame", explainer=ex)
    e = vx.explain(other_weights, make_images(model, 1), method="tame", explainer=ex, verify_weights=False)
    assert e.maps.shape == (1, 4, 4)
    # float32 copies of the same weights are the same backbone; an in-place edit is not (the hash cache notices)
    vx.load_tame(path, model=make_vit("plain", dtype=torch.float32))
    tweaked = make_vit("plain")
    vx.load_tame(path, model=tweaked)
    with torch.no_grad():
        tweaked.head.bias.add_(1e-3)
    with pytest.raises(BackboneMismatchError, match="weights differ"):
        vx.load_tame(path, model=tweaked)


def test_shipped_missing_is_a_refusal(monkeypatch, tmp_path):
    monkeypatch.setattr(ckpt, "SHIPPED", tmp_path / "none.safetensors")
    model = make_vit("plain")
    with pytest.raises(UnsupportedModelError, match="shipped T-TAME explainer is missing"):
        vx.explain(model, make_images(model, 1), method="tame")


@pytest.mark.skipif(not ckpt.SHIPPED.is_file(), reason="the shipped explainer is not built yet")
def test_shipped_explainer():
    from vitx_fast.models.demo import load_demo_model

    ex = vx.load_tame()
    assert ckpt.SHIPPED.stat().st_size < 1_000_000
    demo = load_demo_model()
    vx.load_tame(model=demo)  # matches the bundled demo model
    size = demo.patch_embed.img_size
    images = torch.randn(2, 3, *size)
    for backend in ("reference", "fused"):
        e = vx.explain(demo, images, method="tame", backend=backend)
        assert e.maps.shape == (2, *demo.patch_embed.grid_size)
    a = vx.explain(demo, images, method="tame", target="all")
    assert a.maps.shape == (2, ex.num_classes, *demo.patch_embed.grid_size)
    with pytest.raises(UnsupportedModelError, match="different backbone"):
        tiny = make_vit("plain")
        vx.explain(tiny, make_images(tiny, 1), method="tame")
