"""Every fast (fused) implementation equals the reference path: min-max-normalised maps within 1e-9 in float64 and
1e-5 in float32, on random models across layouts, batch sizes and options; and it is the one selected by default."""
import itertools

import pytest
import torch
from utils import (
    AUTO_FAST_BACKEND,
    LAYOUTS,
    NATIVE_MARKS,
    assert_maps_close,
    assert_structured,
    backend_params,
    explain_on,
    make_images,
    make_vit,
)

import vitx_fast as vx
from vitx_fast import _ext

CASES = [
    ("rollout", {}),
    ("rollout", dict(head_fusion="max", discard_ratio=0.5, renorm="jacobgil")),
    ("rollout", dict(head_fusion="min", discard_ratio=0.2, renorm="row")),
    ("gae", {}),
    ("lrp", {}),
    ("lrp", dict(start_layer=1)),
    ("agcam", {}),
    ("agcam", dict(head_fusion="mean", layer_fusion="mean")),
    ("daam", {}),
    ("daam", dict(display="linear", norm=True)),
    ("daam", dict(mode="ssl")),
] + [
    ("reciprocam", dict(mask=mask, cls_token=cls, residual=res, score=score))
    for mask, cls, res, score in itertools.product(("gaussian", "onehot"), (True, False),
                                                   ("unmasked", "masked", "ln1"), ("softmax", "logit"))
]
TOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def _id(case):
    method, kw = case
    return method + ("-" + "-".join(f"{k}={v}" for k, v in kw.items()) if kw else "")


_REFERENCE: dict = {}  # (layout, case id) -> reference run, shared by the backend params of one case in a worker


def _reference(layout, case):
    """(model, x, target, ref): the float64 reference run of one case, computed once per worker (ref is the
    UnsupportedModelError when the method cannot explain the layout)."""
    key = (layout, _id(case))
    if key not in _REFERENCE:
        method, kw = case
        model = make_vit(layout)
        batch = 3 if layout in ("plain", "registers", "distilled") else 1
        x = make_images(model, batch)
        target = None if kw.get("mode") == "ssl" else torch.randint(0, model.num_classes, (batch, 2))
        try:
            ref = vx.explain(model, x, method=method, target=target, backend="reference", **kw)
        except vx.UnsupportedModelError as exc:
            ref = exc
        _REFERENCE[key] = (model, x, target, ref)
    return _REFERENCE[key]


@pytest.mark.parametrize("backend", backend_params(exclude=("reference",)))
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fast_backends_equal_reference_float64(layout, case, backend):
    """Each fast backend equals the reference; fused serves every case, cpp / triton skip the ones they declare they
    cannot serve."""
    method, kw = case
    model, x, target, ref = _reference(layout, case)
    if isinstance(ref, vx.UnsupportedModelError):
        with pytest.raises(vx.UnsupportedModelError):
            vx.explain(model, x, method=method, target=target, backend=backend, **kw)
        with pytest.raises(vx.UnsupportedModelError):
            vx.explain(model, x, method=method, target=target, **kw)
        return
    assert_structured(ref.maps.reshape(-1, *ref.maps.shape[-2:]))
    if backend == "fused":
        default = vx.explain(model, x, method=method, target=target, **kw)
        assert default.backend != "reference"
    fast = explain_on(backend, model, x, method, must_serve=("fused",), target=target, **kw)
    assert torch.equal(fast.targets, ref.targets)
    assert_maps_close(fast.maps, ref.maps, TOL[torch.float64])
    if ref.flow is not None:
        assert_maps_close(fast.flow, ref.flow, TOL[torch.float64])


@pytest.mark.parametrize("method", ["rollout", "gae", "lrp", "reciprocam", "agcam", "daam"])
@pytest.mark.parametrize("layout", ["plain", "registers", "nonsquare", "qknorm"])
def test_fused_equals_reference_float32(layout, method):
    """float32: fast vs reference in float32 within 1e-5, or (ill-conditioned maps such as LRP's divisions) the fast
    path's error against the float64 reference at most twice the float32 reference's own error plus 1e-5."""
    model64 = make_vit(layout)
    model = make_vit(layout, dtype=torch.float32)
    x = make_images(model64, 2)
    fast = vx.explain(model, x.float(), method=method)
    ref32 = vx.explain(model, x.float(), method=method, backend="reference")
    ref64 = vx.explain(model64, x, method=method, backend="reference")
    assert fast.backend != "reference"
    n = vx.normalize
    err_fast = (n(fast.maps.double()) - n(ref64.maps)).abs().max().item()
    err_ref = (n(ref32.maps.double()) - n(ref64.maps)).abs().max().item()
    direct = (n(fast.maps.double()) - n(ref32.maps.double())).abs().max().item()
    assert direct <= TOL[torch.float32] or err_fast <= 2 * err_ref + TOL[torch.float32], (direct, err_fast, err_ref)


