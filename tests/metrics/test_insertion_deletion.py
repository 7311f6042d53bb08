"""Insertion / deletion AUC against a literal port of openvino_xai's `InsertionDeletionAUC.__call__` (raw black
canvas), Quantus' PixelFlipping (deletion curve), RISE's blur kernel; the trapezoid rule and step counts by hand."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from metric_utils import assert_batched_equals_per_image, cnn_and_images, per_image, token_maps, vit_and_images
from ports.metrics_openvino import openvino_insertion_deletion
from ports.metrics_vitcam import vitcam_dauc_iauc_port

from vitx_fast.metrics import insertion_deletion, prepare_maps
from vitx_fast.metrics.insertion_deletion import baseline_images, step_counts, trapezoid_auc

MEAN, STD = 0.5, 0.5


@pytest.mark.parametrize("maps_kind", ["image_distinct", "token_grid", "token_ties"])
def test_matches_openvino_port(maps_kind):
    model, x = vit_and_images(torch.float64, batch=2)
    ties = maps_kind != "image_distinct"  # bilinear upsampling of a token map already creates ties
    maps = token_maps(2, 4, 4, ties=maps_kind == "token_ties") if ties else torch.rand(2, 32, 32, dtype=torch.float64)
    ours = insertion_deletion(model, x, maps, None, steps=8, mean=MEAN, std=STD)
    sal = prepare_maps(maps, (32, 32)).numpy()

    def model_predict(raw):  # preprocess_fn = normalisation, postprocess_fn = softmax
        with torch.no_grad():
            t = torch.from_numpy((raw - MEAN) / STD).permute(2, 0, 1)[None]
            return torch.softmax(model(t), -1)[0].numpy()

    for i in range(2):
        raw = (x[i] * STD + MEAN).permute(1, 2, 0).numpy()
        # the documented order (docs/metrics.md §7) is a stable sort; openvino_xai's default (quicksort) argsort
        # agrees only without ties
        ins, dele, ins_c, del_c = openvino_insertion_deletion(model_predict, sal[i], int(ours["targets"][i]), raw, 8,
                                                              kind="stable" if ties else "quicksort")
        assert ours["insertion"][i].item() == pytest.approx(ins, abs=1e-10)
        assert ours["deletion"][i].item() == pytest.approx(dele, abs=1e-10)
        assert np.abs(ours["insertion_curve"][i].numpy() - ins_c).max() < 1e-10
        assert np.abs(ours["deletion_curve"][i].numpy() - del_c).max() < 1e-10
    assert torch.allclose(ours["delta"], ours["insertion"] - ours["deletion"])


def test_deletion_matches_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    model, x = vit_and_images(torch.float32, batch=2, layout="big_grid")  # 1920 pixels, 30 steps of 64
    maps = torch.rand(2, 40, 48, generator=torch.Generator().manual_seed(4))
    ours = insertion_deletion(model, x, maps, None, steps=30, mean=MEAN, std=STD)
    metric = quantus.PixelFlipping(features_in_step=192, perturb_baseline=(0 - MEAN) / STD, normalise=False,
                                   abs=False, disable_warnings=True, display_progressbar=False)
    curve = metric(model=model, x_batch=x.numpy(), y_batch=ours["targets"].numpy(),
                   a_batch=prepare_maps(maps, (40, 48))[:, None].numpy(), softmax=True, device="cpu")
    assert np.abs(np.asarray(curve) - ours["deletion_curve"][:, 1:].numpy()).max() < 1e-5


def test_trapezoid_and_step_counts_by_hand():
    curve = torch.tensor([[0.2, 0.4, 0.9, 0.5]], dtype=torch.float64)
    assert trapezoid_auc(curve).item() == pytest.approx((0.2 + 0.4 + 0.9 + 0.5 - (0.2 + 0.5) / 2) / 3, abs=1e-15)
    assert trapezoid_auc(curve).item() == pytest.approx(np.trapezoid(curve[0].numpy(), np.linspace(0, 1, 4)))
    assert trapezoid_auc(torch.full((2, 31), 0.37, dtype=torch.float64)).tolist() == pytest.approx([0.37, 0.37])
    assert step_counts(960, 7) == [0, 137, 274, 411, 548, 685, 822, 960]
    assert step_counts(1024, 30)[:4] == [0, 34, 68, 102]


class ConstantModel(nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 4, dtype=x.dtype) + x.sum() * 0


def test_constant_score_gives_that_auc_and_counts():
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    out = insertion_deletion(ConstantModel(), x, torch.rand(2, 3, 3, dtype=torch.float64), None, steps=6,
                             baseline="mean")
    assert torch.allclose(out["insertion"], torch.full((2,), 0.25, dtype=torch.float64))
    assert torch.allclose(out["deletion"], torch.full((2,), 0.25, dtype=torch.float64))
    assert out["counts"].tolist() == step_counts(120, 6)


def test_baselines():
    model, x = vit_and_images(torch.float32, batch=2)
    assert torch.equal(baseline_images(x, "mean"), torch.zeros_like(x))
    black = baseline_images(x, "black", mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    assert torch.allclose(black[:, :, 0, 0], torch.tensor([-2.0, -2.0, -2.0]).expand(2, 3))
    # RISE: blur = conv2d(x, gkern(11, 5), padding=5), gkern's per-channel kernel is gaussian_filter of an impulse
    from scipy.ndimage import gaussian_filter

    inp = np.zeros((11, 11))
    inp[5, 5] = 1
    k = gaussian_filter(inp, 5)
    kern = np.zeros((3, 3, 11, 11))
    kern[0, 0] = k
    kern[1, 1] = k
    kern[2, 2] = k
    ref = torch.nn.functional.conv2d(x, torch.from_numpy(kern.astype("float32")), padding=5)
    assert torch.allclose(baseline_images(x, "blur"), ref, atol=1e-6)
    with pytest.raises(ValueError):
        baseline_images(x, "white")
    with pytest.raises(ValueError):  # a model without pretrained_cfg: the black baseline needs mean/std
        insertion_deletion(model, x, torch.rand(2, 4, 4), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("baseline", ["black", "blur"])
def test_batched_equals_per_image(dtype, kind, baseline):
    model, x = vit_and_images(dtype, 3, layout="nonsquare") if kind == "vit" else cnn_and_images(dtype, 3, (24, 20))
    maps = token_maps(3, 3, 5, dtype=dtype, ties=True)
    kw = dict(steps=5, baseline=baseline, mean=MEAN, std=STD)
    batched = insertion_deletion(model, x, maps, None, **kw)
    singles = per_image(lambda i, m, t, **k: insertion_deletion(model, i, m, t, **k), x, maps, **kw)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_batched_equals_per_image(batched, singles, tol)
    assert_batched_equals_per_image(batched, [insertion_deletion(model, x, maps, None, batch_size=4, **kw)], tol)
    assert batched["insertion_curve"].shape == (3, 6)
    assert torch.allclose(batched["deletion_curve"][:, 0], batched["prob"])  # step 0 of deletion: the clean image


@pytest.mark.parametrize("size,grid", [((64, 96), (6, 8)), ((72, 64), (3, 3))])
def test_vitcam_convention_matches_port(size, grid):
    model, x = cnn_and_images(torch.float64, 3, size)
    maps = torch.rand(3, *grid, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    labels = torch.tensor([0, 2, 4])
    ours = insertion_deletion(model, x, maps, labels, convention="vitcam")
    dauc, iauc = vitcam_dauc_iauc_port(model, x, labels, maps, *size)
    assert np.abs(ours["deletion"].numpy() - dauc).max() < 1e-12
    assert np.abs(ours["insertion"].numpy() - iauc).max() < 1e-12
    n = int(size[0] / 32) * int(size[1] / 32)
    assert ours["deletion_curve"].shape == (3, n + 1)
    single = [insertion_deletion(model, x[i:i + 1], maps[i:i + 1], labels[i:i + 1], convention="vitcam")
              for i in range(3)]
    assert_batched_equals_per_image(ours, single, 1e-12)
