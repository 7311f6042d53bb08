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


class ImageDecodeError(ValueError):
    """An input cannot be decoded as an image; the message names the input and the reason."""


# PIL's decompression-bomb guard raises above twice this many pixels; keep it as the default limit
MAX_PIXELS = 178_956_970


def read_image(source, name: str | None = None, max_pixels: int = MAX_PIXELS):
    """Decode one image into an RGB `PIL.Image`, the way a camera or a browser shows it.

    source: a path (str / os.PathLike; only regular files: FIFOs, devices and folders are refused before opening),
    bytes, or a binary file object. EXIF orientation is applied; 16-bit and 32-bit greyscale are scaled to 8 bits by
    their bit depth (not clipped); CMYK, palette and alpha images are converted (alpha composited on white).
    Raises ImageDecodeError naming `name` (default: the path) and the reason.
    """
    import contextlib
    import io
    import os
    import stat
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    if isinstance(source, (str, os.PathLike)):
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then checks what was opened
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise ImageDecodeError(f"{label}: cannot read ({exc.strerror or exc})") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise ImageDecodeError(f"{label}: {kind}, not an image file")
        opener = os.fdopen(fd, "rb")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageDecodeError(f"{label}: empty data")
        opener = io.BytesIO(bytes(source))
    else:
        opener = source
    try:
        with contextlib.closing(opener) if opener is not source else contextlib.nullcontext(), \
                warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opener) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageDecodeError(f"{label}: {w}x{h} pixels exceeds the limit of {max_pixels}")
                im.load()  # decode now: a truncated file fails here, not later
                return to_rgb(ImageOps.exif_transpose(im))
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{label}: not an image (unknown format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageDecodeError(f"{label}: cannot decode ({reason})") from None


def to_rgb(im):
    """A PIL image of any mode -> RGB, 8 bits per channel; high-bit-depth modes scaled by their range."""
    import numpy as np
    from PIL import Image

    if im.mode == "RGB":
        return im.copy() if im.readonly else im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im, dtype=np.uint16).astype(np.float64) / 65535.0
        return Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        # 32-bit integer images hold 16-bit data in practice (PNG 16-bit greyscale opens as "I")
        top = 65535.0 if a.max(initial=0) <= 65535 else float(2**31 - 1)
        return Image.fromarray(np.round(np.clip(a, 0, top) / top * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if a.max(initial=0) <= 1.0 else 255.0
        return Image.fromarray(np.round(np.clip(a / top, 0, 1) * 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def atomic_write(path, write) -> None:
    """Write a file so that `path` is either absent/old or complete: write(binary file) goes to a fresh file made by
    `tempfile.mkstemp` next to `path` (O_CREAT | O_EXCL: a planted symlink is never followed), which is flushed,
    fsynced and renamed to `path`. On any error the temporary file is removed and the error re-raised. Used for
    exported images and for the result store's shards (vitx_fast.jobs.store)."""
    import contextlib
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(str(path))[1], dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; these are shared outputs, readable like any other
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not every filesystem allows a folder fsync
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def save_image(image, path, format: str = "PNG") -> None:
    """A PIL image or a uint8 (H, W[, 3]) array -> an image file, written atomically (`atomic_write`)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    atomic_write(path, lambda f: img.save(f, format=format))
