"""Deterministic generated localization benchmark.

Scenes are RGB canvases holding one or two handwritten digits from scikit-learn's ``load_digits`` (upscaled,
warped, coloured), drawn over a darkened background (texture, gradient, noise or a crop of one of the sample
photos bundled with scikit-image / scikit-learn) with non-digit clutter (shapes and letters). Every object is
drawn brighter than what lies under it (the polarity a small ViT needs in order to learn the task), and every
object carries an exact box and pixel mask.

Determinism: sample ``i`` is drawn from its own ``numpy.random.Generator`` seeded by
``(seed, split, objects, stream, i)``, with numpy/scipy/PIL operations only, so the same arguments give the same
bytes whatever the thread count or the order in which samples are produced.

Splits: the 1,797 source digits are split once per class (fixed seed) into 75% train / 25% test; test scenes
only ever use test digits.
"""
from __future__ import annotations

import colorsys
import functools
import os
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

BASE_SIZE = 64
SPLIT_SEED = 1797
TEST_FRACTION = 0.25
_SPLIT_CODE = {"train": 0, "test": 1}
# Fallback normalisation when no demo model config is available (= the shipped config, measured on the
# training pool).
# the bundled demo model's normalisation (its weights/demo_vit.json), so generated images fit it by default
DEFAULT_MEAN = (0.1766, 0.1741, 0.1724)
DEFAULT_STD = (0.2445, 0.2447, 0.2442)

# Offline sample images only (others need a downloader); text-like images are excluded (they hold glyphs).
_SKIMAGE_BACKGROUNDS = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "grass", "gravel",
                        "hubble_deep_field", "moon", "rocket", "immunohistochemistry", "retina")
# Letters that do not resemble digits (no O/S/Z/B/G/I/l/q/g/T...).
_LETTERS = "AHKMNRWXEFVYPUCD"
_DIGIT_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
                "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
                "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
                "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
                "cmti10.ttf", "cmb10.ttf")


@dataclass(frozen=True)
class SceneConfig:
    """Scene distribution (sizes are fractions of the canvas side)."""

    digit_size: tuple = (0.42, 0.66)       # one-object digit height
    pair_size: tuple = (0.32, 0.46)        # two-object digit height
    aspect: tuple = (0.75, 1.05)           # width / height before rotation
    rotation: float = 12.0                 # degrees, uniform +-
    shear: float = 0.15
    stroke: tuple = (0.3, 0.5)             # alpha threshold on the digit intensity (lower = thicker)
    elastic: float = 0.0                   # amplitude of a smooth warp, in source-digit pixels
    clutter: tuple = (2, 5)                # number of distractors, inclusive range (one object)
    clutter_pair: tuple = (1, 3)
    clutter_size: tuple = (0.14, 0.34)
    background_gain: tuple = (0.1, 0.3)   # background is rescaled to [0, gain]
    noise: tuple = (0.0, 0.03)
    font_digits: float = 0.0               # probability of a font-rendered digit (training only)
    mix_digits: float = 0.0                # probability of blending two same-class digits (training only)


TEST_SCENES = SceneConfig()
# Training-only augmentation: stronger warps and extra digit styles; the test split keeps held-out digits.
TRAIN_AUGMENT = replace(SceneConfig(), rotation=18.0, shear=0.25, stroke=(0.25, 0.55), elastic=0.35,
                        aspect=(0.65, 1.1), font_digits=0.1, mix_digits=0.1)


@dataclass
class Benchmark:
    """A generated benchmark slice.

    images: torch.float32 (N, 3, S, S), normalised with ``mean``/``std``; raw: uint8 (N, S, S, 3);
    labels: int64 (N,) for one object or (N, 2); boxes: int64 (N, K, 4) as x0, y0, x1, y1 (half-open pixel
    bounds: object pixels satisfy x0 <= x < x1); masks: bool (N, K, S, S); sources: int64 (N, K) index of
    the source digit in ``load_digits`` (-1 for training-only synthetic digits).
    """

    images: object
    raw: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    sources: np.ndarray
    mean: tuple
    std: tuple
    split: str = "test"
    seed: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.raw)


