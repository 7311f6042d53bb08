"""Hugging Face models through the engine: the user's model untouched, the twin cache following weight changes,
float32, batch sizes, every target form, input sizes (DINOv2 resamples with HF's own rule, ViT / DeiT refuse), HF's
image processor output, and the refusals of HF classes the engine cannot serve."""
from __future__ import annotations

import gc
import weakref
from functools import partial

import pytest
import torch
import torch.nn as nn
from timm.layers import QuickGELU
from timm_to_hf import hf_class, hf_from_timm, images, timm_model, transformers
from utils import assert_maps_close, make_vit

import vitx_fast as vx

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def pair(family="vit", dtype=torch.float64, seed=0, fused=False):
    tm = timm_model(family, dtype=dtype, seed=seed, fused=fused)
    return tm, hf_from_timm(family, tm)


def param(hm, *names):
    """The first of `names` (transformers 5, then 4 spelling) among the model's parameters."""
    params = dict(hm.named_parameters())
    return next(params[n] for n in names if n in params)


def test_user_model_untouched():
    """Training flags, parameters, gradients, hooks and the config of the HF model are as they were."""
    tm, hm = pair("deit_distilled")
    hm.train()
    next(m for n, m in hm.named_modules() if n.endswith("layers.0") or n.endswith("layer.0")).eval()  # mixed flags
    flags = [m.training for m in hm.modules()]
    state = {k: v.clone() for k, v in hm.state_dict().items()}
    config = hm.config.to_dict()
    hm.deit.embeddings.cls_token.requires_grad_(False)  # mixed requires_grad must stay as it was
    grads = [p.requires_grad for p in hm.parameters()]
    attrs = [sorted(vars(m)) for m in hm.modules()]
    x = images(2)
    for method in ("gae", "lrp", "agcam", "daam", "reciprocam", "rollout", "grad_rollout"):
        for backend in ("reference", None):
            exp = vx.explain(hm, x, method=method, backend=backend)
            ref = vx.explain(tm, x, method=method, backend=backend)
            assert_maps_close(exp.maps, ref.maps, 1e-9)  # eval-mode maths although the HF model is in train mode
    assert [m.training for m in hm.modules()] == flags
    for k, v in hm.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in hm.parameters())
    assert [p.requires_grad for p in hm.parameters()] == grads
    assert [sorted(vars(m)) for m in hm.modules()] == attrs  # nothing attached to the model
    for m in hm.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert hm.config.to_dict() == config


def test_twin_cached_and_rebuilt_on_weight_change():
    tm, hm = pair("vit")
    x = images(2)
    twin = vx.ViTAdapter(hm).model
    assert vx.ViTAdapter(hm).model is twin  # cached per model object
    before = vx.explain(hm, x, method="gae", target=1).maps
    with torch.no_grad():  # in place: a q projection (copied into the twin's qkv) and a LayerNorm (a view)
        param(hm, "vit.layers.1.attention.q_proj.weight", "vit.encoder.layer.1.attention.attention.query.weight") \
            .mul_(1.5)
        param(hm, "vit.layers.0.layernorm_before.weight", "vit.encoder.layer.0.layernorm_before.weight").add_(0.25)
        tm.blocks[1].attn.qkv.weight[:32].mul_(1.5)
        tm.blocks[0].norm1.weight.add_(0.25)
    assert vx.ViTAdapter(hm).model is not twin
    after = vx.explain(hm, x, method="gae", target=1).maps
    assert (after - before).abs().max() > 1e-3
    assert_maps_close(after, vx.explain(tm, x, method="gae", target=1).maps, 1e-9)
    # a replaced module (new parameters, possibly at a reused address) is noticed
    twin = vx.ViTAdapter(hm).model
    new = nn.Linear(32, 7).double()
    hm.classifier = new
    tm.head.load_state_dict(new.state_dict())
    assert vx.ViTAdapter(hm).model is not twin
    torch.testing.assert_close(vx.explain(hm, x, method="rollout").logits, tm(x), rtol=0, atol=1e-12)
    # dtype follows the model
    hm.float()
    assert vx.ViTAdapter(hm).model.cls_token.dtype == torch.float32
    assert vx.explain(hm, x.float(), method="rollout").maps.dtype == torch.float32


def test_cache_does_not_keep_the_model_alive():
    _, hm = pair("dinov2_registers")
    vx.explain(hm, images(1), method="rollout")
    ref = weakref.ref(hm)
    del hm
    gc.collect()
    assert ref() is None


