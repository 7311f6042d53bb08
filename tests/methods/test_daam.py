"""DAAM parity tests (docs/methods/daam.md §6): the engine against the literal port of the authors' code in
tests/ports/daam.py (supervised and SSL, kNN contribution weights, display mappings), plus the cheaper per-head
formula, the decomposition identity, the memory bank and the refusals."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from ports.daam import (
    contri_weight_generate,
    contribution_weight,
    literal_on_grid,
    literal_ssl,
    literal_supervised,
    max_min_normal,
)
from utils import (
    EXTRA_LAYOUTS,
    LAYOUTS,
    assert_maps_close,
    assert_structured,
    extra_model_and_images,
    make_images,
    make_vit,
)

import vitx_fast as vx
from vitx_fast.methods.daam.memory_bank import MemoryBank
from vitx_fast.methods.daam.reference import block_maps, daam_captures, display_maps, spatial_features

ALL_LAYOUTS = sorted(LAYOUTS)


def synthetic_bank(model, n=24, classes=4, seed=5) -> MemoryBank:
    imgs = make_images(model, n, seed=seed)
    labels = torch.arange(n) % classes
    return MemoryBank.build(model, imgs, labels, batch_size=10)


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("layout,fused", [(lay, False) for lay in ALL_LAYOUTS] +
                         [(lay, True) for lay in ("plain", "registers", "distilled", "nonsquare")])
def test_supervised_matches_literal(layout, fused):
    model = make_vit(layout, fused=fused)
    x = make_images(model, 3)
    e8 = vx.explain(model, x, method="daam", output="uint8")
    ef = vx.explain(model, x, method="daam")
    cams, blocks, _, labels = literal_supervised(model, x, non_liear_mapping=True)
    L, (h, w) = len(model.blocks), model.patch_embed.grid_size
    assert torch.equal(e8.targets, labels)
    assert e8.flow.shape == (3, L, h, w) and e8.flow.dtype == torch.uint8
    assert torch.equal(e8.flow, cams), "uint8 display maps differ from the literal port"
    assert torch.equal(e8.maps, cams[:, -1])
    assert_structured(ef.extras["block_maps"][:, -1])
    torch.testing.assert_close(ef.extras["block_maps"], blocks, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(ef.extras["accumulated"], blocks.cumsum(1), atol=1e-12, rtol=1e-9)
    diff = ef.flow * 255 - cams.double()
    assert diff.min() >= -1e-9 and diff.max() < 1 + 1e-9, "float path is not within 1/255 above the uint8 path"
    # batched equals per-image
    one = vx.explain(model, x[2:3], method="daam")
    torch.testing.assert_close(one.flow[0], ef.flow[2], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("layout", ["plain", "registers", "nonsquare", "distilled"])
def test_linear_display_and_norm_match_literal(layout):
    model = make_vit(layout)
    x = make_images(model, 2)
    t = torch.tensor([1, 4])
    e = vx.explain(model, x, method="daam", target=t, display="linear", output="uint8")
    cams, *_ = literal_supervised(model, x, t, non_liear_mapping=False)  # utils/DAAM.py's own default
    assert torch.equal(e.flow, cams)
    ef = vx.explain(model, x, method="daam", target=t, display="linear")
    diff = ef.flow * 255 - cams.double()
    assert diff.min() >= -1e-9 and diff.max() < 1 + 1e-9
    # norm=True: the reference casts each normalised block map to float32, so compare to float32 precision
    en = vx.explain(model, x, method="daam", target=t, norm=True)
    _, blocks_n, *_ = literal_supervised(model, x, t, norm=True)
    torch.testing.assert_close(en.extras["block_maps"], blocks_n.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mode", ["supervised", "ssl"])
@pytest.mark.parametrize("layout", ["plain", "registers", "qknorm", "nonsquare"])
def test_cheaper_formula_and_identity(layout, mode):
    model = make_vit(layout)
    x = make_images(model, 2)
    ad = vx.ViTAdapter(model)
    targets = model(x).argmax(-1)
    onehot = F.one_hot(targets, model.num_classes).double()
    a, v, C, _ = daam_captures(ad, x, onehot, mode)
    S = spatial_features(a, v)  # (B, L, T, D)
    M = block_maps(S, C, ad.num_prefix_tokens, mode)
    # cheaper formula: M[j] = ReLU(Σ_h a[h, j] <V[h, j], g[h]>), S never materialised
    g = (torch.relu(C) if mode == "supervised" else C).reshape(*C.shape[:2], ad.num_heads, ad.head_dim)
    cheap = torch.relu(torch.einsum("blht,blhtd,blhd->blt", a, v, g))[..., ad.num_prefix_tokens:]
    torch.testing.assert_close(M, cheap, atol=1e-12, rtol=1e-9)
    # decomposition identity: Σ_j S[j] = O[0]; the recomputed row a equals the unfused attention row
    with torch.no_grad():
        rec = ad.forward(x)
    ctx0 = torch.stack([b.attn.context[:, 0] for b in rec.blocks], 1)
    torch.testing.assert_close(S.sum(2), ctx0, atol=1e-12, rtol=1e-10)
    rows = []
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda m, i, o: rows.append(o[:, :, 0])) for blk in model.blocks]
    model(x)
    for hk in hooks:
        hk.remove()
    torch.testing.assert_close(a, torch.stack(rows, 1), atol=1e-13, rtol=1e-10)


def test_gradients_match_reference_hooks_in_block_order():
    model = make_vit("deep_1head")
    x = make_images(model, 1)
    ad = vx.ViTAdapter(model)
    t = model(x).argmax(-1)
    _, _, C, _ = daam_captures(ad, x, F.one_hot(t, model.num_classes).double(), "supervised")
    _, _, grads, _ = literal_supervised(model, x)
    assert grads.shape == C.shape == (1, len(model.blocks), model.embed_dim)
    torch.testing.assert_close(C, grads, atol=1e-12, rtol=1e-9)
    # every block's coefficient differs, so a reversed order would fail
    assert (C[0, 1:] - C[0, :-1]).abs().amax() > 1e-3
    assert (C < 0).any(), "some coefficients must be negative for the supervised ReLU to matter"


def test_ssl_relu_only_in_supervised_mode():
    model = make_vit("plain")
    x = make_images(model, 2)
    e = vx.explain(model, x, method="daam", mode="ssl")
    a, v, C, _ = daam_captures(vx.ViTAdapter(model), x, None, "ssl")
    S = spatial_features(a, v)
    torch.testing.assert_close(e.extras["block_maps"].flatten(2), block_maps(S, C, 1, "ssl"))
    assert (block_maps(S, C, 1, "ssl") - block_maps(S, C, 1, "supervised")).abs().max() > 1e-6


@pytest.mark.parametrize("layout", ["plain", "registers", "distilled", "nonsquare"])
def test_ssl_with_bank_matches_literal(layout):
    model = make_vit(layout)
    bank = synthetic_bank(model)
    x = make_images(model, 3, seed=1)
    e8 = vx.explain(model, x, method="daam", mode="ssl", memory_bank=bank, k=5, output="uint8")
    ef = vx.explain(model, x, method="daam", mode="ssl", memory_bank=bank, k=5)
    cams, blocks, _, labels = literal_ssl(model, x, bank, k=5)
    assert torch.equal(e8.targets, labels) and torch.equal(ef.targets, labels)
    assert torch.equal(e8.flow, cams)
    torch.testing.assert_close(ef.extras["block_maps"], blocks, atol=1e-12, rtol=1e-9)
    assert_structured(ef.maps)


def test_headless_ssl_and_bank_round_trip(tmp_path):
    model = make_vit("registers", num_classes=0)
    bank = synthetic_bank(model, n=30, classes=3)
    assert bank.features.shape == (30, model.embed_dim)
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(30, dtype=torch.float64))
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = MemoryBank.load(path)
    assert torch.equal(loaded.features, bank.features) and torch.equal(loaded.labels, bank.labels)
    assert loaded.labels.dtype == torch.int64
    x = make_images(model, 2, seed=3)
    by_path = vx.explain(model, x, method="daam", mode="ssl", memory_bank=str(path), k=7)
    by_obj = vx.explain(model, x, method="daam", mode="ssl", memory_bank=bank, k=7)
    assert by_obj.logits is None
    assert torch.equal(by_path.flow, by_obj.flow) and torch.equal(by_path.targets, by_obj.targets)
    cams, _, _, labels = literal_ssl(model, x, bank, k=7)
    assert torch.equal(by_obj.targets, labels)
    e8 = vx.explain(model, x, method="daam", mode="ssl", memory_bank=bank, k=7, output="uint8")
    assert torch.equal(e8.flow, cams)
    # no bank: self-neighbour fallback, targets -1
    nb = vx.explain(model, x, method="daam", mode="ssl")
    assert torch.equal(nb.targets, torch.tensor([-1, -1]))
    assert torch.isfinite(nb.flow).all()
    with pytest.raises(vx.UnsupportedModelError, match="headless"):
        vx.explain(model, x, method="daam")


def test_bank_build_from_dataloader_and_errors(tmp_path):
    model = make_vit("plain", num_classes=0)
    imgs = make_images(model, 10, seed=2)
    labels = torch.arange(10) % 3
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(imgs, labels), batch_size=4)
    a = MemoryBank.build(model, dl)
    b = MemoryBank.build(model, imgs, labels, batch_size=3)
    torch.testing.assert_close(a.features, b.features)
    assert torch.equal(a.labels, b.labels)
    with torch.no_grad():
        torch.testing.assert_close(a.features, F.normalize(model(imgs), dim=1))
    with pytest.raises(ValueError, match="labels are required"):
        MemoryBank.build(model, imgs)
    with pytest.raises(FileNotFoundError, match="no memory bank file"):
        MemoryBank.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        MemoryBank.load(bad)
    from safetensors.torch import save_file
    save_file({"features": torch.randn(4, 3)}, str(tmp_path / "nolabels.safetensors"))
    with pytest.raises(ValueError, match="lacks"):
        MemoryBank.load(tmp_path / "nolabels.safetensors")
    save_file({"features": torch.randn(4, 3), "labels": torch.zeros(5, dtype=torch.int64)},
              str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(ValueError, match="malformed"):
        MemoryBank.load(tmp_path / "mismatch.safetensors")
    with pytest.raises(FileNotFoundError):
        vx.explain(model, imgs[:1], method="daam", mode="ssl", memory_bank=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_weights_match_contri_weight_generate(k):
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(60, 16, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (60,), generator=g)
    bank = MemoryBank(feats, labels)
    f = torch.randn(4, 16, generator=g, dtype=torch.float64) * 3
    w, pred = bank.weights(f, k=k, temperature=0.07)
    assert w.shape == (4, 16) and pred.shape == (4,)
    for i in range(4):
        wr, lr = contri_weight_generate(f[i:i + 1], feats.t(), labels, k=k, T=0.07, num_classes=5)
        torch.testing.assert_close(w[i], wr, atol=1e-14, rtol=1e-12)
        assert int(pred[i]) == lr
        assert w[i].min() == 0 and w[i].max() == 1
    # dividing by |Σp| does not change the min-max result
    fn = F.normalize(f[:1], dim=1)[0]
    p = fn * feats[:3].mean(0)
    torch.testing.assert_close(max_min_normal(contribution_weight(p)), max_min_normal(p), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("display", ["nonlinear", "linear"])
@pytest.mark.parametrize("output", ["float", "uint8"])
def test_degenerate_all_zero_gives_zeros(display, output):
    n, acc = display_maps(torch.zeros(2, 3, 12, dtype=torch.float64), display, output)
    assert (n == 0).all() and (acc == 0).all()
    # a model whose target logit does not depend on the image: every coefficient and block map is 0
    model = make_vit("plain")
    with torch.no_grad():
        model.head.weight.zero_()
    x = make_images(model, 2)
    e = vx.explain(model, x, method="daam", display=display, output=output)
    assert (e.extras["block_maps"] == 0).all()
    assert torch.isfinite(e.flow.double()).all() and (e.flow == 0).all()


def test_fused_on_off_and_float32():
    a, b = make_vit("registers", fused=False), make_vit("registers", fused=True)
    x = make_images(a, 2)
    ea, eb = vx.explain(a, x, method="daam"), vx.explain(b, x, method="daam")
    torch.testing.assert_close(ea.flow, eb.flow, atol=1e-12, rtol=1e-10)
    e32 = vx.explain(copy.deepcopy(a).float(), x.float(), method="daam", target=ea.targets)
    assert e32.flow.dtype == torch.float32
    assert_maps_close(e32.extras["block_maps"].flatten(0, 1), ea.extras["block_maps"].flatten(0, 1), atol=1e-4)


def test_refusals_and_options():
    x = make_images(make_vit("plain"), 1)
    with pytest.raises(vx.UnsupportedModelError, match="scale_norm"):
        vx.explain(make_vit("plain", scale_attn_norm=True), x, method="daam")
    with pytest.raises(vx.UnsupportedModelError, match="no class token"):
        vx.explain(make_vit("plain", class_token=False, global_pool="avg"), x, method="daam")
    with pytest.raises(vx.UnsupportedModelError, match="headless"):
        vx.explain(make_vit("plain", num_classes=0), x, method="daam", mode="supervised")
    with pytest.raises(ValueError, match="only used with mode='ssl'"):
        vx.explain(make_vit("plain"), x, method="daam", memory_bank="bank.safetensors")
    for bad in ({"k": 0}, {"temperature": 0.0}, {"display": "gamma"}, {"output": "png"}, {"mode": "dino"}):
        with pytest.raises(ValueError):
            vx.explain(make_vit("plain"), x, method="daam", **bad)
    # a GAP head is fine for DAAM: ordinary autograd reaches every block's CLS row through the later blocks
    e = vx.explain(make_vit("plain", global_pool="avg"), make_images(make_vit("plain"), 2), method="daam")
    assert torch.isfinite(e.flow).all()


# ----------------------------------------------------------------------------------------- layouts beyond LAYOUTS
EXTRA, _extra = EXTRA_LAYOUTS, extra_model_and_images


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("name,base,kw,size", EXTRA, ids=[e[0] for e in EXTRA])
def test_extra_layouts_match_literal(name, base, kw, size, backend):
    model, x = _extra(base, kw, size, 2)
    grid = vx.ViTAdapter(model).grid_for(*x.shape[-2:])
    L = len(model.blocks)
    e8 = vx.explain(model, x, method="daam", output="uint8", backend=backend)
    ef = vx.explain(model, x, method="daam", backend=backend)
    cams, blocks, labels = literal_on_grid(model, x, grid, non_liear_mapping=True)
    assert e8.flow.shape == (2, L, *grid)
    assert torch.equal(e8.targets, labels) and torch.equal(e8.flow, cams)
    assert_structured(ef.extras["block_maps"][:, -1])
    torch.testing.assert_close(ef.extras["block_maps"], blocks, atol=1e-12, rtol=1e-9)
    one = vx.explain(model, x[1:], method="daam", backend=backend)
    torch.testing.assert_close(one.flow[0], ef.flow[1], atol=1e-12, rtol=1e-9)
    # SSL with a kNN bank
    bank = synthetic_bank(model)
    s8 = vx.explain(model, x, method="daam", mode="ssl", memory_bank=bank, k=5, output="uint8", backend=backend)
    cams, blocks, labels = literal_on_grid(model, x, grid, ssl=True, bank=bank, k=5)
    assert torch.equal(s8.targets, labels) and torch.equal(s8.flow, cams)
