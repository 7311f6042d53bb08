"""Every exportable method as one ONNX graph: onnx.checker passes, and onnxruntime's CPU provider reproduces the
PyTorch fast path (`vx.explain`) to 1e-4 on min-max normalised maps and on the logits, at batch sizes 1 and 3 from
the same dynamic-batch graph (traced at batch 2), on random models of several layouts and on the bundled model.
One export per case (each a few seconds): every case checks everything its graph offers. The largest errors are
recorded as test properties (`--junitxml`)."""
import pytest
import torch
from onnx_helpers import (
    ATOL,
    check_against_torch,
    check_graph,
    make_images,
    reference,
    run,
    session,
    split_kw,
    tame_explainer,
    tiny_vit,
)
from utils import assert_maps_close, assert_structured

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from vitx_fast.onnx_export import export_onnx

# id -> (layout, method, keywords (export + method options), model overrides). Together: registers (P=5), distilled
# (P=2, two heads), non-square 3x5 grid, layerscale; top-1, all classes, class input; both epilogues; DAAM's flow;
# three opsets. The bundled model is below (and AGCAM with a class input and the epilogue through the CLI in
# test_onnx_cli.py).
# ReciproCAM's maps are min-max spans of class scores over masked variants; at width 16 some classes' spans are so
# small that float32 itself moves the normalised map by ~1e-3 (torch float32 vs float64), so its models are wider
# (and one block deep: ReciproCAM masks the last block only, the export time goes with the depth).
WIDE = dict(embed_dim=32, num_heads=4, depth=1)
CASES = {
    "reciprocam-top1-nonsquare": ("nonsquare", "reciprocam", {}, WIDE),
    "reciprocam-all-registers": ("registers", "reciprocam", dict(target="all", opset=18), WIDE),
    "reciprocam-input-distilled": ("distilled", "reciprocam", dict(class_input=True, opset=23), WIDE),
    "rollout-nonsquare": ("nonsquare", "rollout", dict(head_fusion="max"), {}),
    "gae-registers": ("registers", "gae", {}, {}),
    "agcam-distilled-epilogue": ("distilled", "agcam", dict(upsample=True, normalize=True), {}),
    "daam-nonsquare-flow-input": ("nonsquare", "daam", dict(class_input=True, flow=True), {}),
    "tame-all-distilled-epilogue": ("distilled", "tame", dict(target="all", upsample="bicubic_pil", normalize=True),
                                    {}),
    # LRP's relevance propagation is the largest graph (~10 s for one block)
    "lrp-layerscale": pytest.param(("layerscale", "lrp", {}, dict(depth=1)), marks=pytest.mark.slow),
}


def _record(record_property, worst):
    for k, v in worst.items():
        record_property(f"max_{k}_err", f"{v:.2e}")


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_export_matches_fast_path(case, tmp_path, record_property):
    layout, method, kw, overrides = case
    model = tiny_vit(layout, **overrides)
    export_kw, options = split_kw(kw)
    if method == "tame":
        options["explainer"] = tame_explainer(model)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "m.onnx", method, **export_kw, **options)

    # one file, nothing left beside it; the model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items()) and not model.training
    check_graph(onnx.load(str(path)), method, kw)
    _record(record_property, check_against_torch(session(path), model, method, kw, options))


@pytest.fixture(scope="module")
def demo():
    from vitx_fast.models import load_demo_model

    return load_demo_model()


# the bundled model (8 x 8 grid, 10 classes, 4 blocks): every method once (AGCAM: test_onnx_cli.py). T-TAME with an
# untrained explainer: the shipped one is tied to the checkpoint it was trained with.
DEMO_CASES = {
    "reciprocam-top1": ("reciprocam", {}),
    "rollout": ("rollout", {}),
    "gae-input": ("gae", dict(class_input=True)),
    "daam-flow-epilogue": ("daam", dict(flow=True, upsample=True, normalize=True)),
    "tame-all": ("tame", dict(target="all")),
}


@pytest.mark.parametrize("case", list(DEMO_CASES.values()), ids=list(DEMO_CASES))
def test_bundled_model(case, demo, tmp_path, record_property):
    method, kw = case
    export_kw, options = split_kw(kw)
    if method == "tame":
        options["explainer"] = tame_explainer(demo)
    path = export_onnx(demo, tmp_path / "demo.onnx", method, **export_kw, **options)
    check_graph(onnx.load(str(path)), method, kw)
    _record(record_property, check_against_torch(session(path), demo, method, kw, options, seed=11))


def test_static_batch(tmp_path):
    """dynamic_batch=False: a fixed batch (here rollout with discard_ratio, whose program loops over the images)."""
    model = tiny_vit("plain")
    path = export_onnx(model, tmp_path / "s.onnx", "rollout", dynamic_batch=False, batch_size=3, discard_ratio=0.5)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_value == 3, value.name
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [3, 3, 32, 32]
    x = make_images(model, 3, seed=2)
    logits, maps, _ = reference(model, x, "rollout", discard_ratio=0.5)
    outs = run(session(path), x)
    torch.testing.assert_close(outs[0], logits, rtol=0, atol=ATOL)
    assert_structured(outs[1])
    assert_maps_close(outs[1], maps, atol=ATOL)


@pytest.mark.gpu
def test_cuda_provider(tmp_path):
    """onnxruntime-gpu: the CUDA provider runs the graph and matches the PyTorch fast path (skips without a GPU or
    without onnxruntime-gpu)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (no CUDAExecutionProvider)")
    model = tiny_vit("registers")
    kw = dict(class_input=True)
    path = export_onnx(model, tmp_path / "g.onnx", "agcam", **kw)
    sess = session(path, "CUDAExecutionProvider")
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    check_against_torch(sess, model, "agcam", kw, {})