def test_twin_shares_storage_and_concatenates_qkv():
    _, hm = pair("vit")
    twin = vx.ViTAdapter(hm).model
    fc1 = param(hm, "vit.layers.0.mlp.fc1.weight", "vit.encoder.layer.0.intermediate.dense.weight")
    assert twin.blocks[0].mlp.fc1.weight.data_ptr() == fc1.data_ptr()
    q = param(hm, "vit.layers.0.attention.q_proj.weight", "vit.encoder.layer.0.attention.attention.query.weight")
    assert twin.blocks[0].attn.qkv.weight.data_ptr() != q.data_ptr()
    assert torch.equal(twin.blocks[0].attn.qkv.weight[:32], q)
    assert twin.norm.eps == hm.vit.layernorm.eps == 1e-12


ACTIVATIONS = {  # HF hidden_act -> (timm act_layer, the twin's activation)
    "gelu_pytorch_tanh": (partial(nn.GELU, approximate="tanh"), "GELU(approximate='tanh')"),
    "gelu_new": (partial(nn.GELU, approximate="tanh"), "GELU(approximate='tanh')"),  # the same function
    "quick_gelu": (QuickGELU, "QuickGELUActivation()"),  # no torch equivalent: HF's own module, through autograd
}


@pytest.mark.parametrize("hidden_act", ACTIVATIONS)
def test_mlp_activations(hidden_act):
    act_layer, twin_act = ACTIVATIONS[hidden_act]
    tm = make_vit("plain", act_layer=act_layer, norm_layer=partial(nn.LayerNorm, eps=1e-12))
    hm = hf_from_timm("vit", tm, hidden_act=hidden_act)
    assert repr(vx.ViTAdapter(hm).model.blocks[0].mlp.act) == twin_act
    x = images(2)
    for method in ("gae", "lrp", "agcam"):
        got, ref = vx.explain(hm, x, method=method), vx.explain(tm, x, method=method)
        assert_maps_close(got.maps, ref.maps, 1e-9)
        torch.testing.assert_close(got.logits, ref.logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["vit", "deit_distilled"])
@pytest.mark.parametrize("method", ["rollout", "gae", "lrp", "agcam", "daam", "reciprocam", "grad_rollout"])
def test_float32(family, method):
    """float32: the same maps as the timm model whose own forward also uses SDPA attention (HF's default)."""
    tm, hm = pair(family, dtype=torch.float32, fused=True)
    for blk in tm.blocks:  # transformers 4.40's DeiT has only eager attention
        blk.attn.fused_attn = hm.config._attn_implementation != "eager"
    x = images(2, dtype=torch.float32)
    got, ref = vx.explain(hm, x, method=method), vx.explain(tm, x, method=method)
    assert got.maps.dtype == torch.float32 and got.backend == ref.backend
    assert_maps_close(got.maps, ref.maps, 1e-5)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", ["vit", "deit_distilled", "dinov2_registers"])
def test_batch_sizes(family, batch):
    tm, hm = pair(family)
    x = images(batch, seed=batch)
    methods = ("rollout", "daam") if tm.num_classes == 0 else ("rollout", "gae", "reciprocam", "agcam", "lrp")
    for method in methods:
        kw = dict(mode="ssl") if method == "daam" else {}
        got, ref = vx.explain(hm, x, method=method, **kw), vx.explain(tm, x, method=method, **kw)
        assert got.maps.shape[0] == batch
        assert_maps_close(got.maps, ref.maps, 1e-9)


TARGETS = {
    "none": None,
    "int": 4,
    "list": [0, 6],
    "tensor": torch.tensor([2, 5]),
    "tensor2d": torch.tensor([[1, 3], [0, 6]]),
    "all": "all",
}


@pytest.mark.parametrize("target", TARGETS.values(), ids=TARGETS.keys())
@pytest.mark.parametrize("method", ["gae", "reciprocam"])
def test_every_target_form(method, target):
    tm, hm = pair("deit_distilled")
    x = images(2)
    if target == "all" and method == "gae":
        with pytest.raises(ValueError) as ref:
            vx.explain(tm, x, method=method, target=target)
        with pytest.raises(ValueError) as got:
            vx.explain(hm, x, method=method, target=target)
        assert str(got.value) == str(ref.value)
        return
    got, ref = vx.explain(hm, x, method=method, target=target), vx.explain(tm, x, method=method, target=target)
    assert torch.equal(got.targets, ref.targets)
    assert got.maps.shape == ref.maps.shape
    assert_maps_close(got.maps, ref.maps, 1e-9)


