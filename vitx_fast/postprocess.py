"""Map post-processing shared by methods, metrics and the CLI: min-max normalisation and upsampling."""
from __future__ import annotations

import torch
import torch.nn.functional as F

UPSAMPLE_MODES = ("bilinear", "nearest", "bicubic", "bicubic_pil")


def normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-map min-max over the last two dims: (s - min) / (max - min + eps). A constant map becomes 0.

    maps: (..., h, w) -> same shape, float.
    """
    if maps.dim() < 2:
        raise ValueError(f"maps must have at least 2 dims (..., h, w), got shape {tuple(maps.shape)}")
    m = maps if maps.is_floating_point() else maps.float()
    flat = m.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo + eps)).view_as(m)


def _pil_bicubic_weights(in_size: int, out_size: int, dtype, device) -> torch.Tensor:
    """(out, in) resampling matrix of PIL's BICUBIC filter (a = -0.5, half-pixel centres, taps renormalised)."""

    def cubic(x: float) -> float:
        a = -0.5
        x = abs(x)
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
        if x < 2.0:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        ks = [cubic((x - center + 0.5) / filterscale) for x in range(xmin, xmax)]
        total = sum(ks)
        for j, k in enumerate(ks):
            w[i, xmin + j] = k / total if total != 0 else 0.0
    return w.to(dtype=dtype, device=device)


def upsample(maps: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Resize maps (..., h, w) to size (H, W) (an int means square).

    bilinear: half-pixel centres (align_corners=False), as cv2 INTER_LINEAR and the papers' evaluation code.
    bicubic_pil: PIL's BICUBIC on a float image (ViT-ReciproCAM's demo and metrics); torch's `bicubic` (a = -0.75,
    clamped borders) is offered as `bicubic` and is not the same.
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {mode!r}; choose one of {UPSAMPLE_MODES}")
    if isinstance(size, int):
        size = (size, size)
    size = (int(size[0]), int(size[1]))
    if maps.dim() < 2:
        raise ValueError(f"maps must have at least 2 dims (..., h, w), got shape {tuple(maps.shape)}")
    lead = maps.shape[:-2]
    m = maps if maps.is_floating_point() else maps.float()
    x = m.reshape(-1, 1, *m.shape[-2:])
    if mode == "bicubic_pil":
        wh = _pil_bicubic_weights(x.shape[-2], size[0], x.dtype, x.device)
        ww = _pil_bicubic_weights(x.shape[-1], size[1], x.dtype, x.device)
        out = torch.einsum("oh,nchw,pw->ncop", wh, x, ww)
    elif mode == "nearest":
        out = F.interpolate(x, size=size, mode="nearest")
    else:
        out = F.interpolate(x, size=size, mode=mode, align_corners=False)
    return out.reshape(*lead, *size)


def to_uint8(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """floor(255 * (s - min) / (max - min + eps)) per map, as uint8 (openvino_xai `embed_scaling`)."""
    return torch.floor(255.0 * normalize(maps, eps=eps)).clamp(0, 255).to(torch.uint8)


