"""ABPC against a literal port of AGCAM's `ABPC.py` (11 steps, topk ties, normalised-space zeroing, GT class), Quantus'
PixelFlipping where the definitions coincide (fixed pixel counts per step, baseline 0), batched against per-image."""
import numpy as np
import pytest
import torch
from metric_utils import assert_batched_equals_per_image, cnn_and_images, per_image, token_maps, vit_and_images
from ports.metrics_agcam import abpc_port

from vitx_fast.metrics import abpc, prepare_maps
from vitx_fast.metrics.abpc import abpc_keep_masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_abpc_matches_agcam_port(dtype, ties):
    model, x = vit_and_images(dtype, batch=3)
    maps = token_maps(3, 4, 4, dtype=dtype, ties=ties)
    labels = torch.tensor([0, 3, 6])  # the GT class, whatever the prediction
    with torch.no_grad():
        ours = abpc(model, x, maps, labels)
        vis = prepare_maps(maps, (32, 32))
        for i in range(3):
            morf, lerf = abpc_port(model, x[i:i + 1], vis[i:i + 1], labels[i])
            tol = 1e-10 if dtype == torch.float64 else 2e-6
            assert np.abs(ours["morf_curve"][i].double().numpy() - morf).max() < tol
            assert np.abs(ours["lerf_curve"][i].double().numpy() - lerf).max() < tol
            assert ours["abpc"][i].item() == pytest.approx(lerf.mean() - morf.mean(), abs=tol)
    assert torch.allclose(ours["abpc"], ours["auc_lerf"] - ours["auc_morf"])
    assert torch.equal(ours["morf_curve"][:, 0], ours["lerf_curve"][:, 0])  # frac 0 and 1 coincide
    assert torch.equal(ours["morf_curve"][:, -1], ours["lerf_curve"][:, -1])


def test_step_counts_and_tie_order_follow_the_reference():
    # k = int(H * W * i / 10) equals the reference's int(base * scope[i]) for the literal scope list
    scope = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    for hw in (224 * 224, 32 * 32, 24 * 40, 1000):
        assert [int(hw * (i / 10)) for i in range(11)] == [int(hw * s) for s in scope]
    maps = torch.full((1, 6, 6), 0.5)
    maps[0, :2] = 1.0
    keep = abpc_keep_masks(maps, 11)
    key = maps.reshape(1, -1) + 1.0
    for i in range(11):
        k = int(36 * i / 10)
        expected = torch.ones(36, dtype=torch.bool)
        expected[torch.topk(key, k).indices[0]] = False
        assert torch.equal(keep[0, i, 0], expected)
        assert keep[0, i, 0].sum() == 36 - k and keep[1, i, 0].sum() == 36 - k


def test_abpc_matches_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    # 40 x 48 = 1920 pixels. Quantus ranks the channel-broadcast attribution (3 equal entries per pixel) and perturbs
    # features_in_step = 192 entries = 64 whole pixels per step: ABPC with 31 steps removes k_i = 64 i pixels.
    model, x = vit_and_images(torch.float32, batch=2, layout="big_grid")
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(2, 40, 48, generator=g)  # image-size maps with distinct values: no ties to resolve
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        ours = abpc(model, x, maps, labels, steps=31)
    m01 = prepare_maps(maps, (40, 48))
    for sign, key in ((1.0, "morf_curve"), (-1.0, "lerf_curve")):
        metric = quantus.PixelFlipping(features_in_step=192, perturb_baseline=0.0, normalise=False, abs=False,
                                       disable_warnings=True, display_progressbar=False)
        curve = metric(model=model, x_batch=x.numpy(), y_batch=labels.numpy(), a_batch=(sign * m01[:, None]).numpy(),
                       softmax=True, device="cpu")
        assert np.abs(np.asarray(curve) - ours[key][:, 1:].numpy()).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_abpc_batched_equals_per_image(dtype, kind):
    model, x = vit_and_images(dtype, 3, layout="nonsquare") if kind == "vit" else cnn_and_images(dtype, 3, (24, 20))
    maps = token_maps(3, 3, 5, dtype=dtype, ties=True)
    batched = abpc(model, x, maps, None, steps=7)
    singles = per_image(lambda i, m, t, **k: abpc(model, i, m, t, **k), x, maps, steps=7)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 convolutions round differently per batch size
    assert_batched_equals_per_image(batched, singles, tol)
    assert_batched_equals_per_image(batched, [abpc(model, x, maps, None, steps=7, batch_size=2)], tol)
    assert batched["morf_curve"].shape == (3, 7) and torch.equal(batched["targets"], batched["prediction"])
    with pytest.raises(ValueError):
        abpc(model, x, maps, None, steps=1)
