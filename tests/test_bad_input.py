"""Bad input at run time (issue 15): meta / mismatched devices, callers inside inference_mode / no_grad, non-finite
logits and maps (API and `vitx explain` job), and concurrent explanations of one model."""
from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from utils import backend_params, explain_on, make_images, make_vit

import vitx_fast as vx
from vitx_fast.methods.tame import TAMEExplainer


# ---------------------------------------------------------------------------------------------- devices
def test_meta_images_refused_before_compute():
    model = make_vit("plain")
    with pytest.raises(ValueError, match="images are on the meta device"):
        vx.explain(model, make_images(model, 2).to("meta"), method="gae")


def test_meta_model_refused():
    model = make_vit("plain").to("meta")
    with pytest.raises(ValueError, match="model's parameters are on the meta device"):
        vx.explain(model, torch.randn(2, 3, 32, 32, dtype=torch.float64), method="rollout")


def test_images_on_another_device_than_the_model_refused():
    model = make_vit("plain")
    with pytest.raises(ValueError, match=r"images are on device meta but the model is on cpu|meta device"):
        vx.explain(model, torch.empty(2, 3, 32, 32, dtype=torch.float64, device="meta"), method="rollout")
    adapter = vx.ViTAdapter(model)
    adapter.check_images(make_images(model, 1))  # same device: accepted
    with pytest.raises(ValueError, match=r"images are on device cpu but the model is on meta"):
        vx.ViTAdapter(make_vit("plain").to("meta")).check_images(make_images(model, 1))


# ---------------------------------------------------------------------------------------------- grad modes
# "silu": no explicit VJP for the MLP, so the fast gradient paths take autograd (vitx_fast.engine.gradients)
GRAD_LAYOUTS = {"plain": {}, "silu": dict(act_layer=torch.nn.SiLU)}


def _method_options(method, model):
    return dict(explainer=TAMEExplainer.for_model(model, seed=0)) if method == "tame" else {}


@pytest.mark.parametrize("layout", list(GRAD_LAYOUTS))
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("method", vx.list_methods())
def test_inside_inference_mode_and_no_grad(method, backend, layout):
    model = make_vit("plain", dtype=torch.float32, **GRAD_LAYOUTS[layout])
    kw = _method_options(method, model)
    expected = explain_on(backend, model, make_images(model, 2), method, **kw).maps
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            x = make_images(model, 2)  # an inference tensor under inference_mode
            got = explain_on(backend, model, x, method, **kw)
        assert torch.equal(got.maps, expected), (mode.__name__, (got.maps - expected).abs().max())


def test_model_built_in_inference_mode_clear_error():
    with torch.inference_mode():
        model = make_vit("plain", dtype=torch.float32)
    with pytest.raises(ValueError, match="created under torch.inference_mode"):
        vx.explain(model, make_images(model, 2), method="gae", backend="reference")


# ---------------------------------------------------------------------------------------------- non-finite
def _nan_head(model):
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("method", ["gae", "rollout", "reciprocam", "daam", "lrp"])
def test_huge_inputs_give_nonfinite_logits_error(method):
    model = make_vit("plain", dtype=torch.float32)
    with pytest.raises(ValueError, match="non-finite logits"):
        vx.explain(model, make_images(model, 2) * 1e30, method=method)


def test_nan_weights_error_names_the_images():
    model = _nan_head(make_vit("plain"))
    with pytest.raises(ValueError, match=r"non-finite logits: .* image\(s\) \[0, 1\].*nonfinite='warn'"):
        vx.explain(model, make_images(model, 2), method="gae")


def test_nonfinite_map_of_headless_model():
    model = make_vit("plain", num_classes=0)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite map: rollout maps"):
        vx.explain(model, make_images(model, 2), method="rollout")


def test_nonfinite_warn_returns_the_maps():
    model = _nan_head(make_vit("plain"))
    with pytest.warns(RuntimeWarning, match="non-finite logits"):
        exp = vx.explain(model, make_images(model, 2), method="gae", nonfinite="warn")
    assert exp.maps.shape == (2, 4, 4) and not torch.isfinite(exp.logits).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finite results: no warning
        vx.explain(make_vit("plain"), make_images(model, 2), method="gae", nonfinite="warn")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        vx.explain(model, make_images(model, 2), method="gae", nonfinite="ignore")


