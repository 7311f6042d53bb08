"""ImageNet-style folders with Pascal VOC boxes (the ILSVRC val layout), and export of the generated benchmark.

Layout read by ``load_image_folder``::

    root/<class>/<stem>.<ext>                 images, one sub-folder per class (sorted names -> labels 0..C-1)
    annotations/<stem>.xml                    one VOC XML per image; also accepted: annotations/<class>/<stem>.xml
                                              or <stem>.xml next to the image (annotations=None)

A dataset folder, as ``export_benchmark`` (``vitx data export``) writes it, is also accepted as ``root``; the batch
job (``vitx explain DIR``) then reads only its images::

    DIR/images/<class>/<stem>.png             the images (class folder = the first object's label)
    DIR/annotations/<stem>.xml                VOC boxes of every object
    DIR/masks/<stem>_<k>.png                  object masks (masks=True reads them)

VOC boxes are 1-based inclusive pixel indices (``one_based=True``); they are returned as half-open 0-based
``x0, y0, x1, y1`` (x0 = xmin - 1, x1 = xmax), the convention of ``make_benchmark``.
"""
from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from vitx_fast.data.images import IMAGE_EXTENSIONS, atomic_write, save_image


def dataset_layout(root) -> tuple[str, str, str] | None:
    """(images, annotations, masks) folders when `root` is a dataset folder (images/ and annotations/ inside),
    else None."""
    images, annotations = os.path.join(root, "images"), os.path.join(root, "annotations")
    if os.path.isdir(images) and os.path.isdir(annotations):
        return images, annotations, os.path.join(root, "masks")
    return None


class AnnotationError(ValueError):
    """A VOC XML file is malformed (the message names the file and the problem)."""


@dataclass
class FolderData:
    """images: torch.float32 (N, 3, H, W); labels: int64 (N,) (class folder index); boxes: list of N float64
    arrays (n_i, 4) x0, y0, x1, y1 in the coordinates of the returned images; box_labels: list of N int64 arrays
    (n_i,) (class index of each object, -1 for a name that is not a class folder); boxes_original: the same
    boxes in the original image pixels; sizes: (N, 2) original (width, height); masks: list of N bool arrays
    (n_i, H, W) or None; skipped: [(path, reason)] of unreadable images."""

    images: object
    labels: np.ndarray
    boxes: list
    box_labels: list
    boxes_original: list
    sizes: np.ndarray
    paths: list
    classes: list
    masks: list | None = None
    skipped: list = field(default_factory=list)
    missing_annotations: list = field(default_factory=list)


