"""Images in and out: `preprocess` turns the images users have into the batch a model expects, and `overlay` draws
explanation maps on the original images (docs/inputs.md).

The data config (input size, interpolation, mean, std, crop) is timm's: `timm.data.resolve_data_config` on a timm
model's pretrained_cfg, and `timm.data.create_transform` (via vitx_fast.data.images.make_transform) applies it. For
Hugging Face ViT / DeiT / DINOv2 models the size comes from `model.config.image_size` and the normalisation and crop
from the published checkpoints' image processors (HF_DEFAULTS) unless `config=` says otherwise: a dict, or the
model's `transformers` image processor itself.
"""
from __future__ import annotations

import os

import numpy as np
import torch

# the keys of a data config that the transform reads
TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
# keys that timm's pretrained_cfg / vitx's data configs also carry; accepted in `config=` and ignored
_DESCRIPTIVE_KEYS = ("img_size", "classes", "label_names", "num_classes", "architecture", "tag", "url", "hf_hub_id",
                     "license", "first_conv", "classifier", "pool_size", "fixed_input_size", "test_input_size",
                     "test_crop_pct", "min_input_size", "origin_url", "paper_ids", "paper_name", "notes")
CROP_MODES = ("center", "squash", "border")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Hugging Face families (vitx_fast.engine.hf.SERVED) -> the preprocessing of their published checkpoints'
# preprocessor_config.json: google/vit-* (ViTImageProcessor: resize to the input size, mean = std = 0.5),
# facebook/deit-* (DeiTImageProcessor: resize to 256 x 256, centre crop 224, ImageNet mean / std) and
# facebook/dinov2-* (BitImageProcessor: shorter side to 256, centre crop 224, ImageNet mean / std)
HF_DEFAULTS = {
    "vit": dict(interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0,
                crop_mode="squash"),
    "deit": dict(interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, crop_mode="squash"),
    "dinov2": dict(interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875, crop_mode="center"),
}
# PIL resampling filter numbers (transformers' `resample`) -> timm interpolation names
_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# ------------------------------------------------------------------------------------------------ data config
def data_config(model=None, config=None) -> dict:
    """The data config that `preprocess` applies to `model`'s inputs: a dict with TRANSFORM_KEYS.

    timm model: `timm.data.resolve_data_config({}, model=model)` (its pretrained_cfg); a model with a fixed input size
    (patch_embed.img_size, no dynamic_img_size) gets that size even where the pretrained_cfg says another. Hugging
    Face ViT / DeiT / DINOv2: the size of `model.config.image_size`, the rest from HF_DEFAULTS of its family.
    config: a dict of TRANSFORM_KEYS overriding those (input_size may be an int, (H, W) or (3, H, W)), or a
    `transformers` image processor (its size, crop, resample, mean and std). model None: `config` alone.
    """
    cfg: dict = {}
    if model is not None:
        cfg = _model_config(model)
    if config is not None:
        cfg.update(_user_config(config))
    if "input_size" in cfg:
        cfg["input_size"] = _input_size(cfg["input_size"])
    return cfg


def _model_config(model) -> dict:
    from vitx_fast.engine.hf import is_hf_model

    if is_hf_model(model):
        from vitx_fast.engine.hf import SERVED, _hf_class

        base = _hf_class(model)
        family = SERVED.get(base.__name__ if base is not None else "", "vit")
        size = getattr(getattr(model, "config", None), "image_size", 224)
        return {"input_size": _input_size(size), **HF_DEFAULTS[family]}
    import timm.data

    cfg = dict(timm.data.resolve_data_config({}, model=model))
    pe = getattr(model, "patch_embed", None)
    fixed = getattr(pe, "img_size", None)
    if fixed is not None and not getattr(model, "dynamic_img_size", False):
        cfg["input_size"] = (3, *(int(s) for s in fixed))
    return {k: cfg[k] for k in TRANSFORM_KEYS if k in cfg}


