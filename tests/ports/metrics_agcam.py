"""Ports of the evaluation code of LeemSaebom/Attention-Guided-CAM-Visual-Explanations-of-Vision-Transformer-Guided-by-
Self-Attention (docs/metrics.md §2 and §3).

- `abpc_port`: `ABPC.py`, one image: data_norm (1, C, H, W) normalised, vis (1, H, W) the [0, 1] map at image size
  (11 steps, topk ties, zeroing in normalised space, the GT class). The reference's 224 * 224 base is the image's
  H * W here.
- `getBoudingBox_multi`, `box_to_seg`: `utils/bounding_box.py` (OpenCV contours; box_to_seg generalised from
  224 x 224 to the mask size). `agcam_pred_mask` applies them to one map; `agcam_localization` is the literal
  `localization.py` per-image body (mask.reshape(1, 1, h, w), bilinear to size, min-max, counts).
"""
import numpy as np
import torch

try:  # OpenCV is optional: only the localization ports need it (their tests skip without it)
    import cv2
except ImportError:  # pragma: no cover - depends on the environment
    cv2 = None


def abpc_port(model, data_norm, vis, target):
    """AGCAM ABPC.py, one image: data_norm (1, C, H, W) normalised, vis (1, H, W) the [0, 1] map at image size.
    The reference's 224 * 224 base is the image's H * W here."""
    scope = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    c, h, w = vis.shape
    base = h * w
    LeRF, MoRF = np.zeros(len(scope)), np.zeros(len(scope))
    for i in range(len(scope)):
        k = int(base * scope[i])
        mask = vis.view(c, -1).clone() + 1.0
        value, indices = torch.topk(mask, k)
        mask[0, indices] = 0
        mask = torch.where(mask == 0.0, 0.0, 1.0)
        mask = mask.reshape([h, w])
        masked_data = data_norm * mask
        pred = model(masked_data)
        prob = torch.softmax(pred, dim=1)
        MoRF[i] = prob[:, target.item()].item()

        mask = vis.view(c, -1).clone() * -1.0 - 1.0
        value, indices = torch.topk(mask, k)
        mask[0, indices] = 0
        mask = torch.where(mask == 0.0, 0.0, 1.0)
        mask = mask.reshape([h, w])
        masked_data = data_norm * mask
        pred = model(masked_data)
        prob = torch.softmax(pred, dim=1)
        LeRF[i] = prob[:, target.item()].item()
    return MoRF, LeRF



def getBoudingBox_multi(mask, threshold=None):
    mask = mask.detach().cpu().numpy()[0]
    mask = np.transpose(mask, (1, 2, 0))
    if threshold is None:
        threshold = mask.mean()
    mask[mask > threshold] = 1
    mask[mask <= threshold] = 0
    mask = (mask * 255).astype(np.uint8)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    bnd_box = torch.tensor([])
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        xmin = x
        ymin = y
        xmax = x + w
        ymax = y + h
        if bnd_box.dim() == 1:
            bnd_box = torch.tensor((xmin, ymin, xmax, ymax)).unsqueeze(0)
        else:
            bnd_box = torch.cat((bnd_box, torch.tensor((xmin, ymin, xmax, ymax)).unsqueeze(0)), dim=0)
    return bnd_box


def box_to_seg(box_cor, size=(224, 224)):
    segmask = torch.zeros(size)
    if box_cor.dim() != 1:
        n, _ = box_cor.shape
        for i in range(n):
            xmin = box_cor[i][0]
            ymin = box_cor[i][1]
            xmax = box_cor[i][2]
            ymax = box_cor[i][3]
            segmask[ymin:ymax + 1, xmin:xmax + 1] = 1
    return segmask


def agcam_pred_mask(map01, threshold=0.5):
    """(H, W) [0, 1] map -> AGCAM's predicted segmentation (H, W) float32."""
    m = map01.clone().reshape(1, 1, *map01.shape)
    return box_to_seg(getBoudingBox_multi(m, threshold=threshold), tuple(map01.shape))


def agcam_localization(cam, bnd_box, size, threshold=0.5):
    """Literal `localization.py` per-image body (mask.reshape(1, 1, h, w), bilinear to size, min-max, counts)."""
    mask = cam.reshape(1, 1, *cam.shape)
    upsample = torch.nn.Upsample(size, mode="bilinear", align_corners=False)
    mask = upsample(mask)
    mask = (mask - mask.min()) / (mask.max() - mask.min())
    seg_label = box_to_seg(bnd_box, size)
    mask_bnd_box = getBoudingBox_multi(mask, threshold=threshold)
    seg_mask = box_to_seg(mask_bnd_box, size)
    output = seg_mask.view(-1, )
    target = seg_label.view(-1, ).float()
    tp = torch.sum(output * target)
    fp = torch.sum(output * (1 - target))
    fn = torch.sum((1 - output) * target)
    tn = torch.sum((1 - output) * (1 - target))
    eps = 1e-5
    pixel_acc_ = (tp + tn + eps) / (tp + tn + fp + fn + eps)
    dice_ = (2 * tp + eps) / (2 * tp + fp + fn + eps)
    precision_ = (tp + eps) / (tp + fp + eps)
    recall_ = (tp + eps) / (tp + fn + eps)
    iou_ = (tp + eps) / (tp + fp + fn + eps)
    return {"pixel_accuracy": pixel_acc_, "dice": dice_, "precision": precision_, "recall": recall_, "iou": iou_}
