"""ADCC: the published ViT-ReciproCAM table values as test vectors; the components against the literal ports
(tests/ports/) of vitcam's `ADCC` (PIL bicubic, raw 14x14-style maps, second explanation run) and openvino_xai's
`ADCC.__call__` / `evaluate`; undefined coherency; batched against per-image."""
import pytest
import torch
from metric_utils import assert_batched_equals_per_image, per_image, token_maps, vit_and_images
from ports.metrics_openvino import openvino_adcc_call, openvino_adcc_evaluate
from ports.metrics_vitcam import vitcam_adcc_port

import vitx_fast as vx
from vitx_fast.metrics import adcc, adcc_score, prepare_maps

# (Drop, Coher, Compl) -> ADCC, ViT-ReciproCAM tables; the last row is the official notebook's
TABLE = [((25.82, 88.61, 46.35), 69.11), ((27.69, 84.58, 41.16), 70.34), ((33.57, 70.22, 53.54), 59.03),
         ((55.31, 79.41, 13.17), 64.53), ((55.85, 80.67, 12.53), 64.54), ((31.42, 67.62, 54.21), 58.58),
         ((15.18, 83.77, 45.08), 71.54)]


@pytest.mark.parametrize("components,expected", TABLE)
def test_adcc_score_reproduces_the_table(components, expected):
    drop, coh, com = components
    assert adcc_score(drop, coh, com).item() == pytest.approx(expected, abs=0.01)


def test_adcc_score_vectorised_and_zero_components():
    drops = torch.tensor([row[0][0] for row in TABLE])
    cohs = torch.tensor([row[0][1] for row in TABLE])
    coms = torch.tensor([row[0][2] for row in TABLE])
    assert torch.allclose(adcc_score(drops, cohs, coms), torch.tensor([row[1] for row in TABLE]).double(), atol=0.01)
    assert adcc_score(20.0, 0.0, 40.0).item() == 0.0  # coherency 0
    assert adcc_score(100.0, 80.0, 40.0).item() == 0.0  # 1 - AD = 0
    assert adcc_score(20.0, 80.0, 100.0).item() == 0.0  # 1 - complexity = 0


def reciprocam_fn(model):
    return lambda images, targets: vx.explain(model, images, method="reciprocam", target=targets).maps


def minmax(t):
    return (t - t.min()) / (t.max() - t.min())


def test_vitcam_convention_matches_port():
    model, x = vit_and_images(torch.float64, batch=3)
    labels = torch.tensor([3, 0, 6])
    fn = reciprocam_fn(model)
    maps = fn(x, labels)
    ours = adcc(model, x, maps, labels, fn)

    def cam_generator(image, class_id):  # ViTReciproCam returns the min-max normalised h x w map
        return minmax(fn(image, torch.tensor([class_id]))[0])

    ref = vitcam_adcc_port(model, x, labels, cam_generator, 4, 4, 32, 32)
    got = [ours[k].mean().item() for k in ("average_drop", "increase_in_confidence", "coherency", "complexity")]
    assert got == pytest.approx(ref[:4], abs=1e-4)
    assert adcc_score(*[ours[k].mean() for k in ("average_drop", "coherency", "complexity")]).item() == \
        pytest.approx(ref[4], abs=1e-4)
    assert not ours["coherency_undefined"].any()


def test_openvino_convention_matches_port():
    model, x = vit_and_images(torch.float64, batch=2)
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
    mu = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    fn = reciprocam_fn(model)

    def model_predict(raw):
        with torch.no_grad():
            return torch.softmax(model(((torch.from_numpy(raw).permute(2, 0, 1) - mu) / sd)[None]), -1)[0].numpy()

    def explainer(raw, class_idx):  # image-resolution map of the raw image, as openvino_xai's explainer returns
        t = ((torch.from_numpy(raw).permute(2, 0, 1) - mu) / sd)[None]
        return prepare_maps(fn(t, torch.tensor([int(class_idx)])), (32, 32))[0].numpy()

    with torch.no_grad():
        tg = model(x).argmax(-1)
    maps = fn(x, tg)
    ours = adcc(model, x, maps, None, fn, convention="openvino", mean=mean, std=std)
    results = []
    for i in range(2):  # ADCC.__call__, then evaluate's means
        saliency_map = prepare_maps(maps[i:i + 1], (32, 32))[0].numpy()
        input_image = (x[i] * sd + mu).permute(1, 2, 0).numpy()
        coh, com, avgdrop = openvino_adcc_call(model_predict, explainer, saliency_map, input_image)
        results.append([coh, com, avgdrop])
        assert ours["coherency"][i].item() / 100 == pytest.approx(coh, abs=1e-9)
        assert ours["complexity"][i].item() / 100 == pytest.approx(com, abs=1e-9)
        assert ours["average_drop"][i].item() / 100 == pytest.approx(avgdrop, abs=1e-9)
    ref = openvino_adcc_evaluate(results)
    got = adcc_score(ours["average_drop"].mean(), ours["coherency"].mean(), ours["complexity"].mean())
    assert got.item() == pytest.approx(ref * 100, abs=1e-7)


def test_undefined_coherency_is_zero_and_flagged():
    model, x = vit_and_images(torch.float64, batch=2)
    maps = token_maps(2, 4, 4)

    def half_constant(images, targets):
        out = torch.rand(images.shape[0], 4, 4, dtype=images.dtype)
        out[0] = 0.7  # a constant map on E: the correlation is undefined
        return out

    ours = adcc(model, x, maps, None, half_constant)
    assert ours["coherency"][0] == 0 and ours["coherency_undefined"].tolist() == [True, False]
    assert 0 < ours["coherency"][1] < 100
    with pytest.raises(TypeError):
        adcc(model, x, maps, None, lambda i, t: "no maps")


@pytest.mark.parametrize("convention", ["vitcam", "openvino"])
def test_batched_equals_per_image(convention):
    model, x = vit_and_images(torch.float64, 3, layout="nonsquare")
    fn = reciprocam_fn(model)
    labels = torch.tensor([1, 2, 3])
    maps = fn(x, labels)
    kw = dict(explain_fn=fn, convention=convention, mean=0.5, std=0.5)
    batched = adcc(model, x, maps, labels, **kw)
    singles = per_image(lambda i, m, t, **k: adcc(model, i, m, t, **k), x, maps, labels, **kw)
    assert_batched_equals_per_image(batched, singles, 1e-8)
