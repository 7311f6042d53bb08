"""Shared pieces of the ONNX export tests: tiny float32 models, onnxruntime sessions, the torch fast-path reference."""
from __future__ import annotations

import numpy as np
import torch
from utils import assert_maps_close, assert_structured, make_images, make_vit, minmax

import vitx_fast as vx

# depth 2, width 16: an export takes ~10 s on the shared 2-core machine
TINY = dict(dtype=torch.float32, depth=2, embed_dim=16, num_heads=2)
ATOL = 1e-4


def tiny_vit(layout: str, **overrides):
    return make_vit(layout, **{**TINY, **overrides})


def tame_explainer(model, seed: int = 0):
    """An untrained T-TAME explainer for `model` with random weights and BN statistics (BN folding exercised)."""
    from vitx_fast.methods.tame.module import TAMEExplainer

    ex = TAMEExplainer.for_model(model, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in ex.attn_mech.bns:
            bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))
            bn.weight.copy_(1.0 + 0.3 * torch.randn(bn.weight.shape, generator=g))
    return ex.eval()


def session(path, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # the machine is shared; one thread also fixes the reduction order
    return ort.InferenceSession(str(path), so, providers=[provider])


def run(sess, images: torch.Tensor, classes: torch.Tensor | None = None) -> list[torch.Tensor]:
    feeds = {"images": images.numpy()}
    if classes is not None:
        feeds["classes"] = classes.numpy().astype(np.int64)
    return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds)]


def classes_for(batch: int, num_classes: int) -> torch.Tensor:
    """Given classes that are not all the top-1: (3 * b + 2) mod C."""
    return (torch.arange(batch) * 3 + 2) % num_classes


def reference(model, images, method, target=None, upsample=None, normalize=False, **options):
    """The PyTorch fast path (`vx.explain`, auto backend) with the export's epilogue applied in torch."""
    res = vx.explain(model, images, method=method, target=target, **options)
    maps, flow = res.maps, res.flow

    def epi(m):
        if m is None:
            return None
        if upsample:
            m = vx.upsample(m, tuple(images.shape[-2:]), mode=upsample)
        return vx.normalize(m) if normalize else m

    return res.logits, epi(maps), epi(flow)


EXPORT_KEYS = ("target", "class_input", "upsample", "normalize", "flow", "opset")


def split_kw(kw: dict) -> tuple[dict, dict]:
    """A case's keywords -> (export_onnx keywords, method options)."""
    return ({k: v for k, v in kw.items() if k in EXPORT_KEYS}, {k: v for k, v in kw.items() if k not in EXPORT_KEYS})


def map_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |difference| of the min-max normalised maps (what `assert_maps_close` bounds)."""
    return (minmax(actual.double()) - minmax(expected.double())).abs().max().item()


def check_graph(proto, method: str, kw: dict) -> None:
    """The graph passes the checker and has the inputs, outputs, opset, symbolic batch and metadata asked for."""
    import onnx

    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == kw.get("opset", 20)
    assert [i.name for i in proto.graph.input] == ["images"] + (["classes"] if kw.get("class_input") else [])
    assert [o.name for o in proto.graph.output] == ["logits", "maps"] + (["flow"] if kw.get("flow") else [])
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert {p.key: p.value for p in proto.metadata_props}["method"] == method


def check_against_torch(sess, model, method: str, kw: dict, options: dict, batches=(1, 3), seed: int = 7) -> dict:
    """Run the graph at every batch size and compare with the PyTorch fast path: logits and min-max normalised maps
    (and flow) to ATOL, shapes, the in-graph epilogue, the class input. Returns the largest errors seen."""
    C = model.num_classes
    upsample = "bilinear" if kw.get("upsample") is True else kw.get("upsample")
    worst = dict(logits=0.0, maps=0.0, **(dict(flow=0.0) if kw.get("flow") else {}))
    for batch in batches:
        x = make_images(model, batch, seed=seed + batch)
        classes = classes_for(batch, C) if kw.get("class_input") else None
        outs = run(sess, x, classes)
        assert len(outs) == (3 if kw.get("flow") else 2)
        target = classes if classes is not None else kw.get("target")
        logits, maps, flow = reference(model, x, method, target=target, upsample=upsample,
                                       normalize=kw.get("normalize", False), **options)
        torch.testing.assert_close(outs[0], logits, rtol=0, atol=ATOL)
        worst["logits"] = max(worst["logits"], (outs[0] - logits).abs().max().item())
        assert outs[1].shape == maps.shape
        hw = tuple(x.shape[-2:]) if upsample else model.patch_embed.grid_size
        assert outs[1].shape[-2:] == hw
        assert outs[1].shape[:-2] == ((batch, C) if kw.get("target") == "all" else (batch,))
        if kw.get("normalize"):  # normalised in the graph: every map spans [0, 1] as it comes out
            flat = outs[1].flatten(-2)
            assert flat.amin(-1).abs().max() < 1e-6 and (flat.amax(-1) - 1).abs().max() < 1e-5
        assert_structured(outs[1])
        assert_maps_close(outs[1], maps, atol=ATOL)
        worst["maps"] = max(worst["maps"], map_error(outs[1], maps))
        if kw.get("flow"):
            assert outs[2].shape == flow.shape == (batch, len(model.blocks), *hw)
            assert_structured(outs[2])
            assert_maps_close(outs[2], flow, atol=ATOL)
            worst["flow"] = max(worst["flow"], map_error(outs[2], flow))
    if kw.get("class_input"):  # the class input is used: another class gives another map
        x = make_images(model, 1, seed=3)
        a = run(sess, x, torch.tensor([0]))[1]
        b = run(sess, x, torch.tensor([1]))[1]
        assert (a - b).abs().max() > 1e-3
    return worst


__all__ = ["ATOL", "check_against_torch", "check_graph", "classes_for", "make_images", "map_error", "reference", "run",
           "session", "split_kw", "tame_explainer", "tiny_vit"]
