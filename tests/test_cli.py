"""The `vitx` CLI end to end on a small timm model with a local checkpoint."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vitx_fast.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=5)
    path = tmp_path_factory.mktemp("ckpt") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (200, 240, 3), dtype=np.uint8)).save(folder / "b.jpg")
    return folder


def run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_explain_two_images_into_a_store(checkpoint, images, tmp_path, capsys):
    import vitx_fast as vx

    out = tmp_path / "out"
    code, stdout, err = run(["explain", images / "a.png", images / "b.jpg", "--model", "test_vit", "--checkpoint",
                             checkpoint, "--method", "rollout", "gae", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert "explained 2, skipped 0 (already done), failed 0 of 2" in stdout
    df = vx.read_results(out)
    assert sorted(df["image"]) == ["a.png", "a.png", "b.jpg", "b.jpg"]
    assert all(m.shape == (10, 10) for m in df["map"]) and np.ptp(df[df["method"] == "gae"]["map"].iloc[0]) > 0
    assert df["model_id"].str.startswith("test_vit@").all() and not list(out.rglob(".tmp*"))
    # resumable: a second run writes nothing and says so
    shards = sorted((out / "results").iterdir())
    code, stdout, _ = run(["explain", images, "--model", "test_vit", "--checkpoint", checkpoint, "--method", "rollout",
                           "--out", out, "--quiet"], capsys)
    assert code == 0 and "skipped 2 (already done)" in stdout and sorted((out / "results").iterdir()) == shards


def test_folder_with_corrupt_file(checkpoint, images, tmp_path, capsys):
    import vitx_fast as vx

    (images / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "out"
    code, stdout, err = run(["explain", images, "--model", "test_vit", "--checkpoint", checkpoint, "--method",
                             "rollout", "--out", out, "--quiet"], capsys)
    assert code == 1  # an image failed
    assert "failed broken.png: broken.png: not an image" in err
    assert sorted(vx.read_results(out)["image"]) == ["a.png", "b.jpg"]
    assert vx.read_errors(out)["image"].tolist() == ["broken.png"]
    assert "explained 2, skipped 0 (already done), failed 1 of 3" in stdout


@pytest.mark.parametrize("argv,match", [
    (["--model", "vit_nonexistent_xyz"], "unknown timm model 'vit_nonexistent_xyz'"),
    (["--model", "vit_small_patch16_224", "--checkpoint", "CKPT"], "does not fit the architecture"),
    (["--model", "test_vit", "--checkpoint", "missing.safetensors"], "checkpoint not found"),
    (["--method", "gradcam++"], "unknown method 'gradcam++'"),
])
def test_one_line_errors(argv, match, checkpoint, images, tmp_path, capsys):
    argv = [str(checkpoint) if a == "CKPT" else a for a in argv]
    code, _, err = run(["explain", images / "a.png", "--out", tmp_path / "o", *argv], capsys)
    assert code == 2
    assert match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unwritable_output(checkpoint, images, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(["explain", images / "a.png", "--model", "test_vit", "--checkpoint", checkpoint,
                        "--out", blocker / "sub"], capsys)
    assert code == 2 and "cannot write to result store" in err and len(err.strip().splitlines()) == 1


def test_info_lists_methods_and_backends(capsys):
    code, out, _ = run(["info"], capsys)
    assert code == 0
    for word in ("torch", "reference", "rollout", "method x backend"):
        assert word in out


@pytest.mark.skipif(shutil.which("vitx") is None and not shutil.which("vitx", path=sys.prefix + "/bin"),
                    reason="console script not installed")
def test_console_script():
    exe = shutil.which("vitx") or shutil.which("vitx", path=sys.prefix + "/bin")
    r = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "vitx-fast" in r.stdout


def test_target_out_of_range_is_one_line_error(checkpoint, images, tmp_path, capsys):
    code, _, err = run(["explain", images / "a.png", "--model", "test_vit", "--checkpoint", checkpoint, "--target",
                        "3,999", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "class index 999 out of range" in err and "Traceback" not in err
    assert not list((tmp_path / "o").rglob("part-*"))


def test_missing_path_reported_rest_explained(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["explain", images / "a.png", tmp_path / "nope.png", "--model", "test_vit",
                             "--checkpoint", checkpoint, "--method", "rollout", "--out", out, "--quiet"], capsys)
    assert code == 1 and "nope.png: no such file or folder" in err
    assert "explained 1, skipped 0 (already done), failed 1 of 2" in stdout


def test_image_where_every_method_refuses_is_not_marked_done(checkpoint, images, tmp_path, capsys, monkeypatch):
    import vitx_fast as vx

    def refuse(*a, **k):
        raise ValueError("refused for the test")

    real = vx.explain
    monkeypatch.setattr(vx, "explain", refuse)
    out = tmp_path / "out"
    argv = ["explain", images / "a.png", "--model", "test_vit", "--checkpoint", checkpoint, "--method", "rollout",
            "--out", out, "--quiet"]
    code, stdout, err = run(argv, capsys)
    assert code == 1 and "refused for the test" in err and "explained 0, skipped 0 (already done), failed 1" in stdout
    assert len(vx.read_results(out)) == 0
    monkeypatch.setattr(vx, "explain", real)
    code, stdout, _ = run(argv, capsys)  # a resumed run retries it
    assert code == 0 and "explained 1, skipped 0" in stdout
