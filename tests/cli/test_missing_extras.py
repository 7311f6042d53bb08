"""Without an optional extra, the command that needs it fails with one line naming the extra (the wheel test,
tests/wheel/check_wheel.sh, checks the same in a venv that really lacks them)."""
import importlib.util
import sys

import pytest

from vitx_fast.cli import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def test_ray_executor_without_ray(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    code, err = run(["explain", img, "--executor", "ray", "--out", tmp_path / "store", "--quiet"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'vitx-fast[ray]'" in err, err
    assert not (tmp_path / "store").exists()  # refused before the store is made


def test_serve_without_ray(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, err = run(["serve", "--model", "demo"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'vitx-fast[serve]'" in err, err


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_export_without_onnx(monkeypatch, tmp_path, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    code, err = run(["export", "--model", "demo", "--out", tmp_path / "m.onnx"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'vitx-fast[onnx]'" in err, err
    assert not (tmp_path / "m.onnx").exists()