def _user_config(config) -> dict:
    if hasattr(config, "image_mean") and not isinstance(config, dict):
        return _processor_config(config)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of {', '.join(TRANSFORM_KEYS)} or a transformers image processor, "
                        f"got {type(config).__name__}")
    unknown = sorted(k for k in config if k not in TRANSFORM_KEYS and k not in _DESCRIPTIVE_KEYS)
    if unknown:
        raise ValueError(f"config: unknown key(s) {unknown}; the preprocessing keys are {', '.join(TRANSFORM_KEYS)}")
    out = {k: config[k] for k in TRANSFORM_KEYS if k in config and config[k] is not None}
    for k in ("mean", "std"):
        if k in out:
            v = tuple(float(x) for x in out[k])
            if len(v) != 3 or (k == "std" and min(v) <= 0):
                raise ValueError(f"config: {k} must be 3 numbers{' > 0' if k == 'std' else ''}, got {out[k]!r}")
            out[k] = v
    if "crop_pct" in out and not 0 < float(out["crop_pct"]) <= 1:
        raise ValueError(f"config: crop_pct must be in (0, 1], got {out['crop_pct']!r}")
    if "crop_mode" in out and out["crop_mode"] not in CROP_MODES:
        raise ValueError(f"config: crop_mode must be one of {CROP_MODES}, got {out['crop_mode']!r}")
    return out


