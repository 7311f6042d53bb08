"""Metrics on non-square token-grid maps and batch size 1 (docs/metrics.md §1: the h x w map is upsampled
bilinearly, align_corners=False, to the input size, then min-max; batched results equal per-image ones): ABPC and
T-TAME AD/IC against their literal ports generalised to a non-square input, ROAD removal sets against numpy.percentile
on the upsampled map, insertion/deletion and localization against hand-built references, all on a 3 x 5 grid
(24 x 40 images) in float64."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from metric_utils import token_maps, vit_and_images
from ports.metrics_agcam import abpc_port

from vitx_fast.metrics import abpc, average_drop_increase, insertion_deletion, localization, prepare_maps, removal_masks

TTAME_EPS = 1e-10  # normalizeMinMax
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _case(batch):
    model, x = vit_and_images(torch.float64, batch=batch, layout="nonsquare", seed=batch)
    assert tuple(model.patch_embed.grid_size) == (3, 5) and x.shape[-2:] == (24, 40)
    return model, x, token_maps(batch, 3, 5, seed=batch)


def _bilinear_minmax(maps, size):
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    return (up - lo) / (hi - lo + 1e-12)  # the engine's documented min-max eps (docs/metrics.md §1)


@pytest.mark.parametrize("batch", [1, 3])
def test_prepare_maps_nonsquare(batch):
    maps = token_maps(batch, 3, 5)
    got = prepare_maps(maps, (24, 40))
    assert got.shape == (batch, 24, 40) and got.dtype == torch.float64
    torch.testing.assert_close(got, _bilinear_minmax(maps, (24, 40)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
def test_abpc_nonsquare_matches_port(batch):
    model, x, maps = _case(batch)
    labels = torch.arange(batch) * 2 % 7
    with torch.no_grad():
        ours = abpc(model, x, maps, labels)
        vis = _bilinear_minmax(maps, (24, 40))
        for i in range(batch):
            morf, lerf = abpc_port(model, x[i:i + 1], vis[i:i + 1], labels[i])
            assert np.abs(ours["morf_curve"][i].numpy() - morf).max() < 1e-10
            assert np.abs(ours["lerf_curve"][i].numpy() - lerf).max() < 1e-10


@pytest.mark.parametrize("batch", [1, 3])
def test_ttame_adic_nonsquare_matches_port(batch):
    """T-TAME get_masked_inputs with (H, W) instead of (img_size, img_size): min-max (eps 1e-10) at 3 x 5, bilinear,
    per-image torch.quantile, soft masks, pixel-space multiply."""
    model, x, maps = _case(batch)
    ours = average_drop_increase(model, x, maps, mean=MEAN, std=STD)
    m = torch.tensor(MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(STD, dtype=x.dtype).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(1)
        y, top = probs.max(1)
        flat = maps.flatten(1)
        lo, hi = flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]
        mm = ((maps - lo) / (hi - lo + TTAME_EPS))[:, None]
        up = F.interpolate(mm, size=(24, 40), mode="bilinear", align_corners=False)
        for j, q in enumerate((0.0, 0.5, 0.85)):
            thr = up.flatten(1).quantile(q, dim=1)[:, None, None, None]
            mask = up.masked_fill(up < thr, 0)
            o = model((mask * (x * s + m) - m) / s).softmax(1).gather(1, top[:, None])[:, 0]
            torch.testing.assert_close(ours["explanation_prob"][:, j], o, rtol=0, atol=1e-9)
            drop = torch.nan_to_num((y - o).clip(min=0) / y) * 100
            torch.testing.assert_close(ours["average_drop"][:, j], drop, rtol=0, atol=1e-7)
            assert torch.equal(ours["increase_in_confidence"][:, j], (o > y).double() * 100)
    assert torch.equal(ours["targets"], top)


@pytest.mark.parametrize("batch", [1, 3])
def test_road_removal_nonsquare(batch):
    maps = token_maps(batch, 3, 5, ties=True)
    m01 = prepare_maps(maps, (24, 40))
    pct = [10, 20, 30, 40, 50, 70, 90]
    for order in ("morf", "lerf"):
        got = removal_masks(m01, pct, order)
        assert got.shape == (len(pct), batch, 24, 40)
        for j, p in enumerate(pct):
            for i in range(batch):
                cam = m01[i].numpy() if order == "morf" else 1 - m01[i].numpy()
                keep = cam < np.percentile(cam, 100 - p)
                assert np.array_equal(got[j, i].numpy(), ~keep), (order, p, i)


@pytest.mark.parametrize("batch", [1, 3])
def test_insertion_deletion_nonsquare(batch):
    model, x, maps = _case(batch)
    steps = 6
    ours = insertion_deletion(model, x, maps, None, steps, baseline="mean")
    up = F.interpolate(maps[:, None], size=(24, 40), mode="bilinear", align_corners=False)[:, 0]
    with torch.no_grad():
        tg = model(x).argmax(1)
        for i in range(batch):
            order = np.argsort(-up[i].flatten().numpy(), kind="stable")
            ins, dele = [], []
            for k in range(steps + 1):
                n = int(k * 24 * 40 / steps)
                top = torch.zeros(24 * 40, dtype=torch.bool)
                top[torch.from_numpy(order[:n])] = True
                top = top.view(1, 1, 24, 40)
                ins.append(model(torch.where(top, x[i:i + 1], 0.0)).softmax(1)[0, tg[i]].item())
                dele.append(model(torch.where(top, 0.0, x[i:i + 1])).softmax(1)[0, tg[i]].item())
            auc = lambda c: (sum(c) - (c[0] + c[-1]) / 2) / steps  # noqa: E731
            assert ours["insertion"][i].item() == pytest.approx(auc(ins), abs=1e-10)
            assert ours["deletion"][i].item() == pytest.approx(auc(dele), abs=1e-10)


@pytest.mark.parametrize("batch", [1, 3])
def test_localization_nonsquare_batch(batch):
    maps = token_maps(batch, 3, 5, seed=4)
    gt = torch.zeros(batch, 24, 40, dtype=torch.bool)
    gt[:, 4:15, 6:30] = True
    out = localization(maps, gt)
    single = [localization(maps[i:i + 1], gt[i:i + 1]) for i in range(batch)]
    for k in ("iou", "dice", "precision", "recall", "pixel_accuracy", "tp", "fp", "fn", "tn"):
        assert torch.equal(out[k], torch.cat([s[k] for s in single])), k
    binary = _bilinear_minmax(maps, (24, 40)) > 0.5
    assert (out["pred_masks"] >= binary).all()  # every foreground pixel lies in its component's box
