"""Jobs on the local executor: rows per unit, targets, failures as rows, exactly which units a re-run skips."""
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import vitx_fast as vx
from vitx_fast.jobs import JobSpec, check_store, run
from vitx_fast.models.loading import load_model


def spec(inputs, store, **kw):
    return JobSpec(inputs=[str(i) for i in inputs], store=str(store), **{"methods": ["rollout"], "batch_size": 5,
                                                                         **kw})


def test_rows_equal_a_direct_explain_call(scenes, tmp_path):
    root, keys = scenes
    result = run(spec([root], tmp_path / "s", methods=["reciprocam", "gae"], target="top2"), progress=False)
    assert (result.explained, result.skipped, result.failed) == (len(keys), 0, 0)
    df = vx.read_results(tmp_path / "s")
    assert len(df) == len(keys) * 2 * 2 and check_store(tmp_path / "s") == []
    assert set(df["image"]) == set(keys)
    row = df[(df["image"] == "b/003.jpg") & (df["method"] == "gae")].sort_values("rank")
    # the same image through the public API: same classes, scores and maps
    from vitx_fast.data.images import make_transform, read_image

    model, cfg = load_model("demo")
    x = make_transform(cfg)(read_image(root / "b" / "003.jpg"))[None]
    exp = vx.explain(model, x, method="gae", target="top2")
    assert row["target"].tolist() == exp.targets[0].tolist()
    np.testing.assert_allclose(row["probability"], exp.logits[0].double().softmax(-1)[exp.targets[0]], rtol=1e-6)
    for r, m in zip(row["map"], exp.maps[0], strict=True):
        assert r.shape == (8, 8) and r.dtype == np.float32
        np.testing.assert_allclose(r, m.numpy(), rtol=1e-4, atol=1e-6)
    assert (row["image_width"] == 64).all() and row["source"].iloc[0] == str(root / "b" / "003.jpg")


@pytest.mark.parametrize("target,rows,classes", [("all", 10, list(range(10))), ("classes:3,5", 2, [3, 5])])
def test_all_and_class_list_targets(scenes, tmp_path, target, rows, classes):
    root, keys = scenes
    run(spec([root / "a"], tmp_path / "s", methods=["reciprocam"], target=target), progress=False)
    df = vx.read_results(tmp_path / "s")
    assert len(df) == 8 * rows
    assert df.groupby("image")["target"].apply(list).map(sorted).tolist() == [classes] * 8


