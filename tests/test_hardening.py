"""Regression tests for bad input that used to crash, hang or allocate without bound: each gets a clear ValueError /
TypeError (or the module's own error class) naming the problem, before any heavy allocation."""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from utils import make_images, make_vit

import vitx_fast as vx
from vitx_fast.data.images import ImageDecodeError, read_image
from vitx_fast.methods.daam.memory_bank import MAX_CLASSES, MemoryBank
from vitx_fast.methods.tame import checkpoint as ckpt
from vitx_fast.models.loading import ModelLoadError, load_checkpoint


@pytest.mark.parametrize("target, exc, match", [
    (2**63, ValueError, "out of range"), (2**70, ValueError, "out of range"), ([2**70, 1], (TypeError, ValueError),
                                                                               "class indices"),
    ([[1, 2], [3]], (TypeError, ValueError), "class indices"), (["a", "b"], (TypeError, ValueError), "class"),
    ([1.5, 2.0], TypeError, "integer class indices"), (-1, ValueError, "out of range"), ("top0", ValueError, "topK"),
    ("top99", ValueError, "asks for 99 classes"), (True, TypeError, "bool"),
])
def test_targets_out_of_reach(target, exc, match):
    model = make_vit("plain")
    with pytest.raises(exc, match=match):
        vx.explain(model, make_images(model, 2), method="rollout", target=target)


@pytest.fixture
def tame_file(tmp_path):
    model = make_vit("plain", dtype=torch.float32)
    ex = vx.methods.tame.TAMEExplainer.for_model(model, seed=0)
    return ckpt.save_explainer(tmp_path / "tame.safetensors", ex)


def _rewrite_meta(path, out, **changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[ckpt.META_KEY])
    meta.update(changes)
    save_file(load_file(str(path)), str(out), metadata={ckpt.META_KEY: json.dumps(meta)})
    return out


@pytest.mark.parametrize("changes, match", [
    (dict(dims=[30000] * 3), "implies"), (dict(dims=[2**20] * 3), "must hold ints in"),
    (dict(num_classes=2**40), "must hold ints in"), (dict(dims=[-5] * 3), "must hold ints in"),
    (dict(dims=["a"] * 3), "must hold ints in"), (dict(layers=[99, 100, 101]), "do not exist"),
    (dict(layers=[1, 1, 2]), "repeats"), (dict(grid=[0, 4]), "must hold ints in"),
    (dict(num_prefix_tokens=-1), "must hold ints in"),
])
def test_crafted_tame_metadata_is_refused_before_building(tame_file, tmp_path, changes, match):
    bad = _rewrite_meta(tame_file, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(ckpt.TameCheckpointError, match=match):
        vx.load_tame(bad)


def test_tame_integer_weights_refused(tame_file, tmp_path):
    from safetensors import safe_open

    with safe_open(str(tame_file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tame_file))
    tensors["attn_mech.fuser.weight"] = tensors["attn_mech.fuser.weight"].to(torch.int8)
    save_file(tensors, str(tmp_path / "int8.safetensors"), metadata=meta)
    with pytest.raises(ckpt.TameCheckpointError, match="int8"):
        vx.load_tame(tmp_path / "int8.safetensors")


def test_memory_bank_labels_bounded():
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match=f"labels must be < {MAX_CLASSES}"):
        MemoryBank(f, torch.tensor([0, 1, 2, 2**40]))
    with pytest.raises(ValueError, match="NaN"):
        MemoryBank(f.masked_fill(f > 0.5, float("nan")), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16, torch.bfloat16])
def test_model_checkpoint_dtypes_not_cast_silently(tmp_path, dtype):
    model = make_vit("plain", dtype=torch.float32)
    state = {k: (v * 10).to(dtype) for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match=str(dtype).removeprefix("torch.")):
        load_checkpoint(make_vit("plain", dtype=torch.float32), str(tmp_path / "w.safetensors"))


def test_model_checkpoint_nan_refused(tmp_path):
    model = make_vit("plain", dtype=torch.float32)
    state = dict(model.state_dict())
    state["head.weight"] = state["head.weight"].clone().fill_(float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelLoadError, match="NaN"):
        load_checkpoint(model, str(tmp_path / "nan.safetensors"))


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(ImageDecodeError, read_image, fifo)))
    t.start()
    t.join(10)
    assert done and "FIFO" in str(done[0].value)


def test_cli_version(capsys):
    from vitx_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and vx.__version__ in capsys.readouterr().out
