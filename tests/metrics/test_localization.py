"""Localization against literal ports of AGCAM's `getBoudingBox_multi` + `box_to_seg` (OpenCV contours) and its
`localization.py` loop; hand-computed masks and counts; the pointing game against openvino_xai's rule and Quantus."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitx_fast.metrics import boxes_to_mask, localization, pointing_game
from vitx_fast.metrics.localization import component_boxes, contour_box_masks

cv2 = pytest.importorskip("cv2")
from ports.metrics_agcam import agcam_localization, agcam_pred_mask, box_to_seg
from ports.metrics_openvino import openvino_pointing_game


def synthetic_maps(h=40, w=48):
    """Blobs, a ring with a blob in its hole, border blobs, diagonal-only contacts, an empty map, exact 0.5 values,
    a constant map and thresholded noise (many components)."""
    maps = torch.zeros(8, h, w, dtype=torch.float64)
    maps[0, 2:6, 3:9] = 1
    maps[0, 20:30, 30:33] = 0.8
    maps[0, 12, 40] = 0.9
    maps[1, 5:25, 5:25] = 1  # ring
    maps[1, 8:22, 8:22] = 0
    maps[1, 12:15, 12:15] = 0.7  # nested component inside the hole
    maps[2, 0:5, 0:7] = 1  # touching the top-left corner
    maps[2, h - 4:h, w - 3:w] = 1  # bottom-right corner: the +1 extension is clipped
    maps[2, 15:20, 0] = 1
    for k in range(6):  # a diagonal chain: one 8-connected component
        maps[3, 10 + k, 10 + k] = 1
    maps[3, 30, 5] = 1
    maps[3, 31, 7] = 1  # two apart: separate components
    # maps[4] stays empty
    maps[5, 3:9, 3:9] = 0.5  # exactly the threshold: not foreground (strict)
    maps[5, 20:22, 20:30] = 1
    maps[6] = 0.3  # constant
    g = torch.Generator().manual_seed(0)
    maps[7] = torch.rand(h, w, generator=g, dtype=torch.float64)
    return maps


def test_contour_box_masks_match_opencv_port():
    maps = synthetic_maps()
    ours = contour_box_masks(maps, 0.5)
    for i in range(maps.shape[0]):
        ref = agcam_pred_mask(maps[i].float()).bool()
        assert torch.equal(ours[i], ref), (i, (ours[i] ^ ref).sum().item())
    assert not ours[4].any() and not ours[6].any()


def test_hand_computed_boxes():
    m = torch.zeros(2, 8, 8)
    m[0, 3, 5] = 1  # box (5, 3, 6, 4) filled inclusively: rows 3..4, cols 5..6
    m[1, 7, 7] = 1  # box (7, 7, 8, 8): the extension falls outside, only the pixel remains
    m[1, 0, 0] = 1
    m[1, 1, 1] = 1  # diagonal neighbour: one component with box (0, 0, 2, 2) -> rows/cols 0..2
    got = contour_box_masks(m, 0.5)
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[0, 3:5, 5:7] = True
    expected[1, 7, 7] = True
    expected[1, 0:3, 0:3] = True
    assert torch.equal(got, expected)
    bi, x, y, w, h = component_boxes(m > 0.5)
    assert sorted(zip(bi.tolist(), x.tolist(), y.tolist(), w.tolist(), h.tolist(), strict=True)) == \
        [(0, 5, 3, 1, 1), (1, 0, 0, 2, 2), (1, 7, 7, 1, 1)]


def test_eps_formulas_on_known_counts():
    maps = torch.zeros(1, 4, 4, dtype=torch.float64)
    maps[0, 0:2, 0:2] = 1  # box (0, 0, 2, 2) -> predicted rows/cols 0..2: 9 pixels
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, 1:4, 1:4] = True  # 9 pixels, overlap 4
    r = localization(maps, gt)
    assert (r["tp"].item(), r["fp"].item(), r["fn"].item(), r["tn"].item()) == (4, 5, 5, 2)
    e = 1e-5
    assert r["pixel_accuracy"].item() == pytest.approx((6 + e) / (16 + e), rel=1e-15)
    assert r["iou"].item() == pytest.approx((4 + e) / (14 + e), rel=1e-15)
    assert r["dice"].item() == pytest.approx((8 + e) / (18 + e), rel=1e-15)
    assert r["precision"].item() == pytest.approx((4 + e) / (9 + e), rel=1e-15)
    assert r["recall"].item() == pytest.approx((4 + e) / (9 + e), rel=1e-15)
    empty = localization(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))  # constant map, no GT
    assert empty["iou"].item() == pytest.approx(1.0) and empty["pixel_accuracy"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("grid,size", [((14, 14), (224, 224)), ((4, 4), (32, 32)), ((3, 5), (24, 40))])
def test_localization_matches_agcam_loop(grid, size):
    g = torch.Generator().manual_seed(grid[0] * 7 + size[1])
    cams = torch.rand(3, *grid, generator=g)
    boxes = [torch.tensor([[1, 2, size[1] // 2, size[0] // 3]]), torch.tensor([[0, 0, size[1] - 1, size[0] - 1]]),
             torch.tensor([[3, 3, 9, 12], [size[1] // 2, size[0] // 2, size[1] - 2, size[0] - 5]])]
    gt = boxes_to_mask(boxes, size)
    ours = localization(cams, gt)
    for i in range(3):
        ref = agcam_localization(cams[i], boxes[i], size)
        for k, v in ref.items():
            assert ours[k][i].item() == pytest.approx(v.item(), abs=1e-6), (k, i)
    single = [localization(cams[i:i + 1], gt[i:i + 1]) for i in range(3)]
    for k in ("iou", "dice", "precision", "recall", "pixel_accuracy", "tp", "pred_masks"):
        assert torch.equal(ours[k], torch.cat([s[k] for s in single])), k


def test_boxes_to_mask_scaling_like_agcam_dataset():
    # ILSVRC.py: int(xmin / width * 224), ...; then box_to_seg with inclusive ends
    width, height = 500, 375
    xml = [(48, 240, 195, 371), (8, 12, 499, 374), (250, 1, 251, 3)]
    ref = box_to_seg(torch.tensor([(int(a / width * 224), int(b / height * 224), int(c / width * 224),
                                    int(d / height * 224)) for a, b, c, d in xml]))
    ours = boxes_to_mask([xml], 224, orig_size=[(width, height)])
    assert torch.equal(ours[0], ref.bool())
    xywh = boxes_to_mask([[(2, 3, 4, 5)], []], (10, 12), box_format="xywh")
    assert xywh[0, 3:9, 2:7].all() and xywh[0].sum() == 6 * 5 and not xywh[1].any()


def test_pointing_game_matches_openvino_rule_and_quantus():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(5, 16, 16, generator=g, dtype=torch.float64)
    maps[1, 2, 3] = 5.0
    maps[1, 12, 12] = 5.0  # two maxima, the second inside the box
    maps[3, 0, 15] = 9.0  # maximum on the box edge (inclusive)
    boxes = [[(1, 1, 5, 5)], [(10, 10, 3, 3)], [(0, 0, 15, 15)], [(12, 0, 3, 4)], []]
    gt = boxes_to_mask(boxes, 16, box_format="xywh")
    ours = pointing_game(maps, gt)
    for i in range(4):
        assert ours["pointing_game"][i].item() == openvino_pointing_game(maps[i].numpy(), boxes[i])
    assert ours["pointing_game"][1] == 1 and ours["pointing_game"][3] == 1
    assert torch.isnan(ours["pointing_game"][4]) and not ours["valid"][4]
    quantus = pytest.importorskip("quantus")
    metric = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True, display_progressbar=False)
    q = metric(model=None, x_batch=np.zeros((4, 3, 16, 16), np.float32), y_batch=np.zeros(4, int),
               a_batch=maps[:4, None].numpy(), s_batch=gt[:4, None].numpy().astype(np.float32))
    assert [float(v) for v in q] == ours["pointing_game"][:4].tolist()
    # token-grid maps are upsampled bilinearly to the mask size before the maximum is taken
    small = torch.zeros(1, 4, 4, dtype=torch.float64)
    small[0, 3, 0] = 1
    up = F.interpolate(small[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    gt_up = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt_up[0, 14:, 0:2] = True
    assert pointing_game(small, gt_up)["pointing_game"].item() == pointing_game(up, gt_up)["pointing_game"].item() == 1
