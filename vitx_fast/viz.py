"""Figures at the visualisation edge: heatmap overlays, method grids, DAAM flow strips (uint8 RGB numpy arrays)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from vitx_fast.postprocess import normalize, upsample


def colormap(values: np.ndarray, name: str = "jet") -> np.ndarray:
    """values in [0, 1], (H, W) -> (H, W, 3) uint8."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, grid_map: torch.Tensor, alpha: float = 0.5, boxes=None) -> np.ndarray:
    """image (H, W, 3) uint8; grid_map (h, w) raw map -> (H, W, 3) uint8 overlay, map min-max normalised and
    bilinearly upsampled to the image. boxes: optional iterable of (x0, y0, x1, y1) drawn in white."""
    H, W = image.shape[:2]
    m = upsample(normalize(grid_map.detach().double()[None]), (H, W))[0].cpu().numpy()
    heat = colormap(m)
    out = (alpha * heat + (1 - alpha) * image.astype(np.float64)).round().clip(0, 255).astype(np.uint8)
    if boxes is not None:
        out = draw_boxes(out, boxes)
    return out


def draw_boxes(image: np.ndarray, boxes, color=(255, 255, 255)) -> np.ndarray:
    img = Image.fromarray(image)
    d = ImageDraw.Draw(img)
    for b in boxes:
        x0, y0, x1, y1 = [float(v) for v in b]
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=max(1, image.shape[0] // 96))
    return np.asarray(img)


def labeled_row(tiles: list[np.ndarray], labels: list[str], tile: int = 160) -> np.ndarray:
    """Tiles side by side, each resized to tile x tile, with a caption strip above."""
    cap = 16
    canvas = Image.new("RGB", (tile * len(tiles), tile + cap), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, (t, lab) in enumerate(zip(tiles, labels, strict=True)):
        canvas.paste(Image.fromarray(t).resize((tile, tile), Image.BILINEAR), (i * tile, cap))
        d.text((i * tile + 3, 2), lab[: tile // 6], fill=(0, 0, 0))
    return np.asarray(canvas)


def save_png(array: np.ndarray, path) -> None:
    """Write atomically: temp name in the same folder, then rename."""
    import os

    path = str(path)
    tmp = path + ".tmp.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)
