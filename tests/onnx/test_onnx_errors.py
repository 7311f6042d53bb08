"""Refusals come before anything is written, with the reason; a failure during the export leaves no partial file
and an existing file untouched. No test here traces a model (the exporter is replaced where a failure is needed)."""
import copy
import os
import re

import pytest
import torch
from onnx_helpers import tiny_vit

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import vitx_fast.onnx_export as oe
from vitx_fast.engine.adapter import UnsupportedModelError
from vitx_fast.onnx_export import OnnxExportError, export_onnx


@pytest.fixture(scope="module")
def model():
    return tiny_vit("plain", depth=1)


@pytest.fixture()
def no_trace(monkeypatch):
    """Fail the test if an export gets as far as tracing."""
    def boom(*a, **k):
        raise AssertionError("validation should have refused before tracing")
    monkeypatch.setattr(oe, "trace", boom)


def _avg_pool(m):
    m.global_pool = "avg"
    return m


def _fp16(m):
    return m.half()


# (method, keywords, model transform, exception, message fragment)
REFUSALS = [
    ("gradcam", {}, None, ValueError, "unknown method 'gradcam'"),
    ("gae", dict(target="all"), None, ValueError, "target='all' needs a method that yields every class"),
    ("rollout", dict(class_input=True), None, ValueError, "map depends on no class"),
    ("reciprocam", dict(target="all", class_input=True), None, ValueError, "cannot be combined"),
    ("reciprocam", dict(target=3), None, ValueError, "target must be None / 'top1'"),
    ("gae", dict(flow=True), None, ValueError, "gae has no per-block flow"),
    ("rollout", dict(discard_ratio=0.5), None, ValueError, "dynamic_batch=False"),
    ("reciprocam", dict(opset=17), None, ValueError, "opset 17 is not supported: choose an int from 18 to 23"),
    ("reciprocam", dict(opset=24), None, ValueError, "opset 24 is not supported"),
    ("reciprocam", dict(upsample="lanczos"), None, ValueError, "upsample must be False, True"),
    ("reciprocam", dict(mask="square"), None, ValueError, "mask='square' is not one of"),
    ("reciprocam", dict(bogus=1), None, TypeError, "unknown option(s) ['bogus']"),
    ("reciprocam", dict(target_block=0), lambda m: tiny_vit("plain"), ValueError,
     "backend 'fused' cannot run reciprocam"),
    ("gae", {}, _avg_pool, UnsupportedModelError, "pooling 'avg' (token pooling only)"),
    ("rollout", {}, _fp16, UnsupportedModelError, "ONNX export takes float32 models"),
    ("rollout", {}, lambda m: torch.nn.Linear(3, 3), UnsupportedModelError, "timm VisionTransformer"),
    ("tame", {}, None, UnsupportedModelError, "tame cannot explain this model"),
]