@pytest.mark.parametrize("size", [(48, 40), (40, 40), (24, 56)])
@pytest.mark.parametrize("family", ["dinov2", "dinov2_registers"])
def test_dinov2_other_sizes_follow_hf(family, size):
    """DINOv2 resamples its position embeddings with HF's own interpolate_pos_encoding (float32 bicubic; with
    antialias for the registers model): the twin's output equals the HF forward at any size."""
    _, hm = pair(family)
    x = images(2, size=size)
    with torch.no_grad():
        want = hm(pixel_values=x).pooler_output
        got = vx.ViTAdapter(hm).model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    exp = vx.explain(hm, x, method="daam", mode="ssl")
    assert exp.maps.shape == (2, size[0] // 8, size[1] // 8)
    flat = vx.explain(hm, x, method="rollout").maps.flatten(1)
    assert ((flat.amax(1) - flat.amin(1)) > 0).all()


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "deit"])
def test_vit_deit_refuse_other_sizes(family):
    """HF ViT / DeiT add their position embeddings unchanged (their own forward refuses other sizes)."""
    _, hm = pair(family)
    x = images(1, size=(48, 48))
    with pytest.raises((ValueError, RuntimeError)):  # HF's own forward refuses the size (the error varies by version)
        hm(pixel_values=x)
    with pytest.raises(ValueError, match="config image_size 32x32 only.*interpolate_pos_encoding"):
        vx.explain(hm, x, method="rollout")


def test_image_processor_pixel_values():
    """The pixel_values of HF's image processor are the (B, 3, H, W) batch vx.explain takes."""
    import numpy as np

    tm, hm = pair("vit", dtype=torch.float32, fused=True)
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    pics = [np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8) for i in range(2)]
    pixel_values = proc(images=pics, return_tensors="pt").pixel_values
    assert pixel_values.shape == (2, 3, 32, 32)
    got, ref = vx.explain(hm, pixel_values, method="gae"), vx.explain(tm, pixel_values, method="gae")
    assert_maps_close(got.maps, ref.maps, 1e-5)


def test_headless_vit_outputs_pooler():
    """ViTModel / DeiTModel: the output of a headless model is HF's pooler_output (tanh(dense(CLS)))."""
    for cls, cfg in ((transformers.ViTModel, transformers.ViTConfig),
                     (transformers.DeiTModel, transformers.DeiTConfig)):
        hm = cls(cfg(intermediate_size=64, **TINY)).double().eval()
        x = images(2)
        with torch.no_grad():
            want = hm(pixel_values=x).pooler_output
            torch.testing.assert_close(vx.ViTAdapter(hm).model(x), want, rtol=0, atol=1e-12)
        assert vx.ViTAdapter(hm).num_prefix_tokens == (1 if cls is transformers.ViTModel else 2)
        assert vx.explain(hm, x, method="daam", mode="ssl").maps.shape == (2, 4, 4)


def _tiny(cls_name: str, config: str, **kw):
    return hf_class(cls_name)(hf_class(config)(**TINY, **kw))


REFUSED = {
    "Dinov2ForImageClassification": (dict(config="Dinov2Config", mlp_ratio=2, num_labels=3),
                                     r"concat\(CLS, mean of the patch tokens\)"),
    "Dinov2WithRegistersForImageClassification": (dict(config="Dinov2WithRegistersConfig", mlp_ratio=2,
                                                       num_labels=3), r"concat\(CLS, mean"),
    "ViTForMaskedImageModeling": (dict(config="ViTConfig", intermediate_size=64), "reconstructed pixels"),
    "BeitModel": (dict(config="BeitConfig", intermediate_size=64), "BEiT: every attention adds a relative position"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_hf_refusals_name_the_reason(name):
    kw, match = REFUSED[name]
    model = _tiny(name, **kw)
    with pytest.raises(vx.UnsupportedModelError, match=match) as exc:
        vx.explain(model, images(1, dtype=torch.float32), method="rollout")
    assert name in str(exc.value)


def test_hf_swin_and_subclass_refused():
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                          num_heads=[1, 2], window_size=4))
    with pytest.raises(vx.UnsupportedModelError, match="SwinModel .*Swin Transformer: attention inside shifted"):
        vx.explain(swin, images(1, dtype=torch.float32), method="rollout")
    sub = type("MyViT", (transformers.ViTForImageClassification,), {})(
        transformers.ViTConfig(intermediate_size=64, **TINY))
    with pytest.raises(vx.UnsupportedModelError, match="MyViT .*subclasses ViTForImageClassification"):
        vx.explain(sub, images(1, dtype=torch.float32), method="rollout")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_twin_attention_follows_hf_implementation(impl):
    """HF's eager attention -> the twin's own forward (logits) unfused too; sdpa -> timm's fused SDPA."""
    cfg = transformers.ViTConfig(intermediate_size=64, attn_implementation=impl, **TINY)
    hm = transformers.ViTForImageClassification(cfg).double().eval()
    if hm.config._attn_implementation != impl:
        pytest.skip(f"transformers {transformers.__version__}'s ViT has no {impl} attention")
    twin = vx.ViTAdapter(hm).model
    assert all(b.attn.fused_attn == (impl != "eager") for b in twin.blocks)


def test_hf_mixed_dtypes_refused():
    _, hm = pair("vit")
    hm.classifier.float()
    with pytest.raises(vx.UnsupportedModelError, match="mix dtypes"):
        vx.explain(hm, images(1), method="rollout")
