"""Grad rollout: the engine against the literal port of jacobgil/vit-explain `vit_grad_rollout.py` in
tests/ports/vit_explain.py, with the reference's legacy backward-hook capture (d y / d S, `grad_wrt="logits"`) and a
tensor-hook capture (d y / d A, `grad_wrt="probs"`, the default); docs/methods/grad_rollout.md §3 and §6.
"""
import copy

import pytest
import torch
from ports.vit_explain import grad_rollout
from ports.vit_explain import grad_rollout_port as port
from utils import LAYOUTS, assert_maps_close, assert_structured, make_images, make_vit

import vitx_fast as vx

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: thread start-up dominates on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_jacobgil_preset_matches_vit_explain(layout):
    model = make_vit(layout)
    x = make_images(model, 3)
    h, w = model.patch_embed.grid_size
    targets = torch.tensor([0, 3, 6])
    exp = vx.explain(model, x, method="grad_rollout", target=targets, jacobgil=True)
    assert exp.options["pairing"] == "jacobgil" and exp.options["grad_wrt"] == "logits"
    assert exp.maps.shape == (3, h, w) and exp.maps.dtype == torch.float64
    assert_structured(exp.maps)
    for b in range(3):
        ref = port(model, x[b:b + 1], int(targets[b]), 0.9).reshape(h, w)
        assert_maps_close(exp.maps[b], ref, atol=1e-6)
        torch.testing.assert_close(exp.maps[b] / exp.maps[b].max(), ref)


@pytest.mark.parametrize("layout", ["plain", "registers", "distilled", "nonsquare"])
@pytest.mark.parametrize("pairing", ["jacobgil", "correct"])
@pytest.mark.parametrize("ratio,renorm", [(0.9, "jacobgil"), (0.0, "jacobgil"), (0.5, "row")])
def test_options_match_port(layout, pairing, ratio, renorm):
    model = make_vit(layout)
    x = make_images(model, 2)
    h, w = model.patch_embed.grid_size
    targets = torch.tensor([1, 5])
    for grad_wrt, capture in (("probs", "tensor"), ("logits", "legacy")):
        exp = vx.explain(model, x, method="grad_rollout", target=targets, discard_ratio=ratio, pairing=pairing,
                         renorm=renorm, grad_wrt=grad_wrt)
        for b in range(2):
            ref = port(model, x[b:b + 1], int(targets[b]), ratio, capture, renorm, pairing).reshape(h, w)
            assert_maps_close(exp.maps[b], ref, atol=1e-6)


@pytest.mark.parametrize("T,L", [(5, 1), (17, 3), (50, 4)])
@pytest.mark.parametrize("ratio,renorm", [(0.9, "jacobgil"), (0.5, "row"), (0.0, "jacobgil")])
def test_matrix_chain_on_random_tensors(T, L, ratio, renorm):
    """Random attentions and signed gradients (so (CLS, CLS) is often a small positive entry that the discard must
    not protect), batch 3 through the engine's chain vs the port's `grad_rollout` image by image."""
    from vitx_fast.methods.grad_rollout.reference import grad_rollout_matrix

    g = torch.Generator().manual_seed(T * 10 + L)
    attns = [torch.randn(3, 2, T, T, generator=g, dtype=torch.float64).mul(2).softmax(-1) for _ in range(L)]
    grads = [torch.randn(3, 2, T, T, generator=g, dtype=torch.float64) for _ in range(L)]
    joint = grad_rollout_matrix(attns, grads, ratio, renorm)
    for b in range(3):
        ref = grad_rollout([a[b:b + 1] for a in attns], [d[b:b + 1] for d in grads], ratio, renorm, raw=True)
        torch.testing.assert_close(joint[b, 0, 1:], ref, rtol=1e-12, atol=1e-14)


def test_defaults_and_variants_differ():
    model = make_vit("plain")
    x = make_images(model, 2)
    g = vx.get_method("grad_rollout")
    assert g.options == {"discard_ratio": 0.9, "pairing": "correct", "renorm": "jacobgil", "grad_wrt": "probs"}
    base = vx.explain(model, x, method="grad_rollout").maps
    for other in ({"pairing": "jacobgil"}, {"grad_wrt": "logits"}, {"renorm": "row"}):
        diff = (vx.explain(model, x, method="grad_rollout", **other).maps - base).abs().max()
        assert diff > 1e-4, other
    # the legacy hook really captures the pre-softmax gradient: the method's d y / d A does not reproduce vit-explain
    h, w = model.patch_embed.grid_size
    ref = port(model, x[:1], 3, 0.9)
    probs = vx.explain(model, x[:1], method="grad_rollout", target=3, pairing="jacobgil").maps[0]
    with pytest.raises(AssertionError):
        assert_maps_close(probs, ref.reshape(h, w), atol=1e-6)


