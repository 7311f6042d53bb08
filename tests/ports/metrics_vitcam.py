"""Ports of sybyun/vitcam, `src/vit_recipro_cam_metric.py` (docs/metrics.md §4, §5 and §7, convention "vitcam").

- `pil_bicubic`: its resize, `to_pil_image(cam, mode='F').resize((Height, Width), BICUBIC)` -> `pil_to_tensor`,
  without torchvision.
- `vitcam_average_drop_increase_port`: `average_drop_increase` for one batch.
- `vitcam_adcc_port`: `ADCC` for one batch (torchmetrics' PearsonCorrCoef -> scipy's pearsonr; the ViTReciproCam
  generator is passed in as `cam_generator`).
- `vitcam_dauc_iauc_port`: `dauc_iauc` for one batch (the ViTReciproCam call replaced by the given h x w maps).
"""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import pearsonr


def pil_bicubic(cam, height, width):
    """to_pil_image(cam, mode='F').resize((Height, Width), BICUBIC) -> pil_to_tensor, without torchvision."""
    img = Image.fromarray(cam.float().numpy(), mode="F").resize((height, width), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy())[None]


def vitcam_average_drop_increase_port(model, images, labels, cams, height, width):
    softmax = torch.nn.Softmax(dim=1)
    batch_size = images.shape[0]
    explanation = torch.zeros(batch_size, 3, height, width, dtype=images.dtype)
    yc = torch.zeros(batch_size, dtype=torch.float64)
    oc = torch.zeros(batch_size, dtype=torch.float64)
    with torch.no_grad():
        predictions = softmax(model(images))
        for i in range(batch_size):
            class_id = labels[i].item()
            yc[i] = predictions[i][class_id]
            cam = pil_bicubic(cams[i], height, width)
            explanation[i] = torch.mul(images[i], cam.repeat(3, 1, 1).to(images.dtype))
        o_predictions = softmax(model(explanation))
        for i in range(batch_size):
            oc[i] = o_predictions[i][labels[i].item()]
    drop = torch.nn.functional.relu(yc - oc) / yc
    return drop, (oc > yc), explanation


def vitcam_adcc_port(model, images, labels, cam_generator, h, w, height, width):
    """vit_recipro_cam_metric.ADCC for one batch (torchmetrics' PearsonCorrCoef -> scipy's pearsonr)."""
    batch_size = images.shape[0]
    coherency = complexity = avg_drop = avg_inc = 0.0
    explanation = torch.zeros(batch_size, 3, height, width, dtype=images.dtype)
    yc = torch.zeros(batch_size, dtype=torch.float64)
    oc = torch.zeros(batch_size, dtype=torch.float64)
    softmax = torch.nn.Softmax(dim=1)
    with torch.no_grad():
        predictions = softmax(model(images))
        pre_cam = torch.zeros(batch_size, h * w, dtype=torch.float64)
        for i in range(batch_size):
            class_id = labels[i].item()
            yc[i] = predictions[i][class_id]
            cam = cam_generator(images[i].unsqueeze(0), class_id)
            pre_cam[i] = cam.reshape(-1, )
            complexity += cam.sum() / (h * w)
            cam = pil_bicubic(cam, height, width)
            explanation[i] = torch.mul(images[i], cam.repeat(3, 1, 1).to(images.dtype))
        o_predictions = softmax(model(explanation))
        for i in range(batch_size):
            class_id = labels[i].item()
            oc[i] = o_predictions[i][class_id]
            cam = cam_generator(explanation[i].unsqueeze(0), class_id).reshape(-1, )
            coherency += 0.5 * (1.0 + pearsonr(cam.numpy(), pre_cam[i].numpy())[0])
        drop = torch.nn.functional.relu(yc - oc) / yc
        inc = torch.count_nonzero(torch.nn.functional.relu(oc - yc))
        avg_drop += drop.sum()
        avg_inc += inc
    n = batch_size
    avg_drop, avg_inc, coherency, complexity = avg_drop.item() / n, avg_inc.item() / n, coherency / n, \
        complexity.item() / n
    adcc_ = 3.0 / (1.0 / coherency + 1.0 / (1 - complexity) + 1.0 / (1 - avg_drop))
    return avg_drop * 100, avg_inc * 100, coherency * 100, complexity * 100, adcc_ * 100


def vitcam_dauc_iauc_port(model, images, labels, cams, height, width):
    """vit_recipro_cam_metric.dauc_iauc for one batch (the ViTReciproCam call replaced by the given h x w maps)."""
    auc = pytest.importorskip("sklearn.metrics").auc
    dauc, iauc = [], []
    softmax = torch.nn.Softmax(dim=1)
    batch_size = images.shape[0]
    with torch.no_grad():
        h = int(height / 32)
        w = int(width / 32)
        predictions = softmax(model(images))
        dx = int(width / w)
        dy = int(height / h)
        ck = torch.zeros(h * w + 1, dtype=torch.float64)
        for i in range(batch_size):
            class_id = labels[i].item()
            cam = cams[i].reshape(-1, )
            _, s_index = cam.sort(dim=0, descending=True)
            del_mask = torch.ones(3, height, width, dtype=images.dtype)
            inc_mask = torch.zeros(3, height, width, dtype=images.dtype)
            base_color = torch.mean(images[i], dim=(1, 2)).unsqueeze(0)
            base_color = base_color.reshape(1, 3, 1, 1)
            auc_images = base_color.repeat(2 * h * w, 1, height, width)
            for j in range(h * w):
                s_idx = int(s_index[j].cpu().item())
                ci = s_idx // w
                cj = s_idx - ci * w
                xs = int(cj * dx)
                xe = int(min((cj + 1) * dx, width - 1))
                ys = int(ci * dy)
                ye = int(min((ci + 1) * dy, height - 1))
                del_mask[:, ys:ye + 1, xs:xe + 1] = 0.0
                inc_mask[:, ys:ye + 1, xs:xe + 1] = 1.0
                auc_images[j] = images[i] * del_mask
                auc_images[h * w + j] = auc_images[h * w + j] * del_mask + images[i] * inc_mask
            o_predictions = softmax(model(auc_images))
            ck[0] = predictions[i][class_id]
            ck[1:] = o_predictions[:h * w, class_id]
            x = np.arange(0, len(ck))
            dauc.append(auc(x, ck.numpy()) / len(ck))
            ck[h * w] = predictions[i][class_id]
            ck[:h * w] = o_predictions[h * w:, class_id]
            iauc.append(auc(x, ck.numpy()) / len(ck))
    return np.array(dauc), np.array(iauc)
