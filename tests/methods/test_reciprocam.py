"""ViT-ReciproCAM reference path against independent implementations (docs/methods/reciprocam.md §6).

Independent references:
- `naive_scores` (tests/ports/reciprocam_hooks.py): openvino_xai-torch style hook on a deep copy of the timm model
  (blocks[b].norm1 output replaced by the (N, T, D) masked batch, residual broadcast), or the block's forward swapped
  for the "masked" / "ln1" residuals.
- `VitCamPort` (tests/ports/vitcam.py): a literal port of sybyun/vitcam `src/vit_recipro_cam.py` `ViTReciproCam`.
- the one-hot closed form of docs/methods/reciprocam.md §5, built here from the unmodified forward's CLS attention
  row.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from ports.reciprocam_hooks import G3, naive_maps, naive_mask, naive_scores
from ports.vitcam import VitCamPort, vitcam_batch
from utils import (
    BASE,
    LAYOUTS,
    assert_maps_close,
    assert_structured,
    backend_params,
    explain_on,
    images_at,
    make_images,
    make_vit,
    minmax,
)

import vitx_fast as vx
from vitx_fast.engine.adapter import UnsupportedModelError
from vitx_fast.methods.reciprocam.reference import variant_weights
from vitx_fast.postprocess import upsample


def engine(model, images, target=None, **opts):
    return vx.explain(model, images, method="reciprocam", target=target, backend="reference", **opts)


def engine_scores(model, images, **opts):
    """All-class raw scores of the engine, (B, N, C)."""
    maps = engine(model, images, target="all", scale="none", **opts).maps  # (B, C, h, w)
    return maps.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------- reference vs the naive hooks
COMBOS = [(mk, cls, res) for mk in ("gaussian", "onehot") for cls in (True, False)
          for res in ("unmasked", "masked", "ln1")]


@pytest.mark.parametrize("target_block", [-1, -2])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_reference_matches_naive_hooks(layout, target_block):
    model = make_vit(layout)
    images = make_images(model, 3)
    grid = tuple(model.patch_embed.grid_size)
    for mask, cls_token, residual in COMBOS:
        opts = dict(target_block=target_block, mask=mask, cls_token=cls_token, residual=residual)
        got = engine_scores(model, images, score="logit", **opts)
        ref = naive_scores(model, images, score="logit", **opts)
        torch.testing.assert_close(got, ref, atol=1e-11, rtol=1e-10, msg=lambda s, opts=opts: f"{opts}: {s}")
        maps = engine(model, images, target="all", **opts).maps  # softmax, min-max
        assert_maps_close(maps, naive_maps(ref.softmax(-1), grid), atol=1e-6, normalize=False)
    assert_structured(engine(model, images).maps)


@pytest.mark.parametrize("layout,P,grid", [("plain", 1, (4, 4)), ("distilled", 2, (4, 4)), ("registers", 5, (4, 4)),
                                           ("nonsquare", 1, (3, 5)), ("big_grid", 1, (5, 6))])
def test_prefix_tokens_and_grids(layout, P, grid):
    """P in {1, 2, 5} and non-square grids, default options, batched; maps are (B, h, w) on the model's grid."""
    model = make_vit(layout)
    assert model.num_prefix_tokens == P and tuple(model.patch_embed.grid_size) == grid
    images = make_images(model, 3)
    exp = engine(model, images)
    assert exp.maps.shape == (3, *grid)
    ref = naive_maps(naive_scores(model, images), grid)
    expected = ref[torch.arange(3), exp.targets]
    assert_maps_close(exp.maps, expected, atol=1e-6, normalize=False)


