"""`vitx export` on the bundled demo model: the graph onnxruntime runs reproduces the PyTorch fast path; one-line
errors write nothing."""
import pytest
from onnx_helpers import check_against_torch, check_graph, session

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from vitx_fast.cli import main
from vitx_fast.cli.export import parse_options


def cli(argv, capsys):
    """`vitx export ...` through the `vitx` entry point (the parser with every subcommand, the one-line error
    handler); -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_demo_model_export(tmp_path, capsys, record_property, monkeypatch):
    """The bundled model with AGCAM (the backward in the graph), a class input and the in-graph epilogue, exported by
    the command; the other methods on the bundled model are in test_onnx_export.py."""
    import vitx_fast.models.demo as demo
    from vitx_fast.models.demo import demo_data_config

    # the command and the comparison see the same weights, also while the checkpoint is being retrained
    model = demo.load_demo_model()
    monkeypatch.setattr(demo, "load_demo_model", lambda *a, **k: model)
    out = tmp_path / "sub" / "demo.onnx"  # the folder is made
    kw = dict(class_input=True, upsample=True, normalize=True)
    code, stdout, err = cli(["export", "--model", "demo", "--method", "agcam", "--target", "input",
                             "--upsample", "--normalize", "--out", out], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "inputs [images, classes]" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.onnx"]
    proto = onnx.load(str(out))
    check_graph(proto, "agcam", kw)
    meta = {p.key: p.value for p in proto.metadata_props}
    cfg = demo_data_config()
    assert meta["mean"] == ",".join(map(str, cfg["mean"])) and meta["method"] == "agcam"

    worst = check_against_torch(session(out), model, "agcam", kw, {}, seed=0)
    for k, v in worst.items():
        record_property(f"max_{k}_err", f"{v:.2e}")


@pytest.mark.parametrize("argv,match", [
    (["--method", "gradcam"], "unknown method 'gradcam'; methods that export to ONNX: ['agcam'"),
    (["--method", "gae", "--target", "all"], "target='all' needs a method"),
    (["--method", "rollout", "--target", "input"], "the map depends on no class"),
    (["--method", "gae", "--flow"], "flow=True: gae has no per-block flow"),
    (["--method", "rollout", "--option", "head_fusion=median"], "head_fusion='median' is not one of"),
    (["--method", "rollout", "--option", "bogus=1"], "rollout: unknown option(s) ['bogus']; valid options:"),
    (["--method", "rollout", "--option", "oops"], "--option expects KEY=VALUE"),
    (["--method", "rollout", "--upsample", "lanczos"], "upsample must be False, True (bilinear) or one of"),
    (["--method", "rollout", "--opset", "12"], "opset 12 is not supported"),
    (["--method", "rollout", "--static-batch", "0"], "batch_size must be a positive int"),
    (["--model", "vit_nonexistent_xyz"], "unknown timm model"),
])
def test_one_line_errors(argv, match, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, err = cli(["export", "--model", "demo", "--out", out, *argv], capsys)
    assert code == 2 and stdout == ""
    assert err.startswith("vitx: error: ") and match in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_paths(tmp_path, capsys, monkeypatch):
    """A path below a file, a folder given as the file, a folder that takes no file (mkstemp refused, as in a
    read-only folder; root would write to a chmod-ed one): one line, exit 2, nothing written, before any tracing."""
    import tempfile

    import vitx_fast.onnx_export as oe

    def boom(*a, **k):
        raise AssertionError("the path should have been refused before tracing")

    monkeypatch.setattr(oe, "trace", boom)
    (tmp_path / "afile").write_text("")
    (tmp_path / "folder").mkdir()
    cases = [(tmp_path / "afile" / "sub" / "m.onnx", "afile is not a folder"),
             (tmp_path / "folder", "is a folder; give a file name"),
             (tmp_path / "new" / "m.onnx", "cannot write")]
    for i, (out, match) in enumerate(cases):
        if i == 2:
            def refused(*a, **k):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", refused)
        code, stdout, err = cli(["export", "--model", "demo", "--method", "rollout", "--out", out], capsys)
        assert code == 2 and stdout == "" and match in err and len(err.strip().splitlines()) == 1, err
    assert "Permission denied" in err
    # nothing written; the folder made for the last export went again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]
    assert list((tmp_path / "folder").iterdir()) == [] and (tmp_path / "afile").read_text() == ""


def test_parse_options():
    assert parse_options(["head_fusion=max", "discard-ratio=0.5", "norm=true", "explainer=none", "chunk=4"]) == \
        dict(head_fusion="max", discard_ratio=0.5, norm=True, explainer=None, chunk=4)