def test_nonfinite_map_with_finite_logits():
    model = make_vit("plain", num_classes=1)  # one class: softmax scores are constant, so are the maps
    with pytest.raises(ValueError, match=r"non-finite map: reciprocam maps .*\(the logits are finite"):
        vx.explain(model, make_images(model, 2), method="reciprocam", eps=0.0)


@pytest.mark.parametrize("fill", ["huge", "nan"])
def test_cli_job_with_nonfinite_checkpoint_fails(fill, tmp_path, capsys):
    import numpy as np
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from vitx_fast.cli import main

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("test_vit", num_classes=5).state_dict().items()}
    # "huge": finite weights (loadable) whose logits overflow float32; "nan": refused when loading
    state["head.weight"] = state["head.weight"].sign() * 3e38 if fill == "huge" else state["head.weight"] * np.nan
    save_file(state, str(tmp_path / "w.safetensors"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    code = main(["explain", str(tmp_path / "a.png"), "--model", "test_vit", "--checkpoint",
                 str(tmp_path / "w.safetensors"), "--method", "rollout", "gae", "--out", str(tmp_path / "o"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    if fill == "huge":
        assert "failed a.png: rollout: ValueError: non-finite logits" in err  # the first failure of the image
        errors = vx.read_errors(tmp_path / "o")
        assert sorted(errors["method"]) == ["gae", "rollout"] and errors["error"].str.contains("non-finite").all()
        assert len(vx.read_results(tmp_path / "o")) == 0
    else:
        assert "NaN" in err


# ---------------------------------------------------------------------------------------------- threads
def _flags(model):
    return [m.training for m in model.modules()]


def _explain_in_threads(n, model, x, method):
    """n threads started together, each explaining `model`; returns (maps per thread, exceptions)."""
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def work(i):
        try:
            barrier.wait()
            results[i] = vx.explain(model, x, method=method).maps
        except Exception as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


@pytest.mark.parametrize("method", ["rollout", "gae"])
def test_threads_on_one_train_mode_model(method):
    model = make_vit("plain").train()
    model.blocks[1].eval()  # a mixed pattern: every flag must come back as it was
    flags = _flags(model)
    x = make_images(model, 2)
    expected = vx.explain(model, x, method=method).maps
    assert _flags(model) == flags
    for trial in range(6):
        results, errors = _explain_in_threads(2 + trial % 3, model, x, method)
        assert not errors, errors
        assert _flags(model) == flags, f"trial {trial}: training flags changed"
        for r in results:
            assert torch.equal(r, expected)


# ---------------------------------------------------------------------------------------------- chunks, models
@pytest.mark.parametrize("form", ["ndarray", "ndarray2d", "tuple", "list", "tensor", "range"])
@pytest.mark.parametrize("method", ["gae", "reciprocam"])
def test_chunked_batch_slices_every_per_image_target_form(method, form):
    model = make_vit("plain")
    x = make_images(model, 3)
    target = {"ndarray": np.array([2, 0, 1]), "ndarray2d": np.array([[2, 3], [0, 1], [1, 1]]), "tuple": (2, 0, 1),
              "list": [2, 0, 1], "tensor": torch.tensor([2, 0, 1]), "range": range(3)}[form]
    whole = vx.explain(model, x, method=method, target=target)
    chunked = vx.explain(model, x, method=method, target=target, memory_budget="1kB")
    assert chunked.extras["memory"]["chunks"] == 3
    assert torch.equal(chunked.targets, whole.targets) and torch.allclose(chunked.maps, whole.maps)


@pytest.mark.parametrize("break_model, match", [
    (lambda m: m.head.float(), "several dtypes .*head.weight is torch.float32"),
    (lambda m: m.blocks[0].half(), "several dtypes"),
    (lambda m: m.head.to("meta"), "meta device .*head.weight"),
])
def test_model_with_mixed_parameters_refused(break_model, match):
    model = make_vit("plain")
    break_model(model)
    with pytest.raises(ValueError, match=match):
        vx.explain(model, make_images(make_vit("plain"), 2), method="rollout")


@pytest.mark.parametrize("method", ["reciprocam", "agcam"])
@pytest.mark.parametrize("size", [2**31, (2**70, 2), 16385])
def test_upsample_bounded(method, size):
    model = make_vit("plain")
    with pytest.raises(ValueError, match="exceeds 16384 pixels per side"):
        vx.explain(model, make_images(model, 2), method=method, upsample=size)