def test_deeper_target_block_and_nonnegative_index():
    model = make_vit("deep_1head")  # depth 6
    images = make_images(model, 2)
    for residual in ("unmasked", "masked"):
        got = engine_scores(model, images, target_block=-3, residual=residual)
        torch.testing.assert_close(got, naive_scores(model, images, target_block=-3, residual=residual),
                                   atol=1e-11, rtol=1e-10)
        torch.testing.assert_close(engine_scores(model, images, target_block=3, residual=residual), got,
                                   atol=1e-13, rtol=0)
    torch.testing.assert_close(engine_scores(model, images, target_block=0), naive_scores(model, images, 0),
                               atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("class_token", [True, False])
def test_gap_head_matches_naive_hooks(class_token):
    model = make_vit("plain", global_pool="avg", class_token=class_token)
    assert model.num_prefix_tokens == int(class_token)
    images = make_images(model, 2)
    for mask, cls_token, residual in COMBOS:
        for tb in (-1, -2):
            opts = dict(target_block=tb, mask=mask, cls_token=cls_token, residual=residual)
            torch.testing.assert_close(engine_scores(model, images, **opts), naive_scores(model, images, **opts),
                                       atol=1e-11, rtol=1e-10, msg=lambda s, opts=opts: f"{opts}: {s}")


@pytest.mark.parametrize("layout", ["plain", "registers", "qknorm"])
def test_fused_attention_on_off_equal(layout):
    unfused = make_vit(layout, fused=False)
    fused = make_vit(layout, fused=True)
    images = make_images(unfused, 2)
    for opts in (dict(), dict(target_block=-2), dict(residual="ln1", cls_token=False, mask="onehot")):
        a = engine(unfused, images, target="all", scale="none", **opts).maps
        b = engine(fused, images, target="all", scale="none", **opts).maps
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)
        # the naive hooks on the fused model (timm's SDPA path) agree as well
        ref = naive_scores(fused, images, **opts)
        torch.testing.assert_close(a.flatten(2).transpose(1, 2), ref, atol=1e-11, rtol=1e-10)


def test_float32_matches_float64():
    m64 = make_vit("registers")
    m32 = copy.deepcopy(m64).float()
    images = make_images(m64, 2)
    a = engine(m64, images, target="all").maps
    b = engine(m32, images.float(), target="all").maps
    assert b.dtype == torch.float32
    assert_maps_close(b, a, atol=1e-4)


