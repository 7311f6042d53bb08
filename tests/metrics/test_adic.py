"""Average Drop / Increase in Confidence: each convention against a literal port of its reference in tests/ports/
(T-TAME `get_masked_inputs` + `get_AD`/`get_IC`; vitcam `average_drop_increase` with PIL bicubic; openvino_xai's
`ADCC.average_drop`; aimagelab's `average_drop`), pytorch-grad-cam's DropInConfidence / IncreaseInConfidence, batched
against per-image."""
import numpy as np
import pytest
import torch
from metric_utils import assert_batched_equals_per_image, cnn_and_images, per_image, token_maps, vit_and_images
from ports.metrics_aimagelab import aimagelab_average_drop
from ports.metrics_openvino import openvino_average_drop
from ports.metrics_ttame import get_AD, get_IC, get_masked_inputs, normalizeMinMax
from ports.metrics_vitcam import pil_bicubic, vitcam_average_drop_increase_port

from vitx_fast.metrics import average_drop_increase, prepare_maps
from vitx_fast.metrics.adic import drop_increase, explanation_maps, quantile_mask

IMNET_MEAN, IMNET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---- T-TAME (src/tame/metrics.py), ported in tests/ports/metrics_ttame.py -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ttame_matches_port(dtype):
    model, x = vit_and_images(dtype, batch=4)
    maps = token_maps(4, 4, 4, dtype=dtype)
    ours = average_drop_increase(model, x, maps, mean=IMNET_MEAN, std=IMNET_STD)
    with torch.no_grad():
        logits = model(x).softmax(dim=1)
        chosen_logits, model_truth = logits.max(dim=1)
        masks = normalizeMinMax(maps.clone()[:, None])
        masked = get_masked_inputs(x, masks, 32, [0.0, 0.5, 0.85], IMNET_MEAN, IMNET_STD)
        new = [model(m).softmax(dim=1).gather(1, model_truth.unsqueeze(-1)).squeeze() for m in masked]
    tol = 1e-7 if dtype == torch.float64 else 1e-4  # percent (float32 round-off); both min-max eps are 1e-10
    for j in range(3):
        assert ours["average_drop"][:, j].mean().item() == pytest.approx(get_AD(chosen_logits, new[j]).item(), abs=tol)
        assert ours["increase_in_confidence"][:, j].mean().item() == pytest.approx(get_IC(chosen_logits, new[j]).item())
        assert torch.allclose(ours["explanation_prob"][:, j], new[j], atol=tol / 100)
    assert torch.equal(ours["targets"], model_truth) and ours["average_drop"].shape == (4, 3)
    assert ours["keep"].tolist() == [100, 50, 15]


def test_quantile_mask_is_soft_and_uses_torch_quantile():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 10, 10, generator=g, dtype=torch.float64)
    m[1, :5] = 0.25  # ties at the threshold
    for q in (0.5, 0.85, 0.33):
        got = quantile_mask(m, q)
        thr = torch.quantile(m.flatten(1), q, dim=1)
        for i in range(2):
            keep = m[i] >= thr[i]  # ">= keeps its soft value"
            assert torch.equal(got[i][keep], m[i][keep]) and (got[i][~keep] == 0).all()
    assert torch.equal(quantile_mask(m, 0.0), m)
    flat = torch.full((1, 4, 4), 0.7, dtype=torch.float64)
    assert torch.equal(quantile_mask(flat, 0.85), flat)  # nothing is below the threshold of a flat map


# ---- vitcam (src/vit_recipro_cam_metric.py average_drop_increase), ported in tests/ports/metrics_vitcam.py --------
def test_vitcam_matches_port_and_pil_bicubic():
    model, x = vit_and_images(torch.float64, batch=3)
    maps = token_maps(3, 4, 4)
    labels = torch.tensor([2, 0, 5])
    cams = prepare_maps(maps, (4, 4))  # the h x w min-max maps vitcam's generator returns
    ref_drop, ref_inc, ref_e = vitcam_average_drop_increase_port(model, x, labels, cams, 32, 32)
    ours = average_drop_increase(model, x, maps, labels, convention="vitcam")
    m = explanation_maps(maps, (32, 32), "vitcam")
    assert torch.allclose(m, torch.cat([pil_bicubic(c, 32, 32) for c in cams]).double(), atol=1e-6)
    assert m.max() > 1.0 or m.min() < 0.0  # PIL bicubic overshoots [0, 1] here
    assert torch.allclose(ours["average_drop"] / 100, ref_drop, atol=1e-5)
    assert torch.equal(ours["increase_in_confidence"] > 0, ref_inc)