@pytest.mark.parametrize("method", ["rollout", "gae", "lrp", "reciprocam", "agcam", "daam"])
def test_fused_default_top1_and_logits(method):
    model = make_vit("distilled", fused=True)
    x = make_images(model, 2)
    fast = vx.explain(model, x, method=method)
    logits = model(x)
    torch.testing.assert_close(fast.logits, logits)
    assert torch.equal(fast.targets, logits.argmax(-1))
    assert fast.maps.shape == (2, 4, 4)


def test_reciprocam_all_classes_one_pass():
    model = make_vit("nonsquare")
    x = make_images(model, 2)
    allc = vx.explain(model, x, method="reciprocam", target="all")
    assert allc.backend == AUTO_FAST_BACKEND and allc.maps.shape == (2, model.num_classes, 3, 5)
    ref = vx.explain(model, x, method="reciprocam", target="all", backend="reference")
    assert_maps_close(allc.maps, ref.maps, 1e-9)


def test_fused_refusals_fall_back_to_reference():
    model = make_vit("plain", global_pool="avg")
    x = make_images(model, 1)
    assert vx.explain(model, x, method="reciprocam").backend == "reference"
    with pytest.raises(ValueError, match="token-pooled head"):
        vx.explain(model, x, method="reciprocam", backend="fused")
    assert vx.explain(make_vit("plain"), x, method="reciprocam", official=True).backend == "reference"


@pytest.mark.parametrize("method", ["agcam", "gae", "lrp", "daam"])
def test_autograd_fallback_for_modules_without_explicit_vjp(method):
    """A SiLU MLP has no explicit VJP here: the fused path falls back to autograd and still equals the reference."""
    import torch.nn as nn

    from vitx_fast.engine import ViTAdapter, vjp

    model = make_vit("registers", act_layer=nn.SiLU)
    assert vjp.not_supported_reasons(ViTAdapter(model))
    x = make_images(model, 2)
    t = torch.tensor([[1, 2], [3, 4]])
    fast = vx.explain(model, x, method=method, target=t)
    ref = vx.explain(model, x, method=method, target=t, backend="reference")
    assert fast.backend != "reference"
    assert_maps_close(fast.maps, ref.maps, TOL[torch.float64])


@pytest.mark.parametrize("native", [pytest.param(True, id="native", marks=NATIVE_MARKS),
                                    pytest.param(False, id="no-native")])
def test_default_dispatch_order(native, monkeypatch):
    """backend=None picks the fastest that can serve: cpp where its kernels beat torch (and the native module loaded),
    else fused. "no-native" simulates a machine without vitx_fast._C."""
    if not native:
        monkeypatch.setattr(_ext, "_C", None)
        monkeypatch.setattr(_ext, "_IMPORT_ERROR", "ImportError: simulated")
    fast = "cpp" if native else "fused"
    model = make_vit("plain", dtype=torch.float32)
    x = make_images(model, 1).float()
    expect = {"reciprocam": fast, "daam": fast, "agcam": "fused", "gae": "fused", "lrp": fast, "rollout": "fused",
              "grad_rollout": "fused"}
    for method, backend in expect.items():
        assert vx.explain(model, x, method=method).backend == backend, method
    if native:
        assert vx.explain(model, x, method="agcam", backend="cpp").backend == "cpp"  # runs when asked for
    else:
        with pytest.raises(ValueError, match="native module vitx_fast._C is not available .*simulated"):
            vx.explain(model, x, method="agcam", backend="cpp")
    qk = make_vit("qknorm", dtype=torch.float32)
    assert vx.explain(qk, x, method="reciprocam").backend == "fused"
    with pytest.raises(ValueError, match="qk_norm"):
        vx.explain(qk, x, method="reciprocam", backend="cpp")
