"""Ports of openvinotoolkit/openvino_xai's metrics (docs/metrics.md §2.1, §4, §5 and §7, convention "openvino"),
on raw (H, W, C) images with `model_predict(raw) -> probabilities` standing for preprocess_fn + model +
postprocess_fn (softmax), as openvino_xai's metrics call them.

- `openvino_auc`, `openvino_insertion_deletion`: `openvino_xai/metrics/insertion_deletion_auc.py`,
  `InsertionDeletionAUC.__call__` + `step_image_insertion_deletion` (raw black canvas).
- `openvino_pointing_game`: `openvino_xai/metrics/pointing_game.py`, `PointingGame.__call__` (boxes (x, y, w, h),
  inclusive).
- `openvino_average_drop`: `openvino_xai/metrics/adcc.py`, `ADCC.average_drop` (raw image times the image-resolution
  map).
- `openvino_adcc_call`, `openvino_adcc_evaluate`: `openvino_xai/metrics/adcc.py`, `ADCC.__call__` for one image
  (average drop, coherency with `explainer(masked_image, class_idx)` re-scaled by scaling(..., max_value=1), complexity)
  and `ADCC.evaluate`'s means and harmonic mean.
"""
import numpy as np
from scipy.stats import pearsonr


def openvino_auc(arr):
    return np.abs((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


def openvino_insertion_deletion(model_predict, saliency_map, class_idx, input_image, steps, kind="quicksort"):
    """openvino_xai InsertionDeletionAUC.__call__ + step_image_insertion_deletion (input_image (H, W, C) raw)."""
    sorted_indices = np.argsort(-saliency_map.flatten(), kind=kind)
    sorted_indices = np.unravel_index(sorted_indices, saliency_map.shape)
    insertion_scores, deletion_scores = [], []
    for i in range(steps + 1):
        num_pixels = int(i * len(sorted_indices[0]) / steps)
        image_insertion = np.full_like(input_image, 0)
        image_deletion = input_image.copy()
        x_indices = sorted_indices[0][:num_pixels]
        y_indices = sorted_indices[1][:num_pixels]
        image_insertion[x_indices, y_indices] = input_image[x_indices, y_indices]
        image_deletion[x_indices, y_indices] = 0
        insertion_scores.append(model_predict(image_insertion)[class_idx])
        deletion_scores.append(model_predict(image_deletion)[class_idx])
    return openvino_auc(np.array(insertion_scores)), openvino_auc(np.array(deletion_scores)), \
        np.array(insertion_scores), np.array(deletion_scores)



def openvino_pointing_game(saliency_map, image_gt_bboxes):
    """openvino_xai PointingGame.__call__ (boxes (x, y, w, h), inclusive)."""
    max_indices = np.argwhere(saliency_map == np.max(saliency_map))
    for x, y, w, h in image_gt_bboxes:
        for max_point_y, max_point_x in max_indices:
            if x <= max_point_x <= x + w and y <= max_point_y <= y + h:
                return 1.0
    return 0.0


def openvino_average_drop(model_predict, saliency_map, input_image):
    model_output = model_predict(input_image)
    masked_image = input_image * saliency_map[:, :, None]
    class_idx = np.argmax(model_output)
    confidence_on_input = model_output[class_idx]
    confidence_on_saliency_map = model_predict(masked_image)[class_idx]
    avgdrop = max(0.0, confidence_on_input - confidence_on_saliency_map) / confidence_on_input
    return avgdrop


def openvino_adcc_call(model_predict, explainer, saliency_map, input_image):
    """(coherency, complexity, average drop) of one image, each in [0, 1]."""
    model_output = model_predict(input_image)
    masked_image = input_image * saliency_map[:, :, None]
    class_idx = np.argmax(model_output)
    confidence_on_input = model_output[class_idx]
    avgdrop = max(0.0, confidence_on_input - model_predict(masked_image)[class_idx]) / confidence_on_input
    b = explainer(masked_image, class_idx)
    b = (b - b.min()) / (b.max() - b.min())  # scaling(..., max_value=1)
    coh = (pearsonr(saliency_map.flatten(), b.flatten())[0] + 1) / 2
    com = saliency_map.sum() / (saliency_map.shape[-1] * saliency_map.shape[-2])
    return coh, com, avgdrop


def openvino_adcc_evaluate(results):
    """ADCC.evaluate: the means of the per-image [coherency, complexity, average drop], then their harmonic mean."""
    coherency, complexity, average_drop = np.mean(np.array(results), axis=0)
    return 3 / (1 / coherency + 1 / (1 - complexity) + 1 / (1 - average_drop))
