"""ImageNet/VOC folder reader and benchmark export."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vitx_fast.data.voc import AnnotationError, export_benchmark, load_image_folder, read_voc_xml

XML = """<annotation><folder>{cls}</folder><filename>{stem}.JPEG</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = "<object><name>{name}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax><ymax>{3}</ymax>" \
      "</bndbox></object>"


def _write_ilsvrc(tmp_path):
    """Two classes, JPEG images of different sizes, flat annotation folder (ILSVRC val layout)."""
    rng = np.random.default_rng(0)
    img_root, ann = tmp_path / "val", tmp_path / "ann"
    ann.mkdir()
    spec = [("n01", "a1", (100, 80), [("n01", (11, 21, 50, 60))]),
            ("n01", "a2", (60, 60), [("n01", (1, 1, 60, 60)), ("n02", (5, 6, 7, 8))]),
            ("n02", "b1", (40, 120), [("n02", (3, 4, 30, 100)), ("other", (1, 1, 2, 2))])]
    for cls, stem, (w, h), objs in spec:
        (img_root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_root / cls / f"{stem}.JPEG")
        body = "".join(OBJ.format(*b, name=n) for n, b in objs)
        (ann / f"{stem}.xml").write_text(XML.format(cls=cls, stem=stem, w=w, h=h, objects=body))
    return img_root, ann, spec


def test_ilsvrc_layout_boxes_scaled_to_resized_images(tmp_path):
    img_root, ann, spec = _write_ilsvrc(tmp_path)
    d = load_image_folder(img_root, annotations=ann, size=32)
    assert d.classes == ["n01", "n02"] and d.images.shape == (3, 3, 32, 32)
    assert d.labels.tolist() == [0, 0, 1]
    for i, (_cls, _stem, (w, h), objs) in enumerate(spec):
        assert d.sizes[i].tolist() == [w, h]
        exp = np.array([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b in objs], float)
        np.testing.assert_allclose(d.boxes_original[i], exp)
        np.testing.assert_allclose(d.boxes[i], exp * [32 / w, 32 / h, 32 / w, 32 / h])
    assert d.box_labels[1].tolist() == [0, 1] and d.box_labels[2].tolist() == [1, -1]
    # normalisation, non-square size
    dn = load_image_folder(img_root, annotations=ann, size=(20, 10), mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))
    du = load_image_folder(img_root, annotations=ann, size=(20, 10))
    assert dn.images.shape == (3, 3, 10, 20) and du.images.min() >= 0 and du.images.max() <= 1
    ref = (du.images - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.25, 0.2, 0.1]).view(3, 1, 1)
    torch.testing.assert_close(dn.images, ref)
    np.testing.assert_allclose(dn.boxes[0], d.boxes_original[0] * [0.2, 0.125, 0.2, 0.125])


def test_unreadable_image_is_skipped_and_reported(tmp_path):
    img_root, ann, _ = _write_ilsvrc(tmp_path)
    (img_root / "n02" / "broken.JPEG").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        d = load_image_folder(img_root, annotations=ann, size=16)
    assert len(d.labels) == 3 and [os.path.basename(p) for p, _ in d.skipped] == ["broken.JPEG"]


@pytest.mark.parametrize("body,match", [
    ("<annotation><object><name>x</name><bndbox><xmin>1</xmin>", "cannot parse"),
    ("<annotation><object><name>x</name></object></annotation>", "no <bndbox>"),
    ("<annotation><object><name>x</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
     "</bndbox></object></annotation>", "non-numeric"),
    ("<annotation><object><name>x</name><bndbox><xmin>5</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax>"
     "</bndbox></object></annotation>", "xmax < xmin"),
    ("<foo></foo>", "expected <annotation>"),
])
def test_malformed_xml_raises(tmp_path, body, match):
    p = tmp_path / "bad.xml"
    p.write_text(body)
    with pytest.raises(AnnotationError, match=match) as e:
        read_voc_xml(p)
    assert "bad.xml" in str(e.value)


def test_malformed_xml_in_folder_raises(tmp_path):
    img_root, ann, _ = _write_ilsvrc(tmp_path)
    (ann / "a2.xml").write_text("<annotation><object>")
    with pytest.raises(AnnotationError, match="a2.xml"):
        load_image_folder(img_root, annotations=ann, size=16)


@pytest.mark.parametrize("objects", [1, 2])
def test_export_read_round_trip(tmp_path, objects):
    d = export_benchmark(tmp_path, "test", 5, objects, seed=11)
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if ".tmp" in f]
    r = load_image_folder(tmp_path / "images", annotations=tmp_path / "annotations", size=64,
                          masks=tmp_path / "masks")
    assert r.classes == [str(c) for c in range(10)] and not r.skipped and not r.missing_annotations
    # the reader orders files by class folder then name; map back through the sample index in the name
    order = [int(os.path.splitext(os.path.basename(p))[0].rsplit("_", 1)[1]) for p in r.paths]
    assert sorted(order) == list(range(5))
    for j, i in enumerate(order):
        raw = np.rint(r.images[j].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        np.testing.assert_array_equal(raw, d["raw"][i])
        assert r.labels[j] == d["labels"][i, 0]
        assert r.box_labels[j].tolist() == d["labels"][i].tolist()
        np.testing.assert_array_equal(r.boxes[j], d["boxes"][i])
        np.testing.assert_array_equal(r.masks[j], d["masks"][i])


def test_custom_transform_and_annotations_next_to_images(tmp_path):
    img_root, ann, spec = _write_ilsvrc(tmp_path)
    for f in ann.iterdir():  # move the XMLs next to their images
        cls = [c for c, s, _, _ in spec if s == f.stem][0]
        f.rename(img_root / cls / f.name)

    def transform(im):
        return torch.from_numpy(np.asarray(im.resize((24, 12)), np.float32) / 255).permute(2, 0, 1)

    d = load_image_folder(img_root, transform=transform)
    assert d.images.shape == (3, 3, 12, 24) and not d.missing_annotations
    np.testing.assert_allclose(d.boxes[0], d.boxes_original[0] * [0.24, 0.15, 0.24, 0.15])
    with pytest.raises(ValueError, match="size= or transform="):
        load_image_folder(img_root)
