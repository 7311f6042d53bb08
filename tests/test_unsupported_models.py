"""Models the engine cannot serve are refused before any tensor is touched, with an UnsupportedModelError that names
the architecture and the reason (vitx_fast/engine/architectures.py, docs/models.md).

The timm models are built offline (pretrained=False), shrunk with the model's own keyword arguments where that keeps
the test fast."""
from __future__ import annotations

import pytest
import timm
import torch
from utils import make_images, make_vit

import vitx_fast as vx

# timm name, create_model overrides, what the message must say (regex)
CASES = [
    ("vit_tiny_r_s16_p8_224", {}, r"vit_tiny_r_s16_p8_224.*hybrid ViT.*HybridEmbed.*convolutional backbone"),
    ("vitamin_small_224", dict(depth=1),
     r"hybrid ViT.*MbConvStages"),
    ("swin_tiny_patch4_window7_224", dict(depths=(1, 1), num_heads=(1, 2), embed_dim=16, img_size=32, window_size=4),
     r"SwinTransformer \(swin_tiny_patch4_window7_224\): Swin Transformer: attention inside \(shifted\) local windows"),
    ("swinv2_tiny_window8_256", dict(depths=(1, 1), num_heads=(1, 2), embed_dim=16, img_size=32, window_size=4),
     r"Swin Transformer V2"),
    ("eva02_tiny_patch14_224", dict(depth=1, img_size=28), r"Eva \(eva02_tiny_patch14_224\): EVA / RoPE ViT.*RoPE"),
    ("vit_medium_patch16_rope_reg1_gap_256", dict(depth=1, img_size=32, embed_dim=32, num_heads=2),
     r"EVA / RoPE ViT.*rotary position embeddings"),
    ("beit_base_patch16_224", dict(depth=1, img_size=32, embed_dim=32, num_heads=2),
     r"Beit \(beit_base_patch16_224\): BEiT: every attention adds a learned relative position bias"),
    ("vit_relpos_small_patch16_224", dict(depth=1, img_size=32, embed_dim=32, num_heads=2), r"relative position bias"),
    ("cait_xxs24_224", dict(depth=1, img_size=32, embed_dim=32, num_heads=2), r"CaiT: talking-heads attention"),
    ("xcit_nano_12_p16_224", dict(depth=1, img_size=32), r"XCiT: cross-covariance attention"),
    ("pvt_v2_b0", {}, r"PVT v2: spatial-reduction attention"),
    ("samvit_base_patch16", dict(depth=1, img_size=64, embed_dim=32, num_heads=2, global_attn_indexes=()),
     r"SAM ViT: windowed attention"),
    ("naflexvit_base_patch16_gap", dict(depth=1, embed_dim=32, num_heads=2), r"NaFlexViT"),
    ("resnet10t", {}, r"unsupported model ResNet \(resnet10t\).*without self-attention"),
    ("convnext_atto", {}, r"ConvNeXt.*without self-attention"),
    ("efficientformer_l1", {}, r"EfficientFormer.*not timm's VisionTransformer blocks"),
]


@pytest.mark.parametrize(("name", "kw", "match"), CASES, ids=[c[0] for c in CASES])
def test_refusal_names_architecture_and_reason(name, kw, match):
    model = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(vx.UnsupportedModelError, match=match):
        vx.explain(model, x, method="rollout")
    with pytest.raises(vx.UnsupportedModelError, match=match):  # the same refusal without computing anything
        vx.ViTAdapter(model)


def test_hybrid_no_longer_blames_the_channels():
    """The hybrid used to fail with "images have 3 channels but the model expects 64" (its proj reads the CNN's
    feature map): now the refusal says what the model is."""
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False).eval()
    with pytest.raises(vx.UnsupportedModelError, match="hybrid ViT") as exc:
        vx.explain(model, torch.randn(1, 3, 224, 224), method="gae")
    assert "images have 3 channels" not in str(exc.value)
    assert "64 -> 192" in str(exc.value)  # the CNN feature map's width is named as the reason


def test_served_vits_still_served():
    """ViT variants that are served pass the refusal checks: DeiT distilled, registers, no_embed_class."""
    for layout in ("distilled", "registers", "no_embed_class"):
        model = make_vit(layout)
        assert vx.explain(model, make_images(model, 1), method="rollout").maps.shape == (1, 4, 4)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1, img_size=32)
    assert vx.ViTAdapter(deit).distilled


def test_other_modules_keep_the_generic_refusal():
    with pytest.raises(vx.UnsupportedModelError, match="unsupported model Sequential: vitx_fast explains timm"):
        vx.explain(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 32, 32), method="rollout")
