"""Grad rollout: the engine against a literal port of jacobgil/vit-explain `vit_grad_rollout.py`.

The port keeps the reference's capture: a forward hook on every `attn_drop` (forward order) and a legacy
`register_backward_hook` taking `grad_input[0]` (backward order). On timm in eval mode `attn_drop` returns its input
tensor, so that legacy hook lands on the softmax's backward node and `grad_input[0]` is d y / d S (scaled pre-softmax
scores), which the engine reproduces with `grad_wrt="logits"`. A second capture with a tensor hook on the attn_drop
output gives the spec's d y / d A (`grad_wrt="probs"`, the default).
"""
import copy

import pytest
import torch
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


def grad_rollout(attentions, gradients, discard_ratio, renorm="jacobgil", num_prefix=1, raw=False):
    # eye in the attentions' dtype (vit-explain's float32 eye cannot matmul float64); renorm="row" is the engine's
    # keepdim variant; [0, 0, P:] for P prefix tokens
    result = torch.eye(attentions[0].size(-1), dtype=attentions[0].dtype)
    with torch.no_grad():
        for attention, grad in zip(attentions, gradients):
            weights = grad
            attention_heads_fused = (attention * weights).mean(axis=1)
            attention_heads_fused[attention_heads_fused < 0] = 0

            # Drop the lowest attentions, but
            # don't drop the class token
            flat = attention_heads_fused.view(attention_heads_fused.size(0), -1)
            _, indices = flat.topk(int(flat.size(-1) * discard_ratio), -1, False)
            # indices = indices[indices != 0]
            flat[0, indices] = 0

            I = torch.eye(attention_heads_fused.size(-1), dtype=attention_heads_fused.dtype)  # noqa: E741
            a = (attention_heads_fused + 1.0 * I) / 2
            a = a / a.sum(dim=-1) if renorm == "jacobgil" else a / a.sum(dim=-1, keepdim=True)
            result = torch.matmul(a, result)
    mask = result[0, 0, num_prefix:]
    if raw:  # before the display scaling (an all-zero row would give 0 / 0)
        return mask
    mask = mask / mask.max()
    return mask


class VITAttentionGradRollout:
    """vit-explain's class; capture="legacy" is the reference, "tensor" hooks the attn_drop output tensor."""

    def __init__(self, model, attention_layer_name='attn_drop', discard_ratio=0.9, capture="legacy"):
        self.model = copy.deepcopy(model).eval()
        for m in self.model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        self.discard_ratio = discard_ratio
        for name, module in self.model.named_modules():
            if attention_layer_name in name:
                module.register_forward_hook(self.get_attention)
                if capture == "legacy":
                    module.register_backward_hook(self.get_attention_gradient)
        self.capture = capture
        self.attentions = []
        self.attention_gradients = []

    def get_attention(self, module, input, output):
        self.attentions.append(output.cpu())
        if self.capture == "tensor":
            output.register_hook(lambda g: self.attention_gradients.append(g.cpu()))

    def get_attention_gradient(self, module, grad_input, grad_output):
        self.attention_gradients.append(grad_input[0].cpu())

    def __call__(self, input_tensor, category_index, renorm="jacobgil", pairing="jacobgil"):
        self.model.zero_grad()
        output = self.model(input_tensor)
        category_mask = torch.zeros(output.size(), dtype=output.dtype)
        category_mask[:, category_index] = 1
        loss = (output * category_mask).sum()
        loss.backward()
        grads = self.attention_gradients if pairing == "jacobgil" else self.attention_gradients[::-1]
        return grad_rollout(self.attentions, grads, self.discard_ratio, renorm, self.model.num_prefix_tokens)


def port(model, image, target, ratio, capture="legacy", renorm="jacobgil", pairing="jacobgil"):
    return VITAttentionGradRollout(model, discard_ratio=ratio, capture=capture)(image, target, renorm, pairing)


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
    # the legacy hook really captures the pre-softmax gradient: the spec's d y / d A does not reproduce vit-explain
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
