"""Port of aimagelab/ADCC, `metrics/average_drop.py` (docs/metrics.md §4, `clean_score="top1"`): Y is the clean top-1
probability, O the probability of class_idx on the explanation map (the image times the saliency map in normalised
space, as its `image_utils` builds it), for one image."""
import torch


def aimagelab_average_drop(model, image, explanation_map, class_idx):
    with torch.no_grad():
        out_on_inp = torch.softmax(model(image), dim=1)
        out_on_exp = torch.softmax(model(explanation_map), dim=1)
    confidence_on_inp = out_on_inp.max(1)[0].item()
    confidence_on_exp = out_on_exp[:, class_idx][0].item()
    return max(0., confidence_on_inp - confidence_on_exp) / confidence_on_inp