@pytest.mark.parametrize("method,kw,transform,exc,msg", REFUSALS, ids=[f"{r[0]}-{r[4][:24]}" for r in REFUSALS])
def test_refused_before_writing(method, kw, transform, exc, msg, model, tmp_path, no_trace):
    m = transform(copy.deepcopy(model)) if transform else model
    with pytest.raises(exc, match=re.escape(msg)):
        export_onnx(m, tmp_path / "x.onnx", method, **kw)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where,exc,msg", [
    ("missing/x.onnx", FileNotFoundError, "does not exist"),
    ("folder", IsADirectoryError, "is a folder"),
    ("afile/x.onnx", NotADirectoryError, "is not a folder"),
])
def test_unwritable_path(where, exc, msg, model, tmp_path, no_trace):
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("")
    with pytest.raises(exc, match=msg):
        export_onnx(model, tmp_path / where, "rollout")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]
    assert list((tmp_path / "folder").iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_folder(model, tmp_path, no_trace):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            export_onnx(model, ro / "x.onnx", "rollout")
    finally:
        ro.chmod(0o700)


def _bad_graph(*a, **k):
    """A ModelProto the checker rejects (an operator that does not exist), standing in for a broken export."""
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["images"], ["maps"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("maps", TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", oe.DEFAULT_OPSET)])


@pytest.fixture()
def fake_export(monkeypatch):
    """Replace tracing + conversion by a tiny graph, so the write path is tested without a 10 s export."""
    monkeypatch.setattr(oe, "trace", lambda module, args, dynamic_batch: None)
    monkeypatch.setattr(oe, "build_graph", lambda *a, **k: _bad_graph())


def test_checker_failure_leaves_nothing(model, tmp_path, fake_export):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")
    with pytest.raises(OnnxExportError, match="onnx.checker rejected"):
        export_onnx(model, target, "rollout", dynamic_batch=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left
    assert target.read_bytes() == b"previous export"  # the old file is untouched


def test_interrupted_write_leaves_nothing(model, tmp_path, fake_export, monkeypatch):
    """An interrupt (or any error) while the file is being written or checked removes the temporary file."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.checker, "check_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, tmp_path / "m.onnx", "rollout", dynamic_batch=False)
    assert list(tmp_path.iterdir()) == []


def test_tracing_failure_is_named(model, tmp_path, monkeypatch):
    def fails(*a, **k):
        raise RuntimeError("data-dependent control flow\nmore detail")

    monkeypatch.setattr(oe, "trace", fails)
    with pytest.raises(OnnxExportError, match="tracing rollout into ONNX failed: RuntimeError: data-dependent"):
        export_onnx(model, tmp_path / "m.onnx", "rollout")
    assert list(tmp_path.iterdir()) == []


def test_opset_mismatch_refused(model, tmp_path, monkeypatch):
    """The version converter can silently keep another opset: such a graph is not written."""
    from onnx import helper

    def other_opset(*a, **k):
        proto = _bad_graph()
        proto.opset_import[0].CopyFrom(helper.make_opsetid("", 18))
        return proto

    monkeypatch.setattr(oe, "trace", lambda *a, **k: None)
    monkeypatch.setattr(oe, "build_graph", other_opset)
    with pytest.raises(OnnxExportError, match="opset 18 instead of 21"):
        export_onnx(model, tmp_path / "m.onnx", "rollout", opset=21, dynamic_batch=False)
    assert list(tmp_path.iterdir()) == []


def test_static_batch_in_dynamic_graph_refused(model, tmp_path, monkeypatch):
    """A graph whose batch came out fixed although a dynamic one was asked for is not written."""
    from onnx import TensorProto, helper

    def fixed(*a, **k):
        node = helper.make_node("Identity", ["images"], ["maps"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [2, 3])],
                                  [helper.make_tensor_value_info("maps", TensorProto.FLOAT, [2, 3])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", oe.DEFAULT_OPSET)])

    monkeypatch.setattr(oe, "trace", lambda *a, **k: None)
    monkeypatch.setattr(oe, "build_graph", fixed)
    with pytest.raises(OnnxExportError, match="fixed the batch of 'images' to 2"):
        export_onnx(model, tmp_path / "m.onnx", "rollout")
    assert list(tmp_path.iterdir()) == []


def _identity_graph(*a, **k):
    """A valid graph with a symbolic batch, standing in for a successful export."""
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["images"], ["maps"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["batch", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", oe.DEFAULT_OPSET)])


def test_interrupted_trace_leaves_nothing(model, tmp_path, monkeypatch):
    """The temporary file exists from before tracing (an unwritable folder fails at once); an interrupt while
    tracing removes it."""
    seen = []

    def interrupted(*a, **k):
        seen.extend(p.name for p in tmp_path.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(oe, "trace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(model, tmp_path / "m.onnx", "rollout")
    assert len(seen) == 1 and seen[0].startswith(".m.onnx.") and seen[0].endswith(".tmp")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_refused_before_tracing(model, tmp_path, monkeypatch, no_trace):
    import tempfile

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError, match=re.escape(f"cannot write {str(tmp_path / 'm.onnx')!r}: Permission")):
        export_onnx(model, tmp_path / "m.onnx", "rollout")
    assert list(tmp_path.iterdir()) == []


def test_written_file_mode_and_metadata(model, tmp_path, monkeypatch):
    """A new file gets the mode open() would give (not mkstemp's 0600), a replaced file keeps its mode; the graph
    carries the export's metadata and the caller's."""
    monkeypatch.setattr(oe, "trace", lambda *a, **k: None)
    monkeypatch.setattr(oe, "build_graph", _identity_graph)
    umask = os.umask(0o022)
    try:
        path = export_onnx(model, tmp_path / "m.onnx", "rollout", metadata={"mean": "0.5,0.5,0.5"})
        assert path.stat().st_mode & 0o777 == 0o644
        assert {p.key: p.value for p in onnx.load(str(path)).metadata_props}["mean"] == "0.5,0.5,0.5"
        path.chmod(0o640)
        export_onnx(model, path, "rollout", head_fusion="max")
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["method"] == "rollout" and meta["target"] == "top1" and "mean" not in meta
    assert '"head_fusion": "max"' in meta["options"] and meta["grid"] == "4x4" and meta["num_prefix_tokens"] == "1"
