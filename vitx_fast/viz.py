"""Figures at the visualisation edge: method grids, DAAM flow strips, boxes (uint8 RGB numpy arrays). The heatmap
overlay itself is `vitx_fast.imaging.blend` (public: `vx.overlay`)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


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
