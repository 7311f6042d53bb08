"""Localization (AGCAM protocol: `localization.py`, `utils/bounding_box.py`) and the pointing game. See
docs/metrics.md §2.

Localization per image: the map, bilinear to the mask size and min-max, is binarised with `map > threshold`
(strict); every 8-connected foreground component gives its bounding box (x, y, w, h) -> (x, y, x + w, y + h), the
boxes OpenCV's findContours(RETR_EXTERNAL) + boundingRect return (a nested component's box lies inside its
parent's, so the union is the same); each box is filled with inclusive ends, seg[y0 : y1 + 1, x0 : x1 + 1] = 1,
which extends it one pixel right and down (clipped at the border). With tp, fp, fn, tn against the ground-truth mask
and eps = 1e-5: pixel accuracy (tp + tn + eps) / (n + eps), IoU (tp + eps) / (tp + fp + fn + eps), dice
(2tp + eps) / (2tp + fp + fn + eps), precision (tp + eps) / (tp + fp + eps), recall (tp + eps) / (tp + fn + eps).

The protocol explains the predicted class and skips misclassified images; that filtering is the caller's.
"""
from __future__ import annotations

import numpy as np
import torch

from vitx_fast.metrics._common import prepare_maps


def fill_boxes(batch: torch.Tensor, x0, y0, x1, y1, shape) -> torch.Tensor:
    """(B, H, W) bool mask, True on the union of the boxes [y0, y1] x [x0, x1] (inclusive ends, clipped) of image
    `batch[i]`. All arguments are (n,) integer tensors; built with a 2-D difference array, no per-box loop."""
    b, h, w = shape
    dev = batch.device
    x0, y0 = x0.long().clamp(0, w), y0.long().clamp(0, h)
    x1, y1 = (x1.long() + 1).clamp(0, w), (y1.long() + 1).clamp(0, h)  # exclusive ends
    ok = (x1 > x0) & (y1 > y0)
    bi, x0, y0, x1, y1 = batch.long()[ok], x0[ok], y0[ok], x1[ok], y1[ok]
    # float32 prefix sums are exact for these small integer counts and faster than integer cumsum on CPU
    d = torch.zeros(b, h + 1, w + 1, dtype=torch.float32, device=dev)
    one = torch.ones(bi.shape[0], dtype=torch.float32, device=dev)
    d.index_put_((bi, y0, x0), one, accumulate=True)
    d.index_put_((bi, y0, x1), -one, accumulate=True)
    d.index_put_((bi, y1, x0), -one, accumulate=True)
    d.index_put_((bi, y1, x1), one, accumulate=True)
    return d.cumsum(1).cumsum(2)[:, :h, :w] > 0.5


def component_boxes(binary: torch.Tensor):
    """Bounding boxes of the 8-connected foreground components of every (H, W) mask of binary (B, H, W).

    Returns (batch (n,), x (n,), y (n,), w (n,), h (n,)) int64, OpenCV boundingRect's (x, y, w, h) convention.
    Components are labelled by scipy.ndimage.label (3 x 3 structure within each image, none across the batch) and
    boxed by scipy.ndimage.find_objects, both over the whole batch at once.
    """
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside an image, none across the batch
    labels, n = ndimage.label(binary.detach().cpu().numpy().astype(bool), structure=structure)
    objs = ndimage.find_objects(labels)
    arr = np.array([(o[0].start, o[2].start, o[1].start, o[2].stop - o[2].start, o[1].stop - o[1].start)
                    for o in objs], dtype=np.int64).reshape(-1, 5)
    t = torch.from_numpy(arr).to(binary.device)
    return t[:, 0], t[:, 1], t[:, 2], t[:, 3], t[:, 4]