def test_chunk_sizes_agree():
    model = make_vit("nonsquare")
    images = make_images(model, 3)
    ref = engine(model, images, target="all", scale="none").maps
    for chunk in (1, 7, 15, 16, 1000):
        torch.testing.assert_close(engine(model, images, target="all", scale="none", chunk=chunk).maps, ref,
                                   atol=1e-13, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- residual semantics
def test_residual_semantics():
    model = make_vit("layerscale")
    images = make_images(model, 2)
    logits = {(cls, res): engine_scores(model, images, score="logit", cls_token=cls, residual=res)
              for cls in (True, False) for res in ("unmasked", "masked", "ln1")}
    # token head, last block, CLS kept: the CLS row's residual is 1*X_0 = X_0, so the logits are bit-identical
    assert torch.equal(logits[True, "unmasked"], logits[True, "masked"])
    # CLS dropped: its residual is 0 under "masked" -> O(1) logit difference
    assert (logits[False, "unmasked"] - logits[False, "masked"]).abs().max() > 0.5
    for cls in (True, False):
        assert (logits[cls, "unmasked"] - logits[cls, "ln1"]).abs().max() > 0.5
    # a GAP head reads the patch rows, whose residual differs under "masked"
    gap = make_vit("plain", global_pool="avg")
    a = engine_scores(gap, images, score="logit", residual="unmasked")
    b = engine_scores(gap, images, score="logit", residual="masked")
    assert (a - b).abs().max() > 0.1
    # block -2: the masked rows feed block L-1's attention, so even the CLS logits differ
    a = engine_scores(model, images, score="logit", target_block=-2, residual="unmasked")
    b = engine_scores(model, images, score="logit", target_block=-2, residual="masked")
    assert (a - b).abs().max() > 0.1


# --------------------------------------------------------------------------------------------- one-hot closed form
@pytest.mark.parametrize("layout", ["plain", "layerscale", "no_qkv_bias", "registers"])
def test_onehot_closed_form(layout):
    """Variant k's CLS attention is a softmax over {l_0p (prefix p), l_0k, beta + ln(N-1)} of the unmasked forward."""
    model = make_vit(layout)
    images = make_images(model, 2)
    blk, attn = model.blocks[-1], model.blocks[-1].attn
    P, (h, w) = model.num_prefix_tokens, model.patch_embed.grid_size
    N, D, H, d = h * w, model.embed_dim, attn.num_heads, attn.head_dim
    seen = {}
    handle = blk.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    with torch.no_grad():
        model(images)
        handle.remove()
        x = seen["x"]  # (B, T, D) input of the last block
        B, T, _ = x.shape
        qkv = torch.nn.functional.linear(blk.norm1(x), attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4)  # (B, H, T, d)
        bias = attn.qkv.bias if attn.qkv.bias is not None else torch.zeros(3 * D, dtype=x.dtype)
        b_k, b_v = bias[D:2 * D].view(H, d), bias[2 * D:].view(H, d)
        l0 = torch.einsum("bhd,bhtd->bht", q[:, :, 0] * attn.scale, k)  # original CLS attention logits (B, H, T)
        beta = torch.einsum("bhd,hd->bh", q[:, :, 0] * attn.scale, b_k)
        logits = []
        for kk in range(N):
            ent = torch.cat([l0[:, :, :P], l0[:, :, P + kk:P + kk + 1], (beta + math.log(N - 1))[..., None]], -1)
            alpha = ent.softmax(-1)  # (B, H, P+2)
            vals = torch.cat([v[:, :, :P], v[:, :, P + kk:P + kk + 1], b_v[None, :, None].expand(B, H, 1, d)], 2)
            o = torch.einsum("bhs,bhsd->bhd", alpha, vals).reshape(B, D)
            y0 = x[:, 0] + blk.ls1(attn.proj(o))
            z0 = y0 + blk.ls2(blk.mlp(blk.norm2(y0)))
            logits.append(model.forward_head(model.norm(z0[:, None])))
        closed = torch.stack(logits, 1)  # (B, N, C)
    got = engine_scores(model, images, mask="onehot", score="logit")
    torch.testing.assert_close(got, closed, atol=1e-11, rtol=1e-10)


# --------------------------------------------------------------------------------------------------- variant masks
@pytest.mark.parametrize("h,w,P", [(3, 5, 1), (5, 6, 2), (4, 4, 5), (2, 3, 0), (1, 1, 1)])
def test_variant_weights(h, w, P):
    for mask in ("gaussian", "onehot"):
        for cls in (True, False):
            W = variant_weights(h, w, P, mask, cls, torch.float64)
            assert W.shape == (h * w, P + h * w)
            assert torch.equal(W, naive_mask(h, w, P, mask, cls))
            assert torch.equal(W[:, :P], torch.full((h * w, P), float(cls), dtype=torch.float64))
            # row-major: variant k = i*w + j peaks at patch column P + k
            assert torch.equal(W[:, P:].argmax(-1), torch.arange(h * w))
    W = variant_weights(h, w, P, "gaussian", True, torch.float64)[:, P:].view(h, w, h * w)
    sums = W.sum(-1)
    for i in range(h):
        for j in range(w):
            assert W[i, j, i * w + j] == 0.25  # the centre is scaled by 1/4
            edges = (i in (0, h - 1)) + (j in (0, w - 1)) if h > 1 and w > 1 else None
            if edges == 0:
                assert sums[i, j] == 1.0
            elif edges == 1:
                assert sums[i, j] == 0.75
            elif edges == 2:
                assert sums[i, j] == 0.5625
    assert torch.equal(variant_weights(h, w, P, "onehot", False, torch.float64)[:, P:],
                       torch.eye(h * w, dtype=torch.float64))
    assert variant_weights(h, w, P, "gaussian", True, torch.float32).dtype == torch.float32


def test_variant_weights_nonsquare_order():
    """On a 3x5 grid, variant (1, 3) covers rows 0..2 and columns 2..4 (not a transposed 5x3 reading)."""
    W = variant_weights(3, 5, 1, "gaussian", True, torch.float64)
    k = 1 * 5 + 3
    patch = W[k, 1:].view(3, 5)
    expected = torch.zeros(3, 5, dtype=torch.float64)
    expected[0:3, 2:5] = torch.tensor(G3, dtype=torch.float64)
    assert torch.equal(patch, expected)
    with pytest.raises(ValueError, match="mask"):
        variant_weights(3, 5, 1, "box", True)


def test_ln1_of_zero_is_beta():
    """LN(0) = beta exactly: masking before LN1 would give constant rows beta, not 0 (guard against pre-LN masking)."""
    model = make_vit("plain")
    for blk in model.blocks:
        with torch.no_grad():
            out = blk.norm1(torch.zeros(1, 1, model.embed_dim, dtype=torch.float64))
        assert torch.equal(out[0, 0], blk.norm1.bias)
        assert blk.norm1.bias.abs().max() > 0.1


# ----------------------------------------------------------------------------------- official preset vs vitcam port
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", ["plain", "layerscale", "qknorm", "no_qkv_bias", "deep_1head"])
def test_official_matches_vitcam(layout, fused):
    model = make_vit(layout, fused=fused)
    for batch in (1, 3):
        images = make_images(model, batch, seed=batch)
        exp = engine(model, images, official=True)
        ref, index = vitcam_batch(model, images)
        assert torch.equal(exp.targets, index)
        assert exp.maps.shape == ref.shape
        torch.testing.assert_close(exp.maps, ref, atol=1e-10, rtol=0)  # both min-max without eps
        assert_maps_close(exp.maps, ref, atol=1e-6)
    # explicit classes, and vitcam's other switches (one-hot, CLS dropped)
    images = make_images(model, 2)
    cls = torch.tensor([3, 5])
    exp = engine(model, images, target=cls, official=True, mask="onehot", cls_token=False)
    ref, _ = vitcam_batch(model, images, index=cls, is_gaussian=False, cls_token=False)
    torch.testing.assert_close(exp.maps, ref, atol=1e-10, rtol=0)


def _redraw_torchvision(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "token" not in name and "pos_embedding" not in name:
                gain = 2.5 if "in_proj" in name else 1.2
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(math.prod(p.shape[1:])))
            elif ".ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def torchvision_to_timm(tv):
    """Port a torchvision VisionTransformer into a timm VisionTransformer (the key mapping of
    docs/methods/tame.md §3)."""
    from timm.models.vision_transformer import VisionTransformer

    L = len(tv.encoder.layers)
    D = tv.hidden_dim
    heads = tv.encoder.layers[0].self_attention.num_heads
    mlp = tv.encoder.layers[0].mlp[0].out_features
    model = VisionTransformer(img_size=tv.image_size, patch_size=tv.patch_size, embed_dim=D, depth=L,
                              num_heads=heads, mlp_ratio=mlp / D, qkv_bias=True, num_classes=tv.num_classes)
    sd = tv.state_dict()
    new = {"patch_embed.proj.weight": sd["conv_proj.weight"], "patch_embed.proj.bias": sd["conv_proj.bias"],
           "cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"],
           "norm.weight": sd["encoder.ln.weight"], "norm.bias": sd["encoder.ln.bias"],
           "head.weight": sd["heads.head.weight"], "head.bias": sd["heads.head.bias"]}
    pairs = [("ln_1", "norm1"), ("ln_2", "norm2"), ("self_attention.out_proj", "attn.proj"), ("mlp.0", "mlp.fc1"),
             ("mlp.3", "mlp.fc2")]
    for i in range(L):
        src, dst = f"encoder.layers.encoder_layer_{i}.", f"blocks.{i}."
        for a, b in pairs:
            for p in ("weight", "bias"):
                new[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        new[f"{dst}attn.qkv.weight"] = sd[f"{src}self_attention.in_proj_weight"]
        new[f"{dst}attn.qkv.bias"] = sd[f"{src}self_attention.in_proj_bias"]
    model.load_state_dict(new, strict=True)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model.to(torch.float64).eval()


def test_official_torchvision_vit():
    """vitcam on a tiny torchvision ViT (hook on encoder_layer_{L-2}.ln_1) equals the engine on its timm port."""
    from torchvision.models import VisionTransformer as TVViT

    torch.manual_seed(0)
    tv = TVViT(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=7)
    _redraw_torchvision(tv)
    tv = tv.to(torch.float64).eval()
    assert tv.encoder.layers[0].ln_1.eps == 1e-6
    port = torchvision_to_timm(tv)
    images = make_images(port, 3)
    with torch.no_grad():
        torch.testing.assert_close(port(images), tv(images), atol=1e-12, rtol=1e-10)
    cam = VitCamPort(tv, "cpu")
    assert cam.hooked_name == "encoder.layers.encoder_layer_2.ln_1"
    ref, index = vitcam_batch(tv, images)
    exp = engine(port, images, official=True)
    assert torch.equal(exp.targets, index)
    torch.testing.assert_close(exp.maps, ref, atol=1e-10, rtol=0)
    assert_maps_close(exp.maps, ref, atol=1e-6)
    assert_structured(exp.maps)


# ------------------------------------------------------------------------------------------------- output contract
def test_all_class_maps_equal_per_class_runs():
    model = make_vit("distilled")
    images = make_images(model, 2)
    for opts in (dict(), dict(scale="none", score="logit"), dict(official=True)):
        allc = engine(model, images, target="all", **opts).maps
        assert allc.shape == (2, 7, 4, 4)
        for c in range(7):
            torch.testing.assert_close(engine(model, images, target=c, **opts).maps, allc[:, c], atol=0, rtol=0)
        t = torch.tensor([[6, 0, 3], [2, 2, 5]])
        torch.testing.assert_close(engine(model, images, target=t, **opts).maps, allc[torch.arange(2)[:, None], t],
                                   atol=0, rtol=0)


def test_uint8_formula():
    model = make_vit("registers")
    images = make_images(model, 2)
    raw = engine(model, images, target="all", scale="none").maps
    flat = raw.flatten(2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    expected = torch.floor(255 * (flat - lo) / (hi - lo + 1e-12)).to(torch.uint8).view_as(raw)
    got = engine(model, images, target="all", scale="uint8").maps
    assert got.dtype == torch.uint8
    assert torch.equal(got, expected)
    # floor(255 * (1 - tiny)) = 254 at the maximum, as openvino_xai's embed_scaling
    assert got.flatten(2).amax(-1).eq(254).all() and got.flatten(2).amin(-1).eq(0).all()
    # float scaling: (s - min) / (max - min + 1e-12)
    torch.testing.assert_close(engine(model, images, target="all").maps,
                               ((flat - lo) / (hi - lo + 1e-12)).view_as(raw), atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["nonsquare", "no_embed_class"])
def test_batch_equals_singles(layout):
    model = make_vit(layout)
    images = make_images(model, 3)
    for opts in (dict(), dict(official=True), dict(mask="onehot", residual="masked", cls_token=False, chunk=5)):
        batched = engine(model, images, target="all", scale="none", **opts).maps
        for b in range(3):
            single = engine(model, images[b:b + 1], target="all", scale="none", **opts).maps
            torch.testing.assert_close(batched[b:b + 1], single, atol=1e-13, rtol=1e-12)


def test_upsample_after_scaling():
    model = make_vit("nonsquare")
    images = make_images(model, 2)
    grid_maps = engine(model, images).maps
    raw = engine(model, images, scale="none").maps
    for mode in ("bilinear", "bicubic_pil"):
        up = engine(model, images, upsample=(24, 40), upsample_mode=mode).maps
        assert up.shape == (2, 24, 40)
        torch.testing.assert_close(up, upsample(grid_maps, (24, 40), mode), atol=0, rtol=0)
        assert not torch.allclose(up, minmax(upsample(raw, (24, 40), mode)), atol=1e-3)  # order matters
    sq = engine(model, images, target="all", upsample=16).maps
    assert sq.shape == (2, 7, 16, 16)
    u8 = engine(model, images, scale="uint8", upsample=(24, 40)).maps
    assert u8.dtype == torch.uint8 and u8.shape == (2, 24, 40)
    g8 = engine(model, images, scale="uint8").maps
    assert (u8.double() - upsample(g8.double(), (24, 40))).abs().max() <= 0.5
    none_up = engine(model, images, scale="none", upsample=(24, 40)).maps
    torch.testing.assert_close(none_up, upsample(raw, (24, 40)), atol=0, rtol=0)


def test_official_no_epsilon_and_explicit_target():
    model = make_vit("plain")
    images = make_images(model, 2)
    raw = engine(model, images, target="all", scale="none", target_block=-2).maps
    flat = raw.flatten(2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    nn_eps = ((flat - lo) / (hi - lo)).view_as(raw)
    torch.testing.assert_close(engine(model, images, target="all", official=True).maps, nn_eps, atol=0, rtol=0)
    top1 = engine(model, images, official=True)
    assert torch.equal(top1.targets, top1.logits.argmax(-1))
    exp = engine(model, images, target=[4, 1], official=True)
    torch.testing.assert_close(exp.maps, nn_eps[torch.arange(2), torch.tensor([4, 1])], atol=0, rtol=0)
    # explicit options beat the preset
    assert engine(model, images, official=True, target_block=-1).options["target_block"] == -1


# ---------------------------------------------------------------------------------------------------- options
def test_option_validation():
    model = make_vit("plain")  # depth 3
    images = make_images(model, 1)
    for tb in (3, -4, 10):
        with pytest.raises(UnsupportedModelError, match="target_block"):
            engine(model, images, target_block=tb)
    with pytest.raises(UnsupportedModelError, match="target_block"):
        engine(make_vit("plain", depth=1), images, official=True)
    bad = [dict(target_block="last"), dict(target_block=True), dict(target_block=-1.0), dict(mask="box"),
           dict(residual="pre_ln"), dict(score="prob"), dict(scale="minmax"), dict(cls_token="yes"),
           dict(upsample=0), dict(upsample=(16,)), dict(upsample=(16, 0)), dict(upsample="224"), dict(chunk=0),
           dict(chunk=2.5), dict(eps=-1.0), dict(scale="uint8", eps=0.0), dict(official=True, scale="uint8"),
           dict(upsample_mode="bicubic")]
    for opts in bad:
        with pytest.raises(ValueError):
            engine(model, images, **opts)
    with pytest.raises(TypeError, match="unknown option"):
        engine(model, images, block_index=-2)
    with pytest.raises(UnsupportedModelError, match="headless"):
        engine(make_vit("plain", num_classes=0), images)


# ---------------------------------------------------------------------------------------------------- more layouts
# layouts the LAYOUTS table does not reach: dynamic_img_size run at another input size (with prefix tokens), depth 1
EXTRA_LAYOUTS = {
    "dynamic-24x40": ("plain", dict(dynamic_img_size=True), (24, 40)),
    "dynamic-registers-40x24": ("registers", dict(dynamic_img_size=True), (40, 24)),
    "dynamic-distilled-24x40": ("distilled", dict(dynamic_img_size=True), (24, 40)),
    "dynamic-no_embed_class-40x48": ("no_embed_class", dict(dynamic_img_size=True), (40, 48)),
    "depth1-1head-ls": ("plain", dict(depth=1, num_heads=1, init_values=0.5), None),
    "depth1-qknorm-registers": ("registers", dict(depth=1, qk_norm=True), None),
    "depth1-no_qkv_bias-distilled": ("distilled", dict(depth=1, qkv_bias=False), None),
}


# (case, target_block): the last block, and block -2 where the model has one
EXTRA_BLOCKS = [pytest.param(case, tb, id=f"{case}-block{tb}") for case, (_, kw, _) in EXTRA_LAYOUTS.items()
                for tb in ((-1, -2) if kw.get("depth", BASE["depth"]) > 1 else (-1,))]


def must_serve(target_block=-1):
    """Backends that may not refuse: reference always, fused at the last block (its fast path)."""
    return ("reference", "fused") if target_block == -1 else ("reference",)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case, target_block", EXTRA_BLOCKS)
def test_extra_layouts_match_naive_every_backend(case, target_block, backend):
    """float64, batch 1 and 2: each backend's all-class logit scores equal the naive hooked re-run on the input's own
    grid, for every mask / cls_token / residual combination, at the last block and (depth > 1) block -2."""
    layout, overrides, size = EXTRA_LAYOUTS[case]
    model = make_vit(layout, scale=1.5, **overrides)
    for batch in (1, 2):
        x = images_at(model, batch, size, seed=batch)
        grid = tuple(s // p for s, p in zip(x.shape[-2:], model.patch_embed.patch_size, strict=True))
        for mask, cls_token, residual in COMBOS:
            opts = dict(target_block=target_block, mask=mask, cls_token=cls_token, residual=residual)
            ref = naive_scores(model, x, score="logit", **opts)
            exp = explain_on(backend, model, x, "reciprocam", must_serve=must_serve(target_block), target="all",
                             scale="none", score="logit", **opts)
            got = exp.maps
            assert got.shape == (batch, model.num_classes, *grid) and got.dtype == torch.float64
            torch.testing.assert_close(got.flatten(2).transpose(1, 2), ref, atol=1e-11, rtol=1e-10,
                                       msg=lambda m, opts=opts: f"{backend} {opts}: {m}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(EXTRA_LAYOUTS), ids=list(EXTRA_LAYOUTS))
def test_extra_layouts_target_forms_every_backend(case, backend):
    """float64, batch 1 and 2, default options (softmax, min-max with eps): every target form on each backend equals
    the naive hooked re-run on the input's own grid."""
    layout, overrides, size = EXTRA_LAYOUTS[case]
    model = make_vit(layout, scale=1.5, **overrides)
    for batch in (1, 2):
        x = images_at(model, batch, size, seed=batch)
        grid = tuple(s // p for s, p in zip(x.shape[-2:], model.patch_embed.patch_size, strict=True))
        expected = naive_maps(naive_scores(model, x), grid)  # (B, C, h, w)
        ar = torch.arange(batch)
        t_bk = torch.tensor([[6, 0, 3], [2, 2, 5]])[:batch]
        forms = {"all": ("all", expected), "int": (3, expected[:, 3]),
                 "list": ([5, 1][:batch], expected[ar, [5, 1][:batch]]),
                 "(B,)": (torch.tensor([4, 2])[:batch], expected[ar, torch.tensor([4, 2])[:batch]]),
                 "(B,K)": (t_bk, expected[ar[:, None], t_bk])}
        for target, want in forms.values():
            exp = explain_on(backend, model, x, "reciprocam", must_serve=must_serve(), target=target)
            assert_maps_close(exp.maps, want, atol=1e-9, normalize=False)
