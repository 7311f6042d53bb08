"""The adapter's instrumented forward equals the model's own forward, on every layout, without changing the model."""
import pytest
import torch
from utils import LAYOUTS, make_images, make_vit

import vitx_fast as vx
from vitx_fast.engine import ViTAdapter


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_forward_matches_model(layout, fused):
    model = make_vit(layout, fused=fused)
    x = make_images(model, batch=3)
    ad = ViTAdapter(model)
    with torch.no_grad():
        rec = ad.forward(x)
        ref = model(x)
    torch.testing.assert_close(rec.output, ref, rtol=1e-10, atol=1e-10)
    # recorded attention rows are probabilities, CLS row consistent with the logits
    for b in rec.blocks:
        torch.testing.assert_close(b.attn.probs.sum(-1), torch.ones_like(b.attn.probs[..., 0]))
        torch.testing.assert_close(b.attn.probs, b.attn.logits.softmax(-1))


@pytest.mark.parametrize("layout,prefix,grid", [
    ("plain", 1, (4, 4)), ("registers", 5, (4, 4)), ("distilled", 2, (4, 4)), ("nonsquare", 1, (3, 5)),
    ("no_embed_class", 3, (4, 4)), ("big_grid", 1, (5, 6)),
])
def test_layout_read_from_model(layout, prefix, grid):
    model = make_vit(layout)
    lay = ViTAdapter(model).layout(make_images(model, 1))
    assert lay.num_prefix_tokens == prefix
    assert lay.grid == grid
    assert lay.num_tokens == prefix + grid[0] * grid[1]


def test_dynamic_img_size_grid_follows_input():
    model = make_vit("plain", dynamic_img_size=True)
    x = torch.randn(2, 3, 24, 48, dtype=torch.float64)
    exp = vx.explain(model, x, method="rollout")
    assert exp.maps.shape == (2, 3, 6)
    ad = ViTAdapter(model)
    with torch.no_grad():
        torch.testing.assert_close(ad.forward(x).output, model(x))


def test_model_untouched_after_success_and_error(monkeypatch):
    model = make_vit("registers").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    x = make_images(model, 2)
    vx.explain(model, x, method="rollout")

    def boom(*a, **k):
        raise RuntimeError("boom inside a method")

    meth = vx.get_method("rollout")
    for impl in meth.implementations.values():
        monkeypatch.setattr(type(impl), "__call__", boom)
    for backend in ("fused", "reference"):
        with pytest.raises(RuntimeError, match="boom"):
            vx.explain(model, x, method="rollout", backend=backend)
    monkeypatch.undo()
    assert model.training and all(m.training for m in model.modules())
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == flags
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_rejects_non_vit_and_unsupported_blocks():
    with pytest.raises(vx.UnsupportedModelError, match="VisionTransformer"):
        vx.explain(torch.nn.Linear(3, 3), torch.randn(1, 3, 32, 32), method="rollout")
    import timm

    resnet = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(vx.UnsupportedModelError, match="unsupported model ResNet"):
        vx.explain(resnet, torch.randn(1, 3, 32, 32), method="rollout")
    from timm.models.vision_transformer import ResPostBlock

    post = make_vit("plain", block_fn=ResPostBlock)
    with pytest.raises(vx.UnsupportedModelError, match="ResPostBlock"):
        vx.explain(post, make_images(post, 1), method="rollout")