@pytest.mark.parametrize("layout", ["plain", "registers"])
def test_batched_equals_single_and_fused(layout):
    model = make_vit(layout)
    fused = make_vit(layout, fused=True)
    x = make_images(model, 3)
    for opts in ({}, {"jacobgil": True}):
        batched = vx.explain(model, x, method="grad_rollout", **opts)
        for b in range(3):
            single = vx.explain(model, x[b:b + 1], method="grad_rollout", **opts)
            assert_maps_close(batched.maps[b], single.maps[0], atol=1e-10)
        assert_maps_close(vx.explain(fused, x, method="grad_rollout", **opts).maps, batched.maps, atol=1e-10)


def test_float32_frozen_no_grad():
    model = make_vit("plain")
    x = make_images(model, 2)
    ref = vx.explain(model, x, method="grad_rollout", discard_ratio=0.0).maps
    m32 = copy.deepcopy(model).float().requires_grad_(False)
    with torch.no_grad():
        e32 = vx.explain(m32, x.float(), method="grad_rollout", discard_ratio=0.0)
    assert e32.maps.dtype == torch.float32
    assert_maps_close(e32.maps, ref, atol=1e-4)


def test_bad_options_and_refusals():
    model = make_vit("plain")
    x = make_images(model, 1)
    with pytest.raises(ValueError, match="discard_ratio must be in"):
        vx.explain(model, x, method="grad_rollout", discard_ratio=1.0)
    with pytest.raises(ValueError, match="pairing='reversed' is not one of"):
        vx.explain(model, x, method="grad_rollout", pairing="reversed")
    with pytest.raises(vx.UnsupportedModelError, match="no class token"):
        vx.explain(make_vit("plain", class_token=False, global_pool="avg"), x, method="grad_rollout")
    with pytest.raises(vx.UnsupportedModelError, match="headless"):
        vx.explain(make_vit("plain", num_classes=0), x, method="grad_rollout")


# ----------------------------------------------------------------------------------------- layouts beyond LAYOUTS
# (name, base layout, make_vit overrides, input size or None for the model's own): dynamic_img_size run at another
# input size (position embeddings resampled, grid differs from patch_embed.grid_size), depth 1, one head.
EXTRA = [
    ("dynamic_registers", "registers", dict(dynamic_img_size=True), (40, 24)),
    ("dynamic_distilled", "distilled", dict(dynamic_img_size=True), (24, 48)),
    ("depth1", "plain", dict(depth=1), None),
    ("depth1_1head", "plain", dict(depth=1, num_heads=1, embed_dim=24), None),
]


def _extra(base, kw, size, batch):
    model = make_vit(base, **kw)
    if size is None:
        return model, make_images(model, batch)
    g = torch.Generator().manual_seed(11)
    return model, torch.randn(batch, 3, *size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,base,kw,size", EXTRA, ids=[e[0] for e in EXTRA])
@pytest.mark.parametrize("pairing", ["jacobgil", "correct"])
def test_grad_rollout_extra_layouts_match_port(name, base, kw, size, pairing):
    model, x = _extra(base, kw, size, 2)
    h, w = vx.ViTAdapter(model).grid_for(*x.shape[-2:])
    targets = torch.tensor([1, 5])
    for opts, cap in (({"grad_wrt": "logits"}, "legacy"), ({"grad_wrt": "probs"}, "tensor")):
        exp = vx.explain(model, x, method="grad_rollout", target=targets, pairing=pairing, **opts)
        assert exp.maps.shape == (2, h, w) and exp.maps.dtype == torch.float64
        for b in range(2):
            ref = port(model, x[b:b + 1], int(targets[b]), 0.9, cap, "jacobgil", pairing).reshape(h, w)
            torch.testing.assert_close(exp.maps[b] / exp.maps[b].max(), ref, rtol=1e-9, atol=1e-12)