def test_vitcam_matches_gradcam_confidence_change():
    cam_mult = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model, x = vit_and_images(torch.float32, batch=3)
    maps = token_maps(3, 4, 4, dtype=torch.float32)
    labels = torch.tensor([1, 1, 6])
    ours = average_drop_increase(model, x, maps, labels, convention="vitcam")
    cams = explanation_maps(maps, (32, 32), "vitcam").numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in labels]
    drop = cam_mult.DropInConfidence()(x, cams, targets, model)  # max(Y - O, 0), not divided by Y
    inc = cam_mult.IncreaseInConfidence()(x, cams, targets, model)
    assert np.abs(ours["average_drop"].numpy() / 100 * ours["prob"].numpy() - drop).max() < 1e-6
    assert np.array_equal(ours["increase_in_confidence"].numpy() / 100, inc)


# ---- openvino_xai ADCC.average_drop (raw image times the image-resolution map) ----------------------------------
def test_openvino_matches_port():
    model, x = vit_and_images(torch.float64, batch=2)
    maps = token_maps(2, 4, 4)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.3, 0.25)
    mu, sd = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1), torch.tensor(std, dtype=torch.float64).view(3, 1, 1)

    def model_predict(raw):
        with torch.no_grad():
            t = ((torch.from_numpy(raw).permute(2, 0, 1) - mu) / sd)[None]
            return torch.softmax(model(t), -1)[0].numpy()

    ours = average_drop_increase(model, x, maps, None, convention="openvino", mean=mean, std=std)
    sal = prepare_maps(maps, (32, 32)).numpy()
    for i in range(2):
        input_image = (x[i] * sd + mu).permute(1, 2, 0).numpy()
        avgdrop = openvino_average_drop(model_predict, sal[i], input_image)
        assert ours["average_drop"][i].item() / 100 == pytest.approx(avgdrop, abs=1e-10)


def test_drop_increase_edge_cases_and_options():
    y = torch.tensor([0.5, 0.0, 0.4, 0.3])
    o = torch.tensor([0.5, 0.2, 0.1, 0.6])
    drop, inc = drop_increase(y, o)
    assert drop.tolist() == pytest.approx([0.0, 0.0, 75.0, 0.0])  # Y = 0: nan_to_num gives 0
    assert inc.tolist() == [0.0, 100.0, 0.0, 100.0]  # O == Y is not an increase
    model, x = vit_and_images(torch.float64, batch=2)
    maps = token_maps(2, 4, 4)
    one = average_drop_increase(model, x, maps, keep=15, mean=0.5, std=0.5)
    many = average_drop_increase(model, x, maps, keep=(100, 15), mean=0.5, std=0.5)
    assert one["average_drop"].shape == (2,) and many["average_drop"].shape == (2, 2)
    assert torch.allclose(one["average_drop"], many["average_drop"][:, 1])
    with pytest.raises(ValueError):
        average_drop_increase(model, x, maps, keep=50, convention="vitcam")
    with pytest.raises(ValueError):
        average_drop_increase(model, x, maps, convention="gradcam")
    with pytest.raises(ValueError):  # pixel-space conventions need the normalisation (no pretrained_cfg here)
        average_drop_increase(model, x, maps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("convention", ["ttame", "vitcam", "openvino"])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_batched_equals_per_image(dtype, convention, kind):
    model, x = vit_and_images(dtype, 3, layout="nonsquare") if kind == "vit" else cnn_and_images(dtype, 3, (24, 20))
    maps = token_maps(3, 3, 5, dtype=dtype, ties=True)
    kw = dict(convention=convention, mean=0.5, std=0.5)
    batched = average_drop_increase(model, x, maps, None, **kw)
    singles = per_image(lambda i, m, t, **k: average_drop_increase(model, i, m, t, **k), x, maps, **kw)
    tol = 1e-10 if dtype == torch.float64 else 2e-3  # percent
    assert_batched_equals_per_image(batched, singles, tol)
    assert_batched_equals_per_image(batched, [average_drop_increase(model, x, maps, None, batch_size=2, **kw)], tol)


def test_clean_score_top1_matches_aimagelab_average_drop():
    """aimagelab/ADCC metrics/average_drop.py: Y = the clean top-1 probability, O = the probability of class_idx on
    the explanation map (image * saliency_map in normalised space, as its image_utils builds it)."""
    model, x = vit_and_images(torch.float64, batch=3)
    maps = token_maps(3, 4, 4)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    labels = (pred + 1) % 7  # a class that is not the prediction
    ours = average_drop_increase(model, x, maps, labels, convention="vitcam", clean_score="top1")
    e = x * explanation_maps(maps, (32, 32), "vitcam")[:, None]
    for i in range(3):
        ref = aimagelab_average_drop(model, x[i:i + 1], e[i:i + 1], labels[i].item())
        assert ours["average_drop"][i].item() / 100 == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError):
        average_drop_increase(model, x, maps, labels, convention="vitcam", clean_score="max")
