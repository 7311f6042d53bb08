"""K classes per image in one graph: target="topK", a fixed class list, or a (batch, K) `classes` input, for every
gradient method (their K classes are one batched backward inside the graph) and gradient rollout's new fast path.
onnxruntime reproduces `vx.explain` with the same (B, K) targets at batch 1 and 3 (graphs traced at batch 2)."""
import pytest
import torch
from onnx_helpers import ATOL, run, session, tiny_vit
from utils import assert_maps_close, assert_structured

import vitx_fast as vx

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from vitx_fast.export import ExplainerModule
from vitx_fast.onnx_export import export_onnx

# id -> (layout, method, export keywords, method options, model overrides)
CASES = {
    "gae-top3-registers": ("registers", "gae", dict(target="top3"), {}, {}),
    "gae-classes2-distilled": ("distilled", "gae", dict(class_input=True, targets_per_image=2), {}, {}),
    "daam-top2-nonsquare": ("nonsquare", "daam", dict(target="top2", flow=True), {}, {}),
    "grad_rollout-default": ("registers", "grad_rollout", {}, {}, {}),
    "grad_rollout-jacobgil-classes3": ("plain", "grad_rollout", dict(class_input=True, targets_per_image=3),
                                       dict(jacobgil=True), {}),
    # LRP's divisions are ill-conditioned in float32: one block keeps the graph's error at the ATOL scale
    "lrp-list-layerscale": ("layerscale", "lrp", dict(target=[1, 4]), {}, dict(depth=1)),
}


def _targets(kw, batch, C):
    """The (B, K) classes the graph explains, as vx.explain takes them (None: the graph resolves them itself)."""
    if kw.get("class_input"):
        return (torch.arange(batch)[:, None] * 3 + 2 + torch.arange(kw["targets_per_image"])) % C
    if isinstance(kw.get("target"), list):
        return torch.tensor(kw["target"]).expand(batch, -1)
    return None


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_multiclass_graph_matches_fast_path(case, tmp_path):
    layout, method, kw, options, overrides = case
    model = tiny_vit(layout, **overrides)
    path = export_onnx(model, tmp_path / "m.onnx", method, **kw, **options)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"] + (["classes"] if kw.get("class_input") else [])
    sess = session(path)
    C = model.num_classes
    for batch in (1, 3):
        x = torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(batch))
        given = _targets(kw, batch, C)
        outs = run(sess, x, given if kw.get("class_input") else None)
        target = given if given is not None else kw.get("target")
        ref = vx.explain(model, x, method=method, target=target, **options)
        K = ref.targets.shape[1] if ref.targets.dim() == 2 else None
        assert outs[1].shape == ref.maps.shape and (K is None or outs[1].shape[:2] == (batch, K))
        torch.testing.assert_close(outs[0], ref.logits, rtol=0, atol=ATOL)
        assert_structured(outs[1].reshape(-1, *outs[1].shape[-2:]))
        assert_maps_close(outs[1], ref.maps, atol=ATOL if method != "lrp" else 10 * ATOL)
        if kw.get("flow"):
            assert_maps_close(outs[2], ref.flow, atol=ATOL)


def test_multiclass_refusals(tmp_path):
    model = tiny_vit("plain")
    with pytest.raises(ValueError, match="targets_per_image sets the shape"):
        export_onnx(model, tmp_path / "m.onnx", "gae", targets_per_image=2)
    with pytest.raises(ValueError, match="targets_per_image must be an int >= 1"):
        export_onnx(model, tmp_path / "m.onnx", "gae", class_input=True, targets_per_image=0)
    with pytest.raises(ValueError, match="cannot be combined"):
        export_onnx(model, tmp_path / "m.onnx", "gae", target="top2", class_input=True)
    with pytest.raises(ValueError, match="non-empty list of class indices"):
        export_onnx(model, tmp_path / "m.onnx", "gae", target=[])
    with pytest.raises(ValueError, match="map depends on no class"):
        export_onnx(model, tmp_path / "m.onnx", "rollout", target="top2")
    with pytest.raises(ValueError, match="out of range"):
        ExplainerModule(model, "gae", target=[1, 99])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["top2", [0, 3], "input"], ids=["top2", "list", "input"])
def test_torch_export_multiclass_dynamic_batch(target):
    """torch.export of the K-class program (float64) reproduces vx.explain at another batch size."""
    from utils import make_images, make_vit

    model = make_vit("registers")
    mod = ExplainerModule(model, "gae", target=target)
    x = make_images(model, 2)
    args = (x,) + ((torch.tensor([[1, 2], [3, 4]]),) if target == "input" else ())
    dims = tuple({0: torch.export.Dim("batch", min=1, max=64)} for _ in args)
    ep = torch.export.export(mod, args, dynamic_shapes=dims)
    x3 = make_images(model, 3, seed=5)
    given = torch.tensor([[1, 2], [3, 4], [5, 6]])
    logits, maps = ep.module()(x3, given) if target == "input" else ep.module()(x3)
    t = given if target == "input" else (torch.tensor(target).expand(3, -1) if isinstance(target, list) else target)
    ref = vx.explain(model, x3, method="gae", target=t)
    assert maps.shape == (3, 2, *ref.maps.shape[-2:])
    torch.testing.assert_close(maps, ref.maps, rtol=1e-8, atol=1e-9)