def contour_box_masks(maps01: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """AGCAM's predicted masks: (B, H, W) [0, 1] maps -> (B, H, W) bool union of the filled contour boxes of
    `map > threshold` (box (x, y, x + w, y + h) filled with inclusive ends)."""
    bi, x, y, w, h = component_boxes(maps01 > threshold)
    return fill_boxes(bi, x, y, x + w, y + h, maps01.shape)


def boxes_to_mask(boxes, size, orig_size=None, box_format: str = "xyxy") -> torch.Tensor:
    """Ground-truth masks from boxes, filled with inclusive ends (AGCAM's `box_to_seg`; the pointing game's
    x <= px <= x + w).

    boxes: a list of B (n_i, 4) arrays or tensors (n_i may be 0). box_format "xyxy" (x0, y0, x1, y1; VOC XML values
    as written, as the AGCAM dataset reads them) or "xywh". size: (H, W) of the masks (an int means square).
    orig_size: None (boxes already in mask pixels) or B (width, height) pairs of the original images: coordinates
    are then scaled with truncation, int(c / orig * size) (x by width, y by height), as AGCAM does.
    Returns (B, H, W) bool.
    """
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    rows, owner = [], []
    for i, bx in enumerate(boxes):
        t = torch.as_tensor(np.asarray(bx, dtype=np.float64)).reshape(-1, 4)
        if box_format == "xywh":
            t = torch.stack([t[:, 0], t[:, 1], t[:, 0] + t[:, 2], t[:, 1] + t[:, 3]], 1)
        if orig_size is not None:
            ow, oh = (float(v) for v in orig_size[i])
            t = torch.stack([t[:, 0] / ow * w, t[:, 1] / oh * h, t[:, 2] / ow * w, t[:, 3] / oh * h], 1).trunc()
        rows.append(t)
        owner.append(torch.full((t.shape[0],), i, dtype=torch.long))
    t = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64)
    bi = torch.cat(owner) if owner else torch.zeros(0, dtype=torch.long)
    return fill_boxes(bi, t[:, 0], t[:, 1], t[:, 2], t[:, 3], (len(boxes), h, w))


def localization(maps: torch.Tensor, gt_masks: torch.Tensor, threshold: float = 0.5, *, eps: float = 1e-5) -> dict:
    """AGCAM localization scores per image.

    maps: (B, h, w) raw maps of the predicted class; gt_masks: (B, H, W) bool (or 0/1) ground-truth masks, e.g.
    from `boxes_to_mask`. The maps are upsampled bilinearly to H x W and min-max normalised (eps 1e-12; a constant
    map gives an empty prediction). threshold: binarisation, strict `>`.

    Returns float64 (B,) "pixel_accuracy", "iou", "dice", "precision", "recall"; int64 (B,) "tp", "fp", "fn", "tn";
    "pred_masks" (B, H, W) bool. The table reports the means over the correctly classified images.
    """
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3 or gt_masks.dim() != 3 or maps.shape[0] != gt_masks.shape[0]:
        raise ValueError(f"localization: maps (B, h, w) and gt_masks (B, H, W) expected, got {tuple(maps.shape)} "
                         f"and {tuple(gt_masks.shape)}")
    gt = gt_masks.to(maps.device).bool()
    pred = contour_box_masks(prepare_maps(maps, gt.shape[-2:]), threshold)
    tp = (pred & gt).flatten(1).sum(1)
    fp = pred.flatten(1).sum(1) - tp
    fn = gt.flatten(1).sum(1) - tp
    tn = pred[0].numel() - tp - fp - fn
    tp_, fp_, fn_, tn_ = (v.double() for v in (tp, fp, fn, tn))
    return {"pixel_accuracy": (tp_ + tn_ + eps) / (tp_ + tn_ + fp_ + fn_ + eps),
            "iou": (tp_ + eps) / (tp_ + fp_ + fn_ + eps),
            "dice": (2 * tp_ + eps) / (2 * tp_ + fp_ + fn_ + eps),
            "precision": (tp_ + eps) / (tp_ + fp_ + eps),
            "recall": (tp_ + eps) / (tp_ + fn_ + eps),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn, "pred_masks": pred}


def pointing_game(maps: torch.Tensor, gt_masks: torch.Tensor) -> dict:
    """Pointing game per image: 1.0 if any pixel attaining the map's maximum lies in the ground-truth mask, else 0.0;
    NaN (excluded) where the mask is empty (openvino_xai skips maps of classes without boxes; Quantus returns NaN).

    maps: (B, h, w) raw, upsampled bilinearly to the mask size (no min-max: it is monotone and could only merge
    near-maximal values by rounding); gt_masks: (B, H, W) bool, e.g. `boxes_to_mask(..., box_format="xywh")`.
    Returns "pointing_game" (B,) float64 and "valid" (B,) bool. Score = nanmean over images.
    """
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    gt = gt_masks.to(maps.device).bool()
    m = maps if maps.is_floating_point() else maps.float()
    if tuple(m.shape[-2:]) != tuple(gt.shape[-2:]):
        from vitx_fast.postprocess import upsample

        m = upsample(m, gt.shape[-2:], "bilinear")
    flat = m.flatten(1)
    at_max = flat == flat.amax(1, keepdim=True)
    hit = (at_max & gt.flatten(1)).any(1).double()
    valid = gt.flatten(1).any(1)
    return {"pointing_game": torch.where(valid, hit, torch.full_like(hit, float("nan"))), "valid": valid}