def _processor_config(proc) -> dict:
    """A transformers image processor (ViTImageProcessor, DeiTImageProcessor, BitImageProcessor, ...) -> data config."""

    def hw(size):
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        if get("height") and get("width"):
            return (int(get("height")), int(get("width"))), "squash"
        if get("shortest_edge"):
            return (int(get("shortest_edge")),) * 2, "center"
        if isinstance(size, int):
            return (size, size), "squash"
        raise ValueError(f"config: the image processor's size {size!r} is not a fixed size (height/width or "
                         "shortest_edge); pass a dict with input_size instead")

    name = type(proc).__name__
    resize, mode = hw(proc.size) if getattr(proc, "do_resize", True) else (None, "squash")
    crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
    if crop is not None:
        crop = hw(crop)[0]
    size = crop or resize
    if size is None:
        raise ValueError(f"config: {name} neither resizes nor crops to a fixed size; pass a dict with input_size")
    out = {"input_size": (3, *size), "crop_mode": mode,
           "crop_pct": 1.0 if crop is None or resize is None else crop[0] / resize[0],
           "interpolation": _PIL_FILTERS.get(int(getattr(proc, "resample", 2)), "bilinear")}
    if mode == "center" and crop is None:
        raise ValueError(f"config: {name} resizes the shorter side without a crop (no fixed size); pass a dict "
                         "with input_size")
    if getattr(proc, "do_rescale", True) and abs(float(getattr(proc, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError(f"config: {name} rescales by {proc.rescale_factor}, not 1/255; pass a dict instead")
    if getattr(proc, "do_normalize", True):
        out["mean"] = tuple(float(v) for v in proc.image_mean)
        out["std"] = tuple(float(v) for v in proc.image_std)
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out


def _input_size(size) -> tuple[int, int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return (3, int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) == 2:
        return (3, *size)
    if len(size) == 3:
        return size
    raise ValueError(f"config: input_size must be an int, (H, W) or (3, H, W), got {size!r}")


# ------------------------------------------------------------------------------------------------ inputs
def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"a numpy array of dtype {x.dtype} and shape {x.shape}"
    if isinstance(x, torch.Tensor):
        return f"a torch tensor of dtype {str(x.dtype).removeprefix('torch.')} and shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def to_pil_list(images, what: str = "images") -> list:
    """The images users have -> a list of RGB PIL images at their own size.

    images: a PIL image; a path (str / os.PathLike, read with vitx_fast.data.images.read_image); a uint8 numpy
    array (H, W, 3) or (N, H, W, 3); a uint8 torch tensor (3, H, W) or (N, 3, H, W); or a list / tuple of these.
    Raises TypeError (another type or dtype: float arrays, float tensors inside a list, ...) or ValueError (a wrong
    shape or channel count, an empty list, an unreadable file: vitx_fast.data.images.ImageDecodeError).
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{what}: an empty list (no images)")
        out = []
        for i, item in enumerate(images):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"{what}[{i}]: a nested {type(item).__name__}; pass one flat list of images")
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                raise TypeError(f"{what}[{i}]: {_describe(item)} inside a list; pass a float batch (B, 3, H, W), "
                                "normalised as the model expects, as the tensor itself, or uint8 pixels")
            out += to_pil_list(item, f"{what}[{i}]")
        return out
    from PIL import Image

    from vitx_fast.data.images import read_image, to_rgb

    if isinstance(images, Image.Image):
        return [to_rgb(images)]
    if isinstance(images, (str, os.PathLike)):
        return [read_image(images)]
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(
                f"{what}: {_describe(images)}; numpy images must be uint8 pixels (H, W, 3) or (N, H, W, 3). A "
                "float array is ambiguous (0..1 or 0..255, normalised or not): convert it to uint8, or pass a "
                "torch tensor (B, 3, H, W) already normalised as the model expects (torch.from_numpy(a))")
        if images.ndim not in (3, 4) or images.shape[-1] != 3:
            hint = (f" ({images.shape[-1]} channels; greyscale or RGBA: pass a PIL image, it is converted to RGB)"
                    if images.ndim in (3, 4) else "")
            raise ValueError(f"{what}: {_describe(images)}; expected uint8 (H, W, 3) or (N, H, W, 3) RGB{hint}")
        batch = images[None] if images.ndim == 3 else images
        if batch.shape[0] == 0:
            raise ValueError(f"{what}: an empty batch (N = 0)")
        return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in batch]
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            kind = "a float tensor is taken as already preprocessed: pass it to vx.explain as it is; " \
                if images.is_floating_point() else ""
            raise TypeError(f"{what}: {_describe(images)}; {kind}images as tensors are either uint8 pixels "
                            "(3, H, W) / (N, 3, H, W) or a float tensor (B, 3, H, W) normalised as the model expects")
        if images.dim() not in (3, 4) or images.shape[-3] != 3:
            hint = f" ({images.shape[-3]} channels)" if images.dim() in (3, 4) else ""
            raise ValueError(f"{what}: {_describe(images)}; expected uint8 (3, H, W) or (N, 3, H, W) RGB{hint}")
        batch = images[None] if images.dim() == 3 else images
        if batch.shape[0] == 0:
            raise ValueError(f"{what}: an empty batch (N = 0)")
        arr = batch.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        return [Image.fromarray(a, "RGB") for a in arr]
    raise TypeError(f"{what}: {_describe(images)}; expected a PIL image, a path, a uint8 numpy array (H, W, 3) / "
                    "(N, H, W, 3), a uint8 torch tensor (3, H, W) / (N, 3, H, W), a list of these, or a float "
                    "tensor (B, 3, H, W) normalised as the model expects")


def _model_placement(model) -> tuple[torch.dtype, torch.device]:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return (p.dtype, p.device) if p is not None and p.is_floating_point() else (torch.float32, torch.device("cpu"))


def preprocess(model, images, config=None) -> torch.Tensor:
    """The images users have -> the (B, 3, H, W) float batch `model` expects, in its dtype and on its device.

    images: a PIL image, a path (str / Path), a uint8 numpy array (H, W, 3) or (N, H, W, 3), a uint8 torch tensor
    (3, H, W) or (N, 3, H, W), or a list of these (any mix; each item may be a batch). Each image goes through timm's
    eval transform of `data_config(model, config)`: resize, centre crop, to [0, 1], (x - mean) / std.
    config: None (the model's own preprocessing: its timm pretrained_cfg; Hugging Face models: config.image_size and
    HF_DEFAULTS), a dict overriding keys of it (input_size, interpolation, mean, std, crop_pct, crop_mode), or a
    `transformers` image processor.
    Raises TypeError / ValueError naming the input that cannot be used (see `to_pil_list`).
    """
    from vitx_fast.data.images import make_transform

    pics = to_pil_list(images)
    cfg = data_config(model, config)
    transform = make_transform(cfg)
    dtype, device = _model_placement(model)
    return torch.stack([transform(p) for p in pics]).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ overlays
def model_view(width: int, height: int, cfg: dict | None) -> tuple[float, float, float, float]:
    """The region (x0, y0, x1, y1) of a width x height original image that timm's eval transform of `cfg` shows the
    model (it may reach past the image for crop_mode 'border'); the whole image when the data config is unknown."""
    import math

    if not cfg or not cfg.get("input_size"):
        return 0.0, 0.0, float(width), float(height)
    h_in, w_in = cfg["input_size"][-2:]
    pct = cfg.get("crop_pct") or 0.875
    sh, sw = math.floor(h_in / pct), math.floor(w_in / pct)
    mode = cfg.get("crop_mode") or "center"
    if mode == "squash":
        sx, sy = sw / width, sh / height
    else:  # center: the shorter edge to the scale size; border: the longer edge
        s = min(sw / width, sh / height) if mode == "border" else max(sw / width, sh / height)
        sx = sy = s
    cw, ch = w_in / sx, h_in / sy
    return (width - cw) / 2, (height - ch) / 2, (width + cw) / 2, (height + ch) / 2


def _colormap(name):
    import matplotlib

    if not isinstance(name, str):
        return name  # a matplotlib Colormap
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown cmap {name!r}: a matplotlib colormap name such as 'jet', 'viridis', "
                         "'inferno'") from None


def colormap(values: np.ndarray, cmap="jet") -> np.ndarray:
    """values in [0, 1], (H, W) -> (H, W, 3) uint8 through a matplotlib colormap (a name or a Colormap)."""
    return (_colormap(cmap)(np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def blend(image: np.ndarray, grid_map, alpha: float = 0.5, cmap="jet", region=None) -> np.ndarray:
    """The one overlay drawing: image (H, W, 3) uint8 and a raw map (h, w) -> (H, W, 3) uint8. The map is min-max
    normalised, upsampled bilinearly (half-pixel centres) to `region` (x0, y0, x1, y1) of the image (default: the
    whole image; it may reach past the image, as a 'border' crop does), coloured by `cmap` and alpha-blended there;
    the image outside the region is unchanged."""
    from vitx_fast.postprocess import normalize, upsample

    H, W = image.shape[:2]
    if isinstance(grid_map, torch.Tensor):
        m = grid_map.detach().cpu()
    else:
        m = torch.from_numpy(np.array(grid_map, np.float64))
    x0, y0, x1, y1 = (0, 0, W, H) if region is None else (round(v) for v in region)
    canvas_w, canvas_h = max(1, x1 - x0), max(1, y1 - y0)
    # the region on a canvas of its own (it may reach past the image), then the part inside the image pasted back
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    canvas[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
    heat = colormap(upsample(normalize(m.double()[None]), (canvas_h, canvas_w))[0].numpy(), cmap)
    over = (alpha * heat + (1 - alpha) * canvas.astype(np.float64)).round().clip(0, 255).astype(np.uint8)
    out = image.copy()
    out[iy0:iy1, ix0:ix1] = over[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
    return out


def add_colorbar(image: np.ndarray, lo: float, hi: float, cmap="jet") -> np.ndarray:
    """image (H, W, 3) uint8 -> the image with a vertical colour bar of `cmap` on its right, labelled with the map's
    raw range (top: hi, bottom: lo); wider than `image`, same height."""
    from PIL import Image, ImageDraw, ImageFont

    H, W = image.shape[:2]
    bar_w, pad = max(8, W // 24), max(3, W // 64)
    font = ImageFont.load_default()
    labels = [f"{hi:.3g}", f"{lo:.3g}"]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(probe.textbbox((0, 0), t, font=font)[2] for t in labels)
    text_h = max(probe.textbbox((0, 0), t, font=font)[3] for t in labels)
    canvas = Image.new("RGB", (W + pad + bar_w + pad + text_w + pad, H), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    ramp = np.linspace(1.0, 0.0, H)[:, None].repeat(bar_w, 1)  # top = the map's maximum
    canvas.paste(Image.fromarray(colormap(ramp, cmap)), (W + pad, 0))
    d = ImageDraw.Draw(canvas)
    tx = W + pad + bar_w + pad
    d.text((tx, 0), labels[0], fill=(0, 0, 0), font=font)
    d.text((tx, max(0, H - text_h - 1)), labels[1], fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _originals(images, cfg: dict | None, what: str = "images") -> list[tuple[np.ndarray, bool]]:
    """images -> [(uint8 (H, W, 3), is the model's view)]: originals at their own size, or a float batch
    de-normalised (the model's input itself)."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = images.detach().cpu().double()
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{what}: {_describe(images)}; a float image batch is (B, 3, H, W) or (3, H, W)")
        if cfg and cfg.get("mean") and cfg.get("std"):
            mean = torch.tensor(cfg["mean"], dtype=torch.float64).view(1, 3, 1, 1)
            std = torch.tensor(cfg["std"], dtype=torch.float64).view(1, 3, 1, 1)
            x = x * std + mean
        elif x.numel() and (x.min() < 0 or x.max() > 1):  # unknown normalisation: stretch each image to [0, 1]
            lo = x.flatten(1).amin(1).view(-1, 1, 1, 1)
            hi = x.flatten(1).amax(1).view(-1, 1, 1, 1)
            x = (x - lo) / (hi - lo).clamp_min(1e-12)
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [(a, True) for a in arr]
    return [(np.asarray(p), False) for p in to_pil_list(images, what)]


def overlay(images, maps, alpha: float = 0.5, cmap="jet", colorbar: bool = False, model=None, config=None):
    """Draw explanation maps on the images they explain -> a list of PIL images.

    images: what `preprocess` takes (PIL images, paths, uint8 arrays / tensors, a list of them): each is drawn at its
    own size, the map upsampled onto the region the model saw (the crop of `model`'s / `config`'s data config;
    without either, the whole image); or the float batch given to `vx.explain` (B, 3, H, W), de-normalised with the
    mean / std of `model` / `config` (without either: [0, 1] values as they are, others stretched per image).
    maps: an Explanation, or a tensor / array (B, h, w) or (B, K, h, w) for B images, or (h, w) for one image. Each
    map is min-max normalised, coloured by `cmap` (a matplotlib colormap name or Colormap) and alpha-blended.
    colorbar: add a colour bar to the right of each image, labelled with the map's raw minimum and maximum.
    Returns B PIL images for (B, h, w) / (h, w) maps, or B lists of K for (B, K, h, w) maps.
    """
    from PIL import Image

    from vitx_fast.explanation import Explanation

    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    cmap = _colormap(cmap)
    if isinstance(maps, Explanation):
        maps = maps.maps
    if isinstance(maps, np.ndarray):
        maps = torch.from_numpy(np.array(maps, dtype=np.float64))  # a copy: the array may be read-only
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be an Explanation, a torch tensor or a numpy array, got {_describe(maps)}")
    maps = maps.detach().cpu().double()
    cfg = data_config(model, config) if model is not None or config is not None else None
    pics = _originals(images, cfg)
    B = len(pics)
    if maps.dim() == 2:
        if B != 1:
            raise ValueError(f"maps of shape {tuple(maps.shape)} (one map) for {B} images: expected ({B}, h, w) or "
                             f"({B}, K, h, w)")
        maps = maps[None]
    if maps.dim() not in (3, 4) or maps.shape[0] != B:
        raise ValueError(f"maps of shape {tuple(maps.shape)} for {B} image(s): expected ({B}, h, w) or "
                         f"({B}, K, h, w)" + (" or (h, w)" if B == 1 else ""))
    out = []
    for (img, is_view), m in zip(pics, maps, strict=True):
        region = None if is_view else model_view(img.shape[1], img.shape[0], cfg)
        tiles = []
        for mk in (m if m.dim() == 3 else m[None]):
            drawn = blend(img, mk, alpha, cmap, region)
            if colorbar:
                drawn = add_colorbar(drawn, float(mk.min()), float(mk.max()), cmap)
            tiles.append(Image.fromarray(drawn))
        out.append(tiles if maps.dim() == 4 else tiles[0])
    return out