# ----------------------------------------------------------------------------------------------- sources
@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@functools.cache
def source_split():
    """Fixed per-class split of the 1,797 digits -> {"train": idx, "test": idx} (sorted int64 arrays)."""
    _, y = _digits()
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:k])
        train.append(idx[k:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


@functools.cache
def _by_class(split):
    _, y = _digits()
    idx = source_split()[split]
    return tuple(idx[y[idx] == c] for c in range(10))


def _font_dir():
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@functools.cache
def _font_digits(per_font=6):
    """Digits rendered from matplotlib's fonts, reduced like the NIST preprocessing of ``load_digits``
    (32x32 binary bitmap -> counts of on-pixels in 4x4 blocks) -> (float32 (M, 8, 8), labels (M,))."""
    rng = np.random.default_rng(SPLIT_SEED + 1)
    out, labels = [], []
    for name in _DIGIT_FONTS:
        path = os.path.join(_font_dir(), name)
        if not os.path.exists(path):
            continue
        font = ImageFont.truetype(path, 48)
        for c in range(10):
            img = Image.new("L", (80, 80), 0)
            ImageDraw.Draw(img).text((16, 4), str(c), fill=255, font=font)
            a = np.asarray(img, np.float32) / 255.0
            ys, xs = np.nonzero(a > 0.5)
            if len(ys) == 0:
                continue
            glyph = Image.fromarray((a[ys.min():ys.max() + 1, xs.min():xs.max() + 1] * 255).astype(np.uint8))
            for _ in range(per_font):
                g = glyph.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, expand=True)
                h = int(rng.integers(24, 33))
                w = max(4, min(32, int(round(g.width * h / g.height * rng.uniform(0.8, 1.25)))))
                g = np.asarray(g.resize((w, h), Image.BILINEAR), np.float32) / 255.0
                bits = g > rng.uniform(0.3, 0.6)
                # pen strokes of the NIST bitmaps are thicker than most font strokes
                bits = ndimage.binary_dilation(bits, iterations=int(rng.integers(1, 3)))
                canvas = np.zeros((32, 32), np.float32)
                y0, x0 = (32 - h) // 2, (32 - w) // 2
                canvas[y0:y0 + h, x0:x0 + w] = bits
                d8 = canvas.reshape(8, 4, 8, 4).sum(axis=(1, 3))
                out.append(d8 / max(float(d8.max()), 1.0))
                labels.append(c)
    return np.stack(out).astype(np.float32), np.asarray(labels, np.int64)


@functools.cache
def _backgrounds():
    """Sample photos/textures as float32 (H, W, 3) in [0, 1], reduced to a short side of at most 192 px."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    imgs = []
    for name in _SKIMAGE_BACKGROUNDS:
        try:
            imgs.append(getattr(skd, name)())
        except Exception:  # pragma: no cover - depends on the installed skimage
            continue
    imgs.extend(load_sample_images().images)
    out = []
    for a in imgs:
        a = np.asarray(a)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        im = Image.fromarray(a[..., :3].astype(np.uint8))
        scale = 192.0 / min(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
        out.append(np.asarray(im, np.float32) / 255.0)
    return tuple(out)


@functools.cache
def _clutter_bank():
    """Non-digit distractor bitmaps, float32 (32, 32) in [0, 1]: shapes and letters."""
    bank = []
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) - 15.5
    r = np.sqrt(yy ** 2 + xx ** 2)
    bank.append((r < 14).astype(np.float32))                               # disc
    bank.append(((r < 14) & (r > 9)).astype(np.float32))                    # ring
    sq = (np.abs(yy) < 13) & (np.abs(xx) < 13)
    bank.append(sq.astype(np.float32))                                      # square
    bank.append((sq & ~((np.abs(yy) < 8) & (np.abs(xx) < 8))).astype(np.float32))  # frame
    bank.append(((yy > -13) & (np.abs(xx) < (yy + 13) / 2)).astype(np.float32))     # triangle
    bank.append(((np.abs(yy) < 3) | (np.abs(xx) < 3)).astype(np.float32) * (r < 15))  # plus
    bank.append(((np.abs(yy - xx) < 4) | (np.abs(yy + xx) < 4)).astype(np.float32) * (r < 15))  # X
    bank.append(((np.abs(yy + 8) < 3) | (np.abs(yy - 8) < 3)).astype(np.float32) * (np.abs(xx) < 14))  # bars
    bank.append((np.abs(yy) + np.abs(xx) < 15).astype(np.float32))          # diamond
    font = ImageFont.truetype(os.path.join(_font_dir(), "DejaVuSans-Bold.ttf"), 30)
    for ch in _LETTERS:
        img = Image.new("L", (32, 32), 0)
        ImageDraw.Draw(img).text((16, 16), ch, fill=255, font=font, anchor="mm")
        bank.append(np.asarray(img, np.float32) / 255.0)
    return tuple(np.pad(b, 2) for b in bank)


# ----------------------------------------------------------------------------------------------- drawing
def _smoothstep(v, t, w):
    x = np.clip((v - (t - w / 2)) / w, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _place(rng, S, h, w, theta, taken, tries=30):
    """Centre (cy, cx) such that the rotated (h, w) box fits in the canvas and avoids ``taken`` boxes."""
    c, s = abs(np.cos(theta)), abs(np.sin(theta))
    eh, ew = h * c + w * s, h * s + w * c
    for _ in range(tries):
        if eh + 2 > S or ew + 2 > S:
            return None
        cy = rng.uniform(eh / 2 + 1, S - eh / 2 - 1)
        cx = rng.uniform(ew / 2 + 1, S - ew / 2 - 1)
        box = (cx - ew / 2 - 1, cy - eh / 2 - 1, cx + ew / 2 + 1, cy + eh / 2 + 1)
        if all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken):
            return cy, cx, box
    return None


def _render_alpha(src, S, cy, cx, h, w, theta, shear, threshold, elastic, rng, pad):
    """(alpha window (h', w'), y0, x0) of bitmap ``src`` (padded by ``pad`` zeros) mapped onto a rotated h x w box at
    (cy, cx)."""
    sh, sw = src.shape[0] - 2 * pad, src.shape[1] - 2 * pad
    c, s = abs(np.cos(theta)), abs(np.sin(theta))
    eh, ew = h * c + w * s + 2, h * s + w * c + 2
    y0, y1 = max(0, int(np.floor(cy - eh / 2))), min(S, int(np.ceil(cy + eh / 2)))
    x0, x1 = max(0, int(np.floor(cx - ew / 2))), min(S, int(np.ceil(cx + ew / 2)))
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = py + 0.5 - cy, px + 0.5 - cx
    # inverse rotation, then inverse shear (x' = x + shear * y)
    ct, st = np.cos(theta), np.sin(theta)
    uy, ux = ct * dy - st * dx, st * dy + ct * dx
    ux = ux - shear * uy
    sy = uy * (sh / h) + sh / 2 - 0.5 + pad
    sx = ux * (sw / w) + sw / 2 - 0.5 + pad
    if elastic > 0:
        a = rng.uniform(-elastic, elastic, size=4)
        f = rng.uniform(0.5, 1.2, size=4)
        p = rng.uniform(0, 2 * np.pi, size=4)
        sy = sy + a[0] * np.sin(f[0] * sx + p[0]) + a[1] * np.sin(f[1] * sy + p[1])
        sx = sx + a[2] * np.sin(f[2] * sy + p[2]) + a[3] * np.sin(f[3] * sx + p[3])
    v = ndimage.map_coordinates(src, [sy.ravel(), sx.ravel()], order=1, mode="constant", cval=0.0)
    return _smoothstep(v.reshape(py.shape), threshold, 0.16).astype(np.float32), y0, x0


def _composite(canvas, a, y0, x0, colour):
    win = canvas[y0:y0 + a.shape[0], x0:x0 + a.shape[1]]
    win += a[..., None] * (colour - win)


def _colour(rng):
    """A bright colour: value 0.9-1, saturation <= 0.4 (every channel >= 0.54, well above any background)."""
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.4), rng.uniform(0.9, 1.0))
    return np.array([r, g, b], np.float32)


def _background(rng, S, cfg):
    kind = rng.integers(0, 4)
    if kind == 0:  # photo / texture crop
        bank = _backgrounds()
        a = bank[rng.integers(len(bank))]
        H, W = a.shape[:2]
        side = int(rng.integers(min(48, H, W), min(H, W) + 1))
        y, x = int(rng.integers(0, H - side + 1)), int(rng.integers(0, W - side + 1))
        crop = (a[y:y + side, x:x + side] * 255).astype(np.uint8)
        bg = np.asarray(Image.fromarray(crop).resize((S, S), Image.BILINEAR), np.float32) / 255.0
        if rng.uniform() < 0.5:
            bg = bg[:, ::-1]
        if rng.uniform() < 0.3:  # recolour
            bg = bg.mean(axis=2, keepdims=True) * rng.uniform(0.3, 1.0, size=3).astype(np.float32)
    elif kind == 1:  # linear gradient between two colours
        t = np.linspace(0, 1, S, dtype=np.float32)
        ang = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(ang) * t[None, :] + np.sin(ang) * t[:, None]
        ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
        c0, c1 = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
        bg = (c0 + (c1 - c0) * ramp[..., None]).astype(np.float32)
    elif kind == 2:  # smooth coloured noise
        k = int(rng.integers(3, 10))
        coarse = rng.integers(0, 256, size=(k, k, 3), dtype=np.uint8)
        bg = np.asarray(Image.fromarray(coarse).resize((S, S), Image.BILINEAR), np.float32) / 255.0
    else:  # stripes / checker texture
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        f = rng.uniform(0.1, 0.6)
        ang = rng.uniform(0, np.pi)
        wave = np.sin(f * (np.cos(ang) * xx + np.sin(ang) * yy) + rng.uniform(0, 6.3))
        if rng.uniform() < 0.5:
            wave = wave * np.sin(f * (np.cos(ang) * yy - np.sin(ang) * xx))
        bg = ((wave[..., None] + 1) / 2 * rng.uniform(0.3, 1, size=3)).astype(np.float32)
    lo, hi = float(bg.min()), float(bg.max())
    bg = (bg - lo) / max(hi - lo, 1e-6)
    return np.ascontiguousarray(bg * np.float32(rng.uniform(*cfg.background_gain)))


def _digit_source(rng, label, split, cfg):
    """(8x8 float32 bitmap, source index or -1) for a digit of class ``label``."""
    imgs, _ = _digits()
    pool = _by_class(split)[label]
    if split == "train" and rng.uniform() < cfg.font_digits:
        fimgs, flab = _font_digits()
        choices = np.flatnonzero(flab == label)
        return fimgs[choices[rng.integers(len(choices))]], -1
    i = int(pool[rng.integers(len(pool))])
    src = imgs[i]
    if split == "train" and rng.uniform() < cfg.mix_digits:
        j = int(pool[rng.integers(len(pool))])
        lam = np.float32(rng.uniform(0.3, 0.7))
        src = lam * src + (1 - lam) * imgs[j]
        src = src / max(float(src.max()), 1e-6)
        i = -1
    return src, i


def render_scene(rng, S, objects, split, cfg=TEST_SCENES):
    """One scene -> (raw uint8 (S, S, 3), labels (K,), boxes (K, 4), masks (K, S, S), sources (K,))."""
    canvas = _background(rng, S, cfg)
    if objects == 1:
        labels = [int(rng.integers(10))]
    else:
        labels = [int(v) for v in rng.choice(10, size=objects, replace=False)]
    size_rng = cfg.digit_size if objects == 1 else cfg.pair_size
    taken, placed = [], []
    for lab in labels:
        src, idx = _digit_source(rng, lab, split, cfg)
        for _ in range(20):
            h = rng.uniform(*size_rng) * S
            w = h * rng.uniform(*cfg.aspect)
            theta = np.deg2rad(rng.uniform(-cfg.rotation, cfg.rotation))
            pos = _place(rng, S, h, w, theta, taken)
            if pos is not None:
                break
            size_rng = (size_rng[0] * 0.9, size_rng[1] * 0.9)
        else:
            raise RuntimeError("could not place the digits")  # pragma: no cover
        cy, cx, box = pos
        taken.append(box)
        placed.append((np.pad(src, 2), idx, cy, cx, h, w, theta))
    # clutter first (under the digits, never overlapping their boxes)
    lo, hi = cfg.clutter if objects == 1 else cfg.clutter_pair
    bank = _clutter_bank()
    for _ in range(int(rng.integers(lo, hi + 1))):
        b = bank[rng.integers(len(bank))]
        h = rng.uniform(*cfg.clutter_size) * S
        w = h * rng.uniform(0.6, 1.4)
        theta = np.deg2rad(rng.uniform(-30, 30))
        pos = _place(rng, S, h, w, theta, taken, tries=10)
        if pos is None:
            continue
        a, y0, x0 = _render_alpha(b, S, pos[0], pos[1], h, w, theta, 0.0, rng.uniform(0.3, 0.6), 0.0, rng, 2)
        _composite(canvas, a, y0, x0, _colour(rng))
    boxes, masks, sources = [], [], []
    for src, idx, cy, cx, h, w, theta in placed:
        shear, t = rng.uniform(-cfg.shear, cfg.shear), rng.uniform(*cfg.stroke)
        while True:  # faint sources: lower the threshold until the digit has a visible body
            a, y0, x0 = _render_alpha(src, S, cy, cx, h, w, theta, shear, t, cfg.elastic, rng, 2)
            if (a >= 0.5).sum() >= 8 or t < 0.05:
                break
            t *= 0.7
        _composite(canvas, a, y0, x0, _colour(rng))
        ys, xs = np.nonzero(a > 0)
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        m = np.zeros((S, S), bool)
        m[y0:y0 + a.shape[0], x0:x0 + a.shape[1]] = a >= 0.5
        masks.append(m)
        sources.append(idx)
    sigma = rng.uniform(*cfg.noise)
    if sigma > 0:
        canvas += rng.normal(0.0, sigma, size=canvas.shape).astype(np.float32)
    raw = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    return raw, np.asarray(labels, np.int64), np.asarray(boxes, np.int64), np.stack(masks), np.asarray(sources)


def generate_raw(split="test", n=100, objects=1, seed=0, size=None, cfg=None, start=0, stream=0):
    """Raw arrays for samples ``start .. start+n-1`` -> dict(raw, labels, boxes, masks, sources)."""
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, got {objects!r}")
    S = int(size or BASE_SIZE)
    if S < 32:
        raise ValueError(f"size must be >= 32, got {S}")
    cfg = cfg or TEST_SCENES
    out = [render_scene(np.random.default_rng([int(seed), _SPLIT_CODE[split], objects, int(stream), start + i]),
                        S, objects, split, cfg) for i in range(int(n))]
    raw, labels, boxes, masks, sources = (np.stack(v) for v in zip(*out, strict=True)) if out else (
        np.zeros((0, S, S, 3), np.uint8), np.zeros((0, objects), np.int64), np.zeros((0, objects, 4), np.int64),
        np.zeros((0, objects, S, S), bool), np.zeros((0, objects), np.int64))
    return {"raw": raw, "labels": labels, "boxes": boxes, "masks": masks, "sources": sources}


def normalise(raw, mean, std):
    """uint8 (N, S, S, 3) -> torch.float32 (N, 3, S, S) normalised with per-channel mean/std."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(raw)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def make_benchmark(split="test", n=500, objects=1, seed=0, size=None, mean=None, std=None):
    """Generate a benchmark slice (see ``Benchmark``). ``size`` defaults to the demo model's 64 px; mean/std
    default to the demo model's normalisation. Same arguments -> same bytes."""
    d = generate_raw(split, n, objects, seed, size)
    mean, std = mean or DEFAULT_MEAN, std or DEFAULT_STD
    labels = d["labels"][:, 0] if objects == 1 else d["labels"]
    return Benchmark(images=normalise(d["raw"], mean, std), raw=d["raw"], labels=labels, boxes=d["boxes"],
                     masks=d["masks"], sources=d["sources"], mean=tuple(mean), std=tuple(std), split=split,
                     seed=seed, meta={"objects": objects, "size": int(size or BASE_SIZE)})