def read_voc_xml(path, one_based=True):
    """Parse one VOC annotation -> {"filename", "size": (w, h) or None, "names": [str], "boxes": (n, 4) float64
    half-open 0-based}. Raises ``AnnotationError`` on any malformed content."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise AnnotationError(f"{path}: cannot parse XML ({e})") from e
    if root.tag != "annotation":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    size = None
    sz = root.find("size")
    if sz is not None and sz.find("width") is not None and sz.find("height") is not None:
        try:
            size = (int(float(sz.findtext("width"))), int(float(sz.findtext("height"))))
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{path}: non-numeric <size>") from e
    names, boxes = [], []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise AnnotationError(f"{path}: object {k} has no <name>")
        bb = obj.find("bndbox")
        if bb is None:
            raise AnnotationError(f"{path}: object {k} ({name}) has no <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as e:
            raise AnnotationError(f"{path}: object {k} ({name}) has a missing or non-numeric bndbox coordinate") from e
        if xmax < xmin or ymax < ymin:
            raise AnnotationError(f"{path}: object {k} ({name}) has xmax < xmin or ymax < ymin")
        off = 1.0 if one_based else 0.0
        boxes.append([xmin - off, ymin - off, xmax - off + 1.0, ymax - off + 1.0])
        names.append(name)
    return {"filename": root.findtext("filename"), "size": size, "names": names,
            "boxes": np.asarray(boxes, np.float64).reshape(-1, 4)}


def _find_xml(annotations, cls, stem, image_path):
    cands = [os.path.join(os.path.dirname(image_path), stem + ".xml")] if annotations is None else [
        os.path.join(annotations, stem + ".xml"), os.path.join(annotations, cls, stem + ".xml")]
    return next((c for c in cands if os.path.isfile(c)), None)


def load_image_folder(root, annotations=None, size=None, transform=None, mean=None, std=None, masks=None,
                      one_based=True):
    """Read an ImageNet-style folder with VOC boxes (see the module docstring).

    Images are converted to RGB and either passed to ``transform(PIL.Image) -> tensor (3, H', W')`` or resized
    to ``size`` (int or (w, h)) with bilinear interpolation, scaled to [0, 1] and normalised with ``mean``/``std``
    when given. Boxes are scaled from the original (W, H) to the output (W', H'), exact for a plain resize; for
    other transforms use ``boxes_original``. ``masks``: folder of ``<stem>_<k>.png`` object masks (as written by
    ``export_benchmark``), resized with nearest neighbour. Unreadable images are skipped and reported (warning
    and ``skipped``); a malformed XML raises ``AnnotationError``. A dataset folder (``dataset_layout``) as root reads
    its images/ and annotations/ (and masks/ with ``masks=True``).
    """
    import torch

    layout = dataset_layout(root)
    if layout is not None:
        root, found_annotations, found_masks = layout
        annotations = found_annotations if annotations is None else annotations
        masks = found_masks if masks is True else masks
    elif masks is True:
        raise ValueError(f"{root}: masks=True needs a dataset folder (images/, annotations/, masks/)")

    if transform is None and size is None:
        raise ValueError("give size= or transform= (images of a folder may differ in size)")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders")
    index = {c: i for i, c in enumerate(classes)}
    out = FolderData(images=None, labels=None, boxes=[], box_labels=[], boxes_original=[], sizes=None, paths=[],
                     classes=classes, masks=[] if masks else None)
    images, labels, sizes = [], [], []
    for cls in classes:
        for fname in sorted(os.listdir(os.path.join(root, cls))):
            path = os.path.join(root, cls, fname)
            stem, ext = os.path.splitext(fname)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB")
            except Exception as e:  # unreadable or truncated file: skip, report
                out.skipped.append((path, f"{type(e).__name__}: {e}"))
                continue
            W, H = im.size
            xml = _find_xml(annotations, cls, stem, path)
            if xml is None:
                out.missing_annotations.append(path)
                ann = {"names": [], "boxes": np.zeros((0, 4))}
            else:
                ann = read_voc_xml(xml, one_based=one_based)
            x = transform(im) if transform is not None else _resized_tensor(im, size, mean, std)
            h2, w2 = x.shape[-2:]
            scale = np.array([w2 / W, h2 / H, w2 / W, h2 / H])
            out.boxes_original.append(ann["boxes"])
            out.boxes.append(ann["boxes"] * scale)
            out.box_labels.append(np.array([index.get(n, -1) for n in ann["names"]], np.int64))
            if masks:
                out.masks.append(_object_masks(masks, stem, len(ann["names"]), (w2, h2)))
            images.append(x)
            labels.append(index[cls])
            sizes.append((W, H))
            out.paths.append(path)
    if out.skipped:
        shown = ", ".join(p for p, _ in out.skipped[:5]) + (" ..." if len(out.skipped) > 5 else "")
        warnings.warn(f"skipped {len(out.skipped)} unreadable image(s): {shown}", stacklevel=2)
    out.images = torch.stack(images) if images else torch.zeros(0, 3, 0, 0)
    out.labels = np.asarray(labels, np.int64)
    out.sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    return out


def _resized_tensor(im, size, mean, std):
    """PIL RGB image -> (3, h, w) float tensor in [0, 1] resized bilinearly to size (int or (w, h)), normalised by
    mean / std when given."""
    import torch

    w2, h2 = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(np.asarray(im.resize((w2, h2), Image.BILINEAR), np.float32) / 255.0).permute(2, 0, 1)
    if mean is not None:
        x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x


def _object_masks(folder, stem: str, n: int, size) -> np.ndarray:
    """The n object masks `<stem>_<k>.png` in `folder`, resized (nearest) to size (w, h): bool (n, h, w)."""
    w2, h2 = size
    ms = []
    for k in range(n):
        with Image.open(os.path.join(folder, f"{stem}_{k}.png")) as m:
            ms.append(np.asarray(m.convert("L").resize((w2, h2), Image.NEAREST)) > 127)
    return np.stack(ms) if ms else np.zeros((0, h2, w2), bool)


def _voc_xml(filename, folder, W, H, names, boxes):
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = filename
    sz = ET.SubElement(ann, "size")
    for tag, v in (("width", W), ("height", H), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(v)
    for name, (x0, y0, x1, y1) in zip(names, boxes, strict=True):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        # half-open 0-based -> VOC 1-based inclusive
        for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(bb, tag).text = str(int(v))
    ET.indent(ann)
    return ET.tostring(ann, encoding="unicode")


def export_benchmark(out_dir, split="test", n=100, objects=1, seed=0, size=None):
    """Write a generated benchmark slice as ``out_dir/images/<digit>/<name>.png`` (class folder = first digit),
    ``out_dir/annotations/<name>.xml`` (VOC boxes of every digit, in order) and ``out_dir/masks/<name>_<k>.png``.
    Each file is written under a temporary name and renamed. Returns the generated arrays (``generate_raw``)."""
    from vitx_fast.data.generate import generate_raw

    d = generate_raw(split, n, objects, seed, size)
    for sub in ("annotations", "masks") + tuple(os.path.join("images", str(c)) for c in range(10)):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)  # all ten class folders: labels = digits
    for i in range(len(d["raw"])):
        labels = [str(int(v)) for v in d["labels"][i]]
        name = f"{split}_s{seed}_o{objects}_{i:06d}"
        cls_dir = os.path.join(out_dir, "images", labels[0])
        save_image(d["raw"][i], os.path.join(cls_dir, name + ".png"))
        for k in range(objects):
            save_image(d["masks"][i, k].astype(np.uint8) * 255, os.path.join(out_dir, "masks", f"{name}_{k}.png"))
        S = d["raw"].shape[1]
        xml = _voc_xml(name + ".png", labels[0], S, S, labels, d["boxes"][i]).encode()
        atomic_write(os.path.join(out_dir, "annotations", name + ".xml"), lambda f, xml=xml: f.write(xml))
    return d
