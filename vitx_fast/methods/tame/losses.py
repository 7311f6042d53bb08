"""T-TAME training objective (docs/methods/tame.md §1.4; the reference `Arrangement.classic_loss`).

Loss = 1.5 CE + 2 Area + 0.01 TV on the B x B "random" map set A = a[:, y] (every image's maps for all batch labels).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

CE_COEFF = 1.5  # lambda3
AREA_COEFF = 2.0  # lambda2
TV_COEFF = 0.01  # lambda1
AREA_POWER = 0.3  # lambda4
AREA_EPS = 5e-4  # keeps the power's derivative finite at 0
TV_POWER = 2
TV_BORDER = 0.3
MASKINGS = ("random", "diagonal")


class TameLoss(NamedTuple):
    """total = CE_COEFF * ce + AREA_COEFF * area + TV_COEFF * tv; the terms are unweighted scalars."""

    total: torch.Tensor
    ce: torch.Tensor
    area: torch.Tensor
    tv: torch.Tensor


def select_maps(a: torch.Tensor, labels: torch.Tensor, masking: str = "random") -> torch.Tensor:
    """a: (B, C, h, w), labels: (B,) -> "random": (B, B, h, w) = a[:, labels] (duplicates kept);
    "diagonal": (B, 1, h, w) = a[i, labels_i]."""
    if masking == "random":
        return a[:, labels]
    if masking == "diagonal":
        return a[torch.arange(a.shape[0], device=a.device), labels].unsqueeze(1)
    raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")


def area_loss(maps: torch.Tensor) -> torch.Tensor:
    """mean((A + 5e-4) ** 0.3) over all entries."""
    return ((maps + AREA_EPS) ** AREA_POWER).mean()


def tv_loss(maps: torch.Tensor) -> torch.Tensor:
    """maps (B, K, h, w): [sum of squared vertical and horizontal differences + 0.3 * sum of squared border rows and
    columns (corners counted twice)] / (2 * B), B = maps.shape[0]."""
    dy = (maps[:, :, 1:, :] - maps[:, :, :-1, :]).pow(TV_POWER).sum()
    dx = (maps[:, :, :, 1:] - maps[:, :, :, :-1]).pow(TV_POWER).sum()
    border = TV_BORDER * (maps[:, :, -1, :].pow(TV_POWER) + maps[:, :, 0, :].pow(TV_POWER)).sum() \
        + TV_BORDER * (maps[:, :, :, -1].pow(TV_POWER) + maps[:, :, :, 0].pow(TV_POWER)).sum()
    return (dy + dx + border) / float(TV_POWER * maps.shape[0])


def tame_loss(masked_logits: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor) -> TameLoss:
    """masked_logits: (B, C) of the masked images; labels: (B,) the backbone's clean argmax; maps: the selected
    sigmoid maps (B, B, h, w) ("random") or (B, 1, h, w)."""
    ce = F.cross_entropy(masked_logits, labels.long())
    area = area_loss(maps)
    tv = tv_loss(maps)
    return TameLoss(CE_COEFF * ce + AREA_COEFF * area + TV_COEFF * tv, ce, area, tv)


def mask_images(a: torch.Tensor, labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """x~_i = up(a[i, y_i]) * x_i: the label's map, bilinear to the image size (align_corners=False), times the
    normalised image (removed pixels become the mean colour). a: (B, C, h, w), images: (B, 3, H, W)."""
    m = a[torch.arange(a.shape[0], device=a.device), labels].unsqueeze(1)
    m = F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return m * images
