"""T-TAME training loop: a short run lowers the loss; checkpoints every epoch; resume (after an epoch or in the middle
of one) reproduces the uninterrupted run bitwise; changed configurations and stale folders are refused; the data
forms (tensor, Dataset of (image, label), DataLoader, image folder) and the `train-tame` CLI subcommand."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from utils import make_images, make_vit

import vitx_fast as vx
from vitx_fast.methods.tame.train import FINAL_NAME, epoch_path


@pytest.fixture(scope="module")
def model():
    return make_vit("plain")


@pytest.fixture(scope="module")
def data(model):
    return make_images(model, 24, seed=11)


def _state(ex):
    return {k: v.clone() for k, v in ex.attn_mech.state_dict().items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max {(a[k].double() - b[k].double()).abs().max():.3e})"


def test_short_run_lowers_loss(model):
    x = make_images(model, 64, seed=5)
    before = torch.get_rng_state()
    ex = vx.train_tame(model, x, epochs=5, batch_size=16, lr=1e-2, progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    losses = [h["loss"] for h in ex.info["history"]]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.3
    assert ex.info["history"][-1]["acc"] > ex.info["history"][0]["acc"]
    assert not ex.training
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_resume_after_epoch_equals_uninterrupted(model, data, tmp_path):
    full = vx.train_tame(model, data, epochs=3, batch_size=8, out=tmp_path / "a", progress=False)
    assert [epoch_path(tmp_path / "a", e).is_file() for e in (1, 2, 3)] == [True] * 3
    assert (tmp_path / "a" / FINAL_NAME).is_file()

    class Stop(Exception):
        pass

    def stop_after_first(epoch, stats):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        vx.train_tame(model, data, epochs=3, batch_size=8, out=tmp_path / "b", progress=False,
                      on_epoch_end=stop_after_first)
    assert epoch_path(tmp_path / "b", 1).is_file() and not epoch_path(tmp_path / "b", 2).exists()
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed = vx.train_tame(model, data, epochs=3, batch_size=8, out=tmp_path / "b", resume=True, progress=False)
    _assert_same(_state(full), _state(resumed))
    assert [h["loss"] for h in full.info["history"]] == [h["loss"] for h in resumed.info["history"]]
    # the final files load to the same explainer
    _assert_same(_state(vx.load_tame(tmp_path / "a" / FINAL_NAME)), _state(vx.load_tame(tmp_path / "b" / FINAL_NAME)))


class _Flaky(torch.utils.data.Dataset):
    """(image, label) pairs; raises once at a chosen item to simulate a crash in the middle of an epoch."""

    def __init__(self, images, fail_at=None):
        self.images, self.fail_at, self.calls = images, fail_at, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.images[i], 0


def test_resume_mid_epoch_equals_uninterrupted(model, data, tmp_path):
    full = vx.train_tame(model, _Flaky(data), epochs=2, batch_size=8, out=tmp_path / "a", progress=False)
    flaky = _Flaky(data, fail_at=24 + 13)  # second epoch, second batch
    with pytest.raises(KeyboardInterrupt):
        vx.train_tame(model, flaky, epochs=2, batch_size=8, out=tmp_path / "b", progress=False)
    assert epoch_path(tmp_path / "b", 1).is_file() and not epoch_path(tmp_path / "b", 2).exists()
    assert not list((tmp_path / "b").glob(".*tmp*"))  # no half-written files
    resumed = vx.train_tame(model, _Flaky(data), epochs=2, batch_size=8, out=tmp_path / "b", resume=True,
                            progress=False)
    _assert_same(_state(full), _state(resumed))


def test_resume_refuses_changed_config_and_stale_folder(model, data, tmp_path):
    vx.train_tame(model, data, epochs=2, batch_size=8, out=tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        vx.train_tame(model, data, epochs=2, batch_size=8, out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="configuration changed.*lr"):
        vx.train_tame(model, data, epochs=2, batch_size=8, lr=5e-3, out=tmp_path, resume=True, progress=False)
    other = make_vit("plain", seed=9)
    with pytest.raises(ValueError, match="weights differ"):
        vx.train_tame(other, data, epochs=2, batch_size=8, out=tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="needs the checkpoint folder"):
        vx.train_tame(model, data, resume=True)


def test_checkpoint_records_identity_and_layers(model, data, tmp_path):
    ex = vx.train_tame(model, data, epochs=1, batch_size=12, layers=[0, -1], out=tmp_path, progress=False)
    assert ex.layers == [0, 2]
    loaded = vx.load_tame(tmp_path / FINAL_NAME, model=model)
    assert loaded.layers == [0, 2] and loaded.grid == (4, 4) and loaded.num_classes == 7 and loaded.dims == [32, 32]
    assert loaded.backbone["arch"]["depth"] == 3 and len(loaded.backbone["weights_sha256"]) == 64
    assert loaded.info["training"]["batch_size"] == 12 and len(loaded.info["history"]) == 1
    e = vx.explain(model, make_images(model, 2), method="tame", explainer=str(tmp_path / FINAL_NAME))
    assert e.maps.shape == (2, 4, 4)


def test_dataset_dataloader_and_folder(model, data, tmp_path):
    ds = _Flaky(data)
    a = vx.train_tame(model, ds, epochs=1, batch_size=8, progress=False)
    b = vx.train_tame(model, ds, epochs=1, batch_size=8, progress=False)
    _assert_same(_state(a), _state(b))  # seeded shuffle
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True)
    c = vx.train_tame(model, loader, epochs=1, progress=False)
    assert c.info["training"]["steps_per_epoch"] == 4
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8))
        img.save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    d = vx.train_tame(model, tmp_path / "imgs", epochs=1, batch_size=2, progress=False, mean=(0.5,) * 3,
                      std=(0.25,) * 3)
    assert d.info["training"]["steps_per_epoch"] == 3 and "5 images" in d.info["training"]["data"]
    with pytest.raises(ValueError, match="neither 'bench' nor an image folder"):
        vx.train_tame(model, tmp_path / "missing", epochs=1, progress=False)
    with pytest.raises(TypeError, match="unsupported training data"):
        vx.train_tame(model, [1, 2, 3], epochs=1, progress=False)


def test_cli_subcommand(model, data, tmp_path, monkeypatch, capsys):
    import vitx_fast.cli._common as cli
    from vitx_fast.cli.train_tame import add_parser

    monkeypatch.setattr(cli, "load_model", lambda name, checkpoint=None: (model, {"mean": None, "std": None}))
    monkeypatch.setattr("vitx_fast.methods.tame.train.resolve_data",
                        lambda model_, data_, **kw: (data, f"tensor{tuple(data.shape)}"))
    parser = argparse.ArgumentParser(prog="vitx")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-tame", "--model", "tiny", "--data", "bench", "--epochs", "2", "--batch-size", "8",
                              "--out", str(tmp_path), "--quiet"])
    assert args.func(args) == 0
    assert "tame.safetensors" in capsys.readouterr().out
    args = parser.parse_args(["train-tame", "--model", "tiny", "--epochs", "2", "--batch-size", "8",
                              "--out", str(tmp_path), "--quiet"])
    with pytest.raises(cli.CLIError, match="--resume|resume=True"):
        args.func(args)
    args = parser.parse_args(["train-tame", "--model", "tiny", "--epochs", "2", "--batch-size", "8",
                              "--out", str(tmp_path), "--quiet", "--resume"])
    assert args.func(args) == 0
