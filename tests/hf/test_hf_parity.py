"""Every method on Hugging Face ViT, DeiT (distilled and not) and DINOv2 (registers, SwiGLU) models equals the timm
path on the same weights: min-max-normalised maps within 1e-9 in float64 on the reference and the default backend,
the same targets, the same refusals; and the logits equal the HF model's own forward.

The HF models are built from the tiny timm test ViTs by tests/hf/timm_to_hf.py (timm -> HF, independent of the
engine's HF -> timm converter)."""
from __future__ import annotations

import math

import pytest
import torch
from timm_to_hf import FAMILIES, hf_from_timm, images, timm_model
from utils import assert_maps_close, assert_structured

import vitx_fast as vx
from vitx_fast.methods.tame import TAMEExplainer

CASES = [
    ("rollout", {}),
    ("rollout", dict(head_fusion="max", discard_ratio=0.5, renorm="jacobgil")),
    ("gae", {}),
    ("grad_rollout", {}),
    ("lrp", {}),
    ("lrp", dict(start_layer=1)),
    ("agcam", {}),
    ("daam", {}),
    ("daam", dict(mode="ssl")),
    ("reciprocam", {}),
    ("reciprocam", dict(mask="onehot", cls_token=False, residual="ln1", score="logit")),
    ("tame", {}),
]
BATCH = 3


def _id(case):
    method, kw = case
    return method + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


_MODELS: dict = {}


def models(family: str):
    """(timm model, HF model, images, T-TAME explainer or None for a headless model), built once per worker."""
    if family not in _MODELS:
        tm = timm_model(family)
        hm = hf_from_timm(family, tm)
        ex = None
        if tm.num_classes:
            ex = TAMEExplainer.for_model(tm)
            g = torch.Generator().manual_seed(3)
            with torch.no_grad():
                for p in ex.parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(max(p.shape[-1], 1)))
            ex.eval()
        _MODELS[family] = (tm, hm, images(BATCH), ex)
    return _MODELS[family]


def run(model, x, method, kw, backend, target, explainer):
    opts = dict(kw, explainer=explainer) if method == "tame" else kw
    try:
        return vx.explain(model, x, method=method, target=target, backend=backend, **opts)
    except vx.UnsupportedModelError as exc:
        return exc


HEADLESS = sorted(f for f in FAMILIES if f.startswith("dinov2"))  # num_classes=0 (Dinov2Model, ...WithRegistersModel)
# T-TAME needs a classification head: on the headless models it is refused (test_headless_refusals_match)
PAIRS = [pytest.param(f, c, id=f"{f}-{_id(c)}") for f in sorted(FAMILIES) for c in CASES
         if not (f in HEADLESS and c[0] == "tame")]


@pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "default"])
@pytest.mark.parametrize(("family", "case"), PAIRS)
def test_hf_maps_equal_timm(family, case, backend):
    method, kw = case
    tm, hm, x, ex = models(family)
    target = None
    if tm.num_classes and kw.get("mode") != "ssl" and method != "rollout":
        target = torch.tensor([[1, 5], [0, 3], [6, 2]])
    ref = run(tm, x, method, kw, backend, target, ex)
    got = run(hm, x, method, kw, backend, target, ex)
    if isinstance(ref, Exception):
        assert isinstance(got, vx.UnsupportedModelError), f"timm refused ({ref}) but the HF model was served"
        assert str(got) == str(ref)
        assert tm.num_classes == 0, f"timm refused a model with a head: {ref}"
        return
    assert not isinstance(got, Exception), got
    assert_structured(ref.maps.reshape(-1, *ref.maps.shape[-2:]))
    assert got.backend == ref.backend
    assert got.maps.shape == ref.maps.shape
    assert torch.equal(got.targets, ref.targets)
    assert_maps_close(got.maps, ref.maps, 1e-9)
    if ref.flow is not None:
        assert_maps_close(got.flow, ref.flow, 1e-9)
    if ref.logits is not None:
        torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", HEADLESS)
def test_headless_refusals_match(family):
    """A headless HF model (DINOv2) is refused by the class-discriminative methods with the timm model's reasons."""
    tm, hm, x, _ = models(family)
    assert tm.num_classes == 0
    for method in ("gae", "agcam", "lrp", "reciprocam", "grad_rollout", "daam"):
        with pytest.raises(vx.UnsupportedModelError) as ref:
            vx.explain(tm, x, method=method)
        with pytest.raises(vx.UnsupportedModelError) as got:
            vx.explain(hm, x, method=method)
        assert str(got.value) == str(ref.value)
        assert "headless" in str(got.value)
    with pytest.raises(vx.UnsupportedModelError, match="tame cannot explain"):  # no explainer fits a headless model
        vx.explain(hm, x, method="tame")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_hf_forward(family):
    """The engine's logits (or a headless model's output) equal the HF model's own forward and the timm model's."""
    tm, hm, x, _ = models(family)
    with torch.no_grad():
        out = hm(pixel_values=x)
        want = out.logits if hasattr(out, "logits") else out.pooler_output
        twin = vx.ViTAdapter(hm).model(x)
        timm_out = tm(x)
    torch.testing.assert_close(twin, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(twin, timm_out, rtol=0, atol=1e-12)
    if tm.num_classes:
        exp = vx.explain(hm, x, method="gae")
        torch.testing.assert_close(exp.logits, want, rtol=0, atol=1e-12)
        assert torch.equal(exp.targets, want.argmax(-1))
    else:
        assert vx.explain(hm, x, method="rollout").logits is None

