"""T-TAME attention mechanism and method (docs/methods/tame.md §6).

- parameter count of the ViT-B/16 geometry (count only);
- reference AM (NCHW, eval BN, resize, concat, fuser) vs the fast path (folded BN, token GEMMs, split-K fuser, only the
  requested rows), B in {1, 3, 8}, square, non-square and > 56 grids; the same-size resize is an exact identity;
- the engine (both backends) vs a literal port of the authors' code (norm1 hooks, PreprocessSeq, AttentionTAME) on every
  layout, batch 1 and 3, fused attention on and off; min-max with eps 1e-10; target="all" vs per-class; batched vs
  per-image; float32 vs float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_tame import random_explainer, randomize_am
from ports.metrics_ttame import normalizeMinMax
from ports.ttame import literal_c
from utils import LAYOUTS, assert_maps_close, assert_structured, explain_on, make_images, make_vit

import vitx_fast as vx
from vitx_fast.methods.tame.module import AttentionTAME, fast_scores, fold_batchnorm, tokens_to_grid

TAME_BACKENDS = ("reference", "fused")  # the fast path calls no fused op, so there is no cpp / triton backend


def test_parameter_count_vit_b16():
    am = AttentionTAME([768, 768, 768], 1000)
    n = sum(p.numel() for p in am.parameters() if p.requires_grad)
    assert n == 4_081_384
    assert sum(p.numel() for n_, p in am.named_parameters() if n_.startswith("convs")) == 1_771_776
    assert sum(p.numel() for n_, p in am.named_parameters() if n_.startswith("bns")) == 4_608
    assert sum(p.numel() for n_, p in am.named_parameters() if n_.startswith("fuser")) == 2_305_000
    # reference state-dict keys (generic.attn_mech.1.{convs.i, bns.i, fuser}.*)
    assert {"convs.2.weight", "bns.0.running_var", "fuser.bias"} <= set(am.state_dict())


@pytest.mark.parametrize("grid", [(14, 14), (3, 5)])
def test_same_size_resize_is_identity(grid):
    x = torch.randn(2, 6, *grid, dtype=torch.float64)
    assert torch.equal(F.interpolate(x, size=grid, mode="bilinear", align_corners=False), x)


def _am_case(grid, batch, num_classes, prefix=2, dims=(8, 8, 8), seed=0):
    torch.manual_seed(seed)
    am = randomize_am(AttentionTAME(list(dims), num_classes).double(), seed).eval()
    t = prefix + grid[0] * grid[1]
    feats = [torch.randn(batch, t, d, dtype=torch.float64) for d in dims]
    with torch.no_grad():
        _, c = am([tokens_to_grid(f, prefix, grid) for f in feats])
    return am, feats, c


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("grid", [(14, 14), (3, 5), (60, 57)])
def test_am_reference_vs_fast(batch, grid):
    am, feats, c = _am_case(grid, batch, num_classes=11)
    assert c.shape == (batch, 11, min(grid[0], 56), min(grid[1], 56))
    fast_all = fast_scores(am, feats, 2, grid)
    torch.testing.assert_close(fast_all, c, rtol=0, atol=1e-11)
    g = torch.Generator().manual_seed(1)
    for k in (1, 2, 6, 11):  # one row (GEMV), a few rows; 2K >= C falls back to the full GEMM and gathers
        rows = torch.randint(0, 11, (batch, k), generator=g)
        got = fast_scores(am, feats, 2, grid, rows)
        torch.testing.assert_close(got, c.gather(1, rows[:, :, None, None].expand(-1, -1, *c.shape[-2:])),
                                   rtol=0, atol=1e-11)


def test_fold_batchnorm_equals_eval_bn():
    torch.manual_seed(0)
    am = randomize_am(AttentionTAME([8], 3).double()).eval()
    x = torch.randn(4, 8, 3, 5, dtype=torch.float64)
    w, b = fold_batchnorm(am.convs[0], am.bns[0])
    want = am.bns[0](am.convs[0](x))
    got = torch.einsum("oc,bchw->bohw", w, x) + b[:, None, None]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", TAME_BACKENDS)
@pytest.mark.parametrize("fused_attn", [False, True])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engine_vs_literal_port(layout, fused_attn, backend):
    model = make_vit(layout, fused=fused_attn)
    ex = random_explainer(model, seed=3)
    for batch in (1, 3):
        images = make_images(model, batch)
        c_ref, labels = literal_c(model, ex, images)
        want = c_ref[torch.arange(batch), labels]
        e = explain_on(backend, model, images, "tame", must_serve=TAME_BACKENDS, explainer=ex)
        assert torch.equal(e.targets, labels)
        assert e.maps.shape == (batch, *model.patch_embed.grid_size)
        assert_structured(e.maps)
        torch.testing.assert_close(e.maps, want, rtol=0, atol=1e-9)  # raw pre-sigmoid c[:, k]
        assert_maps_close(e.maps, want, atol=1e-6)


def test_inference_map_is_minmax_of_c():
    model = make_vit("plain")
    ex = random_explainer(model, seed=1)
    images = make_images(model, 3)
    c_ref, labels = literal_c(model, ex, images)
    want = normalizeMinMax(c_ref[torch.arange(3), labels].unsqueeze(1).clone())[:, 0]  # reference get_c diagonal
    e = vx.explain(model, images, method="tame", explainer=ex)
    flat = e.maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    got = ((flat - lo) / (hi - lo + 1e-10)).view_as(e.maps)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", TAME_BACKENDS)
def test_target_all_equals_per_class(backend):
    model = make_vit("registers")
    ex = random_explainer(model, seed=2)
    images = make_images(model, 3)
    all_ = vx.explain(model, images, method="tame", explainer=ex, target="all", backend=backend)
    assert all_.maps.shape == (3, 7, 4, 4)
    for k in range(7):
        one = vx.explain(model, images, method="tame", explainer=ex, target=k, backend=backend)
        torch.testing.assert_close(all_.maps[:, k], one.maps, rtol=0, atol=1e-12)
    some = torch.tensor([[0, 3, 3], [6, 1, 2], [5, 5, 0]])  # (B, K) with duplicates
    got = vx.explain(model, images, method="tame", explainer=ex, target=some, backend=backend)
    torch.testing.assert_close(got.maps, all_.maps.gather(1, some[:, :, None, None].expand(-1, -1, 4, 4)),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", TAME_BACKENDS)
def test_batched_equals_per_image(backend):
    model = make_vit("nonsquare")
    ex = random_explainer(model, seed=4)
    images = make_images(model, 3)
    batched = vx.explain(model, images, method="tame", explainer=ex, backend=backend)
    for i in range(3):
        single = vx.explain(model, images[i:i + 1], method="tame", explainer=ex, backend=backend)
        torch.testing.assert_close(batched.maps[i:i + 1], single.maps, rtol=0, atol=1e-12)
        assert torch.equal(batched.targets[i:i + 1], single.targets)


@pytest.mark.parametrize("backend", TAME_BACKENDS)
def test_float32_agrees_with_float64(backend):
    m64 = make_vit("plain")
    ex = random_explainer(m64, seed=5)
    images = make_images(m64, 3)
    want = vx.explain(m64, images, method="tame", explainer=ex, backend="reference")
    m32 = make_vit("plain", dtype=torch.float32)
    ex32 = ex.float()  # explainers are cast to the model's dtype at run time either way
    got = explain_on(backend, m32, images.float(), "tame", must_serve=TAME_BACKENDS, explainer=ex32,
                     target=want.targets)
    assert got.maps.dtype == torch.float32
    assert_maps_close(got.maps, want.maps, atol=1e-5)


def test_explainer_mode_untouched():
    model = make_vit("plain")
    ex = random_explainer(model).train()
    vx.explain(model, make_images(model, 2), method="tame", explainer=ex, backend="reference")
    vx.explain(model, make_images(model, 2), method="tame", explainer=ex, backend="fused")
    assert ex.training and ex.attn_mech.bns[0].training


def test_headless_and_bad_options_refused():
    with pytest.raises(ValueError, match="classification head"):
        random_explainer(make_vit("plain", num_classes=0))
    model = make_vit("plain")
    with pytest.raises(ValueError, match="explainer must be"):
        vx.explain(model, make_images(model, 1), method="tame", explainer=3)
    with pytest.raises(TypeError, match="unknown option"):
        vx.explain(model, make_images(model, 1), method="tame", explainer=random_explainer(model), bogus=1)


@pytest.mark.parametrize("target", [None, "all"])
def test_torch_export_dynamic_batch(target):
    from vitx_fast.export import ExplainerModule

    model = make_vit("registers", dtype=torch.float32)
    ex = random_explainer(model).float()
    mod = ExplainerModule(model, "tame", target=target, explainer=ex)
    ep = torch.export.export(mod, (make_images(model, 2).float(),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    x3 = make_images(model, 3, seed=5).float()
    logits, maps = ep.module()(x3)
    ref = vx.explain(model, x3, method="tame", target=target, explainer=ex)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps, ref.maps, rtol=1e-5, atol=1e-5)