def _images(folder):
    """Inputs a camera or a crawler produces: EXIF-rotated, 16-bit, CMYK, palette; and ones that cannot decode."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (30, 50, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: 50 x 30 becomes 30 x 50
    im.save(folder / "rotated.jpg", exif=exif)
    Image.fromarray((rng.integers(0, 65535, (20, 20))).astype(np.uint16)).save(folder / "deep16.png")
    im.convert("CMYK").save(folder / "cmyk.jpg")
    im.convert("P").save(folder / "palette.png")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text.png").write_text("not an image")
    os.mkfifo(folder / "pipe.png")


def test_failures_are_rows_and_the_job_goes_on(tmp_path):
    _images(tmp_path / "in")
    result = run(spec([tmp_path / "in", tmp_path / "gone.png"], tmp_path / "s", methods=["rollout", "gae"]),
                 progress=False)
    failed = dict(result.failures)
    assert set(failed) == {"truncated.png", "text.png", "pipe.png", "gone.png"} and result.failed == 4
    assert "not an image" in failed["text.png"] and "FIFO" in failed["pipe.png"]
    assert "no such file" in failed["gone.png"] and "truncated.png" in failed["truncated.png"]
    df = vx.read_results(tmp_path / "s")
    assert sorted(df["image"].unique()) == ["cmyk.jpg", "deep16.png", "palette.png", "rotated.jpg"]
    rot = df[df["image"] == "rotated.jpg"].iloc[0]
    assert (rot["image_width"], rot["image_height"]) == (30, 50)  # EXIF orientation applied
    errors = vx.read_errors(tmp_path / "s")
    assert len(errors) == 4 * 2 and set(errors["stage"]) == {"decode"}
    # a re-run retries the failures (they are not done) and skips the rest
    again = run(spec([tmp_path / "in", tmp_path / "gone.png"], tmp_path / "s", methods=["rollout", "gae"]),
                progress=False)
    assert (again.skipped, again.failed, again.rows_written) == (4, 4, 0)
    assert len(vx.read_errors(tmp_path / "s")) == 8 and len(vx.read_errors(tmp_path / "s", history=True)) == 16


def test_a_failing_batch_is_retried_image_by_image_and_refusals_are_rows(scenes, tmp_path, monkeypatch):
    root, keys = scenes
    real = vx.explain
    first = str(root / "b" / "000.png")

    def picky(model, x, method, **kw):
        # gae refuses any batch holding the first image of b/: only that image may fail, not its batch
        bad = make_x(first)
        if method == "gae" and any(torch.equal(xi, bad) for xi in x):
            raise ValueError("gae: refused for the test")
        return real(model, x, method=method, **kw)

    from vitx_fast.data.images import make_transform, read_image

    tf = make_transform(load_model("demo")[1])

    def make_x(path):
        return tf(read_image(path)).float()

    monkeypatch.setattr(vx, "explain", picky)
    result = run(spec([root / "b"], tmp_path / "s", methods=["rollout", "gae"]), progress=False)
    assert result.failures == [("000.png", "gae: ValueError: gae: refused for the test")] and result.failed == 1
    df = vx.read_results(tmp_path / "s")
    assert len(df) == 16 * 2 - 1 and not ((df["image"] == "000.png") & (df["method"] == "gae")).any()
    errors = vx.read_errors(tmp_path / "s")
    assert errors[["image", "method", "stage"]].values.tolist() == [["000.png", "gae", "explain"]]


def test_resume_skips_only_the_same_unit(scenes, tmp_path):
    root, keys = scenes
    s = tmp_path / "s"
    first = run(spec([root / "a"], s), progress=False)
    assert first.rows_written == 8
    same = run(spec([root / "a"], s), progress=False)
    assert (same.skipped, same.rows_written) == (8, 0)
    changed = [spec([root / "a"], s, options={"rollout": {"head_fusion": "max"}}),  # other options
               spec([root / "a"], s, target="top2"),  # other target spec
               spec([root / "a"], s, methods=["gae"])]  # other method
    for sp in changed:
        r = run(sp, progress=False)
        assert r.skipped == 0 and r.explained == 8
    df = vx.read_results(s)
    assert len(df) == 8 + 8 + 16 + 8 and df.groupby(["options_digest", "target_spec", "method"]).ngroups == 4
    # another checkpoint of the same architecture is another model identity
    model, _ = load_model("demo")
    from safetensors.torch import save_file

    torch.manual_seed(1)
    state = {k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "other.safetensors"))
    r = run(spec([root / "a"], s, checkpoint=str(tmp_path / "other.safetensors")), progress=False)
    assert r.skipped == 0 and vx.read_results(s, columns=["model_id"])["model_id"].nunique() == 2
    assert check_store(s) == []


def test_table_of_bytes_and_heatmaps(scenes, tmp_path):
    root, keys = scenes
    data = [(root / k).read_bytes() for k in keys[:4]]
    pq.write_table(pa.table({"image": data, "id": [f"row{i}" for i in range(4)]}), tmp_path / "t.parquet")
    run(spec([tmp_path / "t.parquet"], tmp_path / "s", heatmap=True), progress=False)
    df = vx.read_results(tmp_path / "s")
    assert sorted(df["image"]) == ["row0", "row1", "row2", "row3"]
    heat, raw = df["heatmap"].iloc[0], torch.from_numpy(df["map"].iloc[0].astype(np.float64))
    expect = (vx.upsample(vx.normalize(raw[None]), (64, 64))[0] * 255).round().numpy()
    assert heat.shape == (64, 64) and heat.dtype == np.uint8 and heat.min() == 0 and heat.max() > 200
    np.testing.assert_allclose(heat, expect, atol=1)
    from vitx_fast.cli.render import render_store  # the originals come back from the table's bytes

    assert render_store(str(tmp_path / "s"), str(tmp_path / "drawn")) == (4, [])
    assert sorted(p.name for p in (tmp_path / "drawn").glob("*.grid.png")) == [f"row{i}.grid.png" for i in range(4)]


def test_methods_all_drops_refusals_with_a_note_but_a_named_method_is_an_error(scenes, tmp_path):
    root, keys = scenes
    r = run(spec([root / "a" / "000.png"], tmp_path / "s", methods=["all"], target="all"), progress=False)
    assert set(vx.read_results(tmp_path / "s")["method"]) == {"reciprocam", "rollout", "tame"}
    assert any("gae skipped" in n for n in r.notes)
    from vitx_fast.jobs import JobSpecError

    with pytest.raises(JobSpecError, match="gae cannot run this job"):
        run(spec([root / "a"], tmp_path / "s2", methods=["gae"], target="all"), progress=False)
    with pytest.raises(JobSpecError, match="class index 12 out of range for a model with 10 classes"):
        run(spec([root / "a"], tmp_path / "s3", target="3,12"), progress=False)
