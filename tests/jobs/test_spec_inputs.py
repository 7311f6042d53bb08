"""JobSpec validation (before any image or model) and input discovery (keys, tables, exclusions)."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitx_fast.jobs import InputError, JobSpec, JobSpecError
from vitx_fast.jobs.inputs import discover
from vitx_fast.jobs.spec import method_plan, options_digest, parse_option, parse_target_spec, target_argument


@pytest.mark.parametrize("change,match", [
    (dict(methods=["gradcam++"]), "unknown method 'gradcam++'; available: agcam"),
    (dict(options={"rollout": {"head_fusion": "median"}}), "head_fusion='median' is not one of"),
    (dict(options={"rollout": {"nope": 1}}), "unknown option(s) ['nope']"),
    (dict(options={"gae": {}}), "options given for gae, which is not among the methods"),
    (dict(target="top0"), "target must be top1, topK"),
    (dict(target="3,3"), "distinct"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(executor="spark"), "executor must be one of local, ray"),
    (dict(device="tpu"), "device must be cpu or cuda"),
    (dict(inputs=[]), "no inputs"),
    (dict(methods=["rollout", "rollout"]), "given twice"),
    (dict(checkpoint="missing.safetensors"), "checkpoint not found"),
])
def test_spec_errors_name_the_problem(change, match, tmp_path):
    spec = JobSpec(**{**dict(inputs=["x"], store=str(tmp_path / "s"), methods=["rollout"]), **change})
    with pytest.raises(JobSpecError) as e:
        spec.validate()
    assert match in str(e.value) and "\n" not in str(e.value)


def test_targets_and_options_parse():
    assert [parse_target_spec(t) for t in (None, "top1", "top5", "all", "3", "3,5", "classes:7")] == \
        ["top1", "top1", "top5", "all", "classes:3", "classes:3,5", "classes:7"]
    assert target_argument("classes:3,5", 2).tolist() == [[3, 5], [3, 5]]
    assert target_argument("top1", 4) is None and target_argument("top3", 4) == "top3"
    assert parse_option("rollout.discard_ratio=0.9") == ("rollout", "discard_ratio", 0.9)
    assert parse_option("reciprocam.official=true") == ("reciprocam", "official", True)
    assert parse_option("agcam.upsample=None") == ("agcam", "upsample", None)
    assert parse_option("rollout.head_fusion=max") == ("rollout", "head_fusion", "max")
    with pytest.raises(JobSpecError, match="method.key=value"):
        parse_option("discard_ratio=0.9")


def test_options_digest_keys_on_resolved_options_and_file_content(tmp_path):
    # defaults given explicitly or not: one digest; a changed value: another
    assert method_plan("rollout", {}).digest == method_plan("rollout", {"head_fusion": "mean"}).digest
    assert method_plan("rollout", {}).digest != method_plan("rollout", {"head_fusion": "max"}).digest
    assert method_plan("reciprocam", {"official": True}).digest != method_plan("reciprocam", {}).digest
    # a file option: the digest follows the file's content, the stored options keep the path
    f = tmp_path / "bank.bin"
    f.write_bytes(b"one")
    d1 = options_digest({"memory_bank": str(f)})
    f.write_bytes(b"two")
    assert options_digest({"memory_bank": str(f)}) != d1
    assert len(d1) == 16 and int(d1, 16) >= 0


def _png(path, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 99, np.uint8)).save(path)


def test_keys_are_relative_paths_and_the_store_is_never_input(tmp_path):
    root = tmp_path / "in"
    for rel in ("a/img.jpg", "b/img.jpg", "b/img.png", ".hidden/x.png", "b/.y.png", "store/results/z.png"):
        _png(root / rel)
    (root / "notes.txt").write_text("not an image")
    store = root / "store"  # --out inside the input folder
    items = discover([str(root)], str(store))
    assert [it.key for it in items] == ["a/img.jpg", "b/img.jpg", "b/img.png"]
    with pytest.raises(InputError, match="inside the output store"):
        discover([str(store / "results")], str(store))


def test_globs_lists_missing_and_collisions(tmp_path):
    for rel in ("a/1.png", "a/sub/2.png", "b/1.png"):
        _png(tmp_path / rel)
    items = discover([str(tmp_path / "a" / "**" / "*.png")], str(tmp_path / "s"))
    assert sorted(it.key for it in items) == ["1.png", "sub/2.png"]  # relative to the glob's fixed folder
    lst = tmp_path / "list.txt"
    lst.write_text("# images\na/1.png\n\nb/1.png\nnope.png\n")
    items = discover([str(lst)], str(tmp_path / "s"))
    assert [it.key for it in items] == ["a/1.png", "b/1.png", "nope.png"]
    missing = discover([str(tmp_path / "a" / "1.png"), str(tmp_path / "gone.png")], str(tmp_path / "s"))
    assert missing[1].missing and "no such file" in missing[1].missing and missing[0].missing is None
    with pytest.raises(InputError, match="two inputs have the key '1.png'"):
        discover([str(tmp_path / "a" / "1.png"), str(tmp_path / "b" / "1.png")], str(tmp_path / "s"))
    with pytest.raises(InputError, match="no images found"):
        discover([str(tmp_path / "a" / "*.gif")], str(tmp_path / "s"))


def test_tables_paths_bytes_ids_and_structs(tmp_path):
    _png(tmp_path / "imgs" / "p.png")
    data = (tmp_path / "imgs" / "p.png").read_bytes()
    pq.write_table(pa.table({"image": [data, data], "id": ["x1", "x2"]}), tmp_path / "bytes.parquet")
    items = discover([str(tmp_path / "bytes.parquet")], str(tmp_path / "s"))
    assert [it.key for it in items] == ["x1", "x2"] and items[0].data == data
    pq.write_table(pa.table({"path": ["imgs/p.png"]}), tmp_path / "paths.parquet")
    (it,) = discover([str(tmp_path / "paths.parquet")], str(tmp_path / "s"))
    assert it.key == "imgs/p.png" and it.source == str(tmp_path / "imgs" / "p.png") and it.data is None
    hf = pa.table({"image": pa.array([{"bytes": data, "path": None}], pa.struct([("bytes", pa.binary()),
                                                                                   ("path", pa.string())]))})
    pq.write_table(hf, tmp_path / "hf.parquet")
    (it,) = discover([str(tmp_path / "hf.parquet")], str(tmp_path / "s"))
    assert it.key == "hf.parquet#0" and it.data == data
    (tmp_path / "t.csv").write_text("file,name\nimgs/p.png,007\n")
    (it,) = discover([str(tmp_path / "t.csv")], str(tmp_path / "s"), image_column="file", id_column="name")
    assert it.key == "007"
    with pytest.raises(InputError, match="no image column 'pic'"):
        discover([str(tmp_path / "t.csv")], str(tmp_path / "s"), image_column="pic")
    pq.write_table(pa.table({"image": [data, data], "id": ["same", "same"]}), tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="two inputs have the key 'same'"):
        discover([str(tmp_path / "dup.parquet")], str(tmp_path / "s"))
