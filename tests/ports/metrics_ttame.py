"""Ports of IDT-ITI/T-TAME, `src/tame/metrics.py` (docs/metrics.md §4 and §6, convention "ttame").

- `normalizeMinMax`, `get_masked_inputs`, `get_AD`, `get_IC`: the 4-D branch with normalized_data=True; the
  normalisation statistics are parameters (ImageNet's in the reference), `get_masked_inputs` takes the masks to the
  model's dtype (the reference's `masks.float()` is the model's dtype there).
- `ttame_road_port`: `metrics.ROAD.__call__` + `_updateAcc`, per-image correctness kept (the reference accumulates a
  running mean), on pytorch-grad-cam's ROAD classes as the reference uses them.
"""
import torch
import torch.nn.functional as F


def normalizeMinMax(cam_maps):
    cam_map_mins = cam_maps
    cam_map_maxs = cam_maps
    for _ in range(0, 3):
        cam_map_mins, _ = cam_map_mins.min(dim=-1)
        cam_map_maxs, _ = cam_map_maxs.max(dim=-1)
    cam_maps -= cam_map_mins.view(-1, 1, 1, 1)
    cam_maps /= (cam_map_maxs - cam_map_mins + 1e-10).view(-1, 1, 1, 1)
    return cam_maps


def get_masked_inputs(inp, masks, img_size, percent, mean, std):
    B, C, _, _ = masks.size()
    masks = F.interpolate(masks, size=(img_size, img_size), mode="bilinear", align_corners=False)
    _, _, H, W = masks.size()
    masks = masks.to(inp.dtype)  # T-TAME: masks.float(), the model's dtype

    def percent_gen(pc):
        return masks.flatten(start_dim=1, end_dim=3).quantile(pc, dim=1).expand(H, W, C, B).permute(
            *range(masks.ndim - 1, -1, -1))

    masks_ls = [masks.masked_fill(masks < percent_gen(pct), 0) for pct in percent]
    m = torch.tensor(mean, dtype=inp.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=inp.dtype).view(1, 3, 1, 1)
    inv = lambda t: (t - 0.0) / (1 / s) - (-m)  # noqa: E731 - Normalize(0, 1/std) then Normalize(-mean, 1)
    normalize = lambda t: (t - m) / s  # noqa: E731
    return [normalize(mask * inv(inp)) for mask in masks_ls]


def get_AD(original_logits, new_logits):
    return torch.nan_to_num((original_logits - new_logits).clip(min=0) / original_logits).sum() * (
        100 / original_logits.size()[0])


def get_IC(original_logits, new_logits):
    return ((new_logits - original_logits) > 0).sum() * (100 / original_logits.size()[0])



def ttame_road_port(model, x, cams, percent_list, road_cls):
    """Literal port of T-TAME `metrics.ROAD.__call__` + `_updateAcc`, per-image correctness kept."""
    from pytorch_grad_cam.utils.model_targets import RawScoresOutputTarget

    logits = model(x)
    model_truth = logits.softmax(dim=1).max(dim=1)[1]
    target = [RawScoresOutputTarget() for _ in range(x.size(0))]
    out = []
    for percentile in percent_list:
        scores = road_cls(percentile)(x, cams, target, model, return_diff=False)
        _, new_preds = torch.tensor(scores).max(dim=1)
        out.append(model_truth.cpu() == new_preds)
    return torch.stack(out, 1).double()
