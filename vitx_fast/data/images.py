"""Image files: which suffixes count as images, and the timm preprocessing of a model's data config."""
from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def is_image_file(path: Path) -> bool:
    """A regular file whose suffix is an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(root: Path) -> list[Path]:
    """Every image file under `root`, recursively, sorted."""
    return sorted(p for p in Path(root).rglob("*") if is_image_file(p))


def make_transform(cfg: dict):
    """timm's eval transform for a data config (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
    import timm.data

    return timm.data.create_transform(**{k: cfg[k] for k in ("input_size", "interpolation", "mean", "std",
                                                              "crop_pct", "crop_mode") if k in cfg})


def display_image(img, cfg: dict):
    """The RGB image the model sees (resize and centre crop of the data config), as uint8 (H, W, 3), for overlays."""
    import numpy as np
    import torchvision.transforms as T

    size = cfg["input_size"][-2:]
    crop_pct = cfg.get("crop_pct", 1.0) or 1.0
    scale = int(size[0] / crop_pct)
    tf = T.Compose([T.Resize(scale), T.CenterCrop(size)]) if crop_pct < 1.0 else T.Resize(tuple(size))
    return np.asarray(tf(img.convert("RGB")))
