"""Every `vitx` subcommand runs end to end on tiny inputs (the bundled demo model, two images), in process."""
import json

import pytest

import vitx_fast as vx
from vitx_fast.cli import build_parser, main

TESTED = {"explain", "render", "data", "evaluate", "demo", "bench", "train-tame", "export", "info", "serve"}


def vitx(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bench"
    assert main(["data", "export", "--out", str(out), "--n", "2"]) == 0
    return out


def test_every_subcommand_is_tested():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(sub.choices) == TESTED


def test_data_export_is_what_evaluate_and_explain_read(exported, tmp_path, capsys):
    pngs = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*.png"))
    assert len([p for p in pngs if p.startswith("images/")]) == 2 and len(list(exported.glob("annotations/*.xml"))) == 2
    code, out, err = vitx(["evaluate", "--data", exported, "--method", "rollout", "--metrics", "localization",
                           "--out", tmp_path / "ev", "--quiet"], capsys)
    assert code == 0, err
    assert "| trained | bench | rollout | 1.000 | 2 |" in out  # both images read, with their classes and boxes
    code, out, err = vitx(["explain", exported, "--out", tmp_path / "store", "--method", "rollout", "--quiet"], capsys)
    assert code == 0 and "explained 2, skipped 0 (already done), failed 0 of 2" in out, err
    keys = sorted(vx.read_results(tmp_path / "store")["image"])
    assert keys == [p for p in pngs if p.startswith("images/")]  # the images, not the masks


def test_explain_then_render(exported, tmp_path, capsys):
    store = tmp_path / "store"
    code, out, err = vitx(["explain", exported / "images", "--out", store, "--method", "rollout", "gae", "--target",
                           "top2", "--option", "rollout.head_fusion=max", "--batch-size", "2", "--quiet"], capsys)
    assert code == 0, err
    df = vx.read_results(store)
    assert len(df) == 2 * 2 * 2 and json.loads(df[df["method"] == "rollout"]["options"].iloc[0])["head_fusion"] == "max"
    code, out, err = vitx(["render", store, "--out", tmp_path / "drawn"], capsys)
    assert code == 0 and "drew 2 image(s)" in out, err
    grids = sorted((tmp_path / "drawn").rglob("*.grid.png"))
    overlays = sorted((tmp_path / "drawn").rglob("*.c*.png"))
    assert len(grids) == 2 and len(overlays) == 2 * 2 * 2
    from PIL import Image

    key = df["image"].iloc[0]
    with Image.open(exported / "images" / key) as original, \
            Image.open(next(p for p in overlays if p.name.startswith(key.split("/")[-1]))) as over:
        assert over.size == original.size  # drawn on the original image


def test_demo_bench_train_tame_export_info(tmp_path, capsys):
    code, out, err = vitx(["demo", "--out", tmp_path / "g", "--n", "2", "--n-double", "0", "--quiet"], capsys)
    assert code == 0 and (tmp_path / "g" / "index.html").is_file(), err
    code, out, err = vitx(["bench", "--model", "vit_tiny_patch16_224", "--batch", "1", "--img-size", "32", "--method",
                           "rollout", "--backend", "fused", "--reps", "1", "--no-peers", "--no-memory", "--out",
                           tmp_path / "b", "--quiet"], capsys)
    assert code == 0 and (tmp_path / "b" / "bench.csv").read_text().count("rollout") >= 1, err
    code, out, err = vitx(["train-tame", "--data", "bench", "--bench-n", "4", "--epochs", "1", "--batch-size", "2",
                           "--out", tmp_path / "t", "--quiet"], capsys)
    assert code == 0 and (tmp_path / "t" / "tame.safetensors").is_file(), err
    code, out, err = vitx(["export", "--model", "demo", "--method", "rollout", "--out", tmp_path / "m.onnx"], capsys)
    assert code == 0 and (tmp_path / "m.onnx").stat().st_size > 1000, err
    code, out, err = vitx(["info"], capsys)
    assert code == 0 and "method x backend" in out


def test_serve_validates_then_starts(monkeypatch, capsys):
    import vitx_fast.serve as serve

    code, out, err = vitx(["serve", "--max-batch-size", "0"], capsys)
    assert code == 2 and "--max-batch-size" in err and len(err.strip().splitlines()) == 1
    code, out, err = vitx(["serve", "--method", "gradcam++"], capsys)
    assert code == 2 and "gradcam++" in err
    started = {}
    monkeypatch.setattr(serve, "start", lambda config, **kw: started.update(config=config, **kw))
    code, out, err = vitx(["serve", "--method", "rollout", "--port", "8123"], capsys)
    assert code == 0 and started["port"] == 8123 and started["host"] == "127.0.0.1"
    assert started["config"].methods == ("rollout",) and "http://127.0.0.1:8123" in out
