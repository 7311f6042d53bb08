"""The result store: one writer (lock), atomic shards, stale temporaries, a full disk, and its own consistency check."""
import errno
import os

import pyarrow.parquet as pq
import pytest

import vitx_fast as vx
from vitx_fast.jobs import JobSpec, StoreError, StoreLockedError, check_store, run
from vitx_fast.jobs.store import Store


def spec(inputs, store, **kw):
    return JobSpec(inputs=[str(i) for i in inputs], store=str(store), **{"methods": ["rollout"], **kw})


def test_second_job_on_a_store_refuses_naming_the_first(tmp_path):
    with Store.open(str(tmp_path / "s"), "job-one", {"command": "vitx explain"}):
        with pytest.raises(StoreLockedError) as e:
            Store.open(str(tmp_path / "s"), "job-two")
        msg = str(e.value)
        assert "in use by job job-one" in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
    Store.open(str(tmp_path / "s"), "job-two").close()  # released with the first job


def test_stale_temporaries_removed_and_symlinks_never_followed(tmp_path):
    s = Store.open(str(tmp_path / "s"), "j1")
    s.close()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for d in ("", "results", "errors"):
        (tmp_path / "s" / d / ".tmp-killed.parquet").write_bytes(b"PAR1 half")
    (tmp_path / "s" / "results" / ".tmp-link.parquet").symlink_to(victim)
    # a link planted where a shard will go: os.replace swaps the link itself, its target is untouched
    (tmp_path / "s" / "results" / "part-j2-00000.parquet").symlink_to(victim)
    with Store.open(str(tmp_path / "s"), "j2") as store:
        assert not list((tmp_path / "s").rglob(".tmp-*"))
        import pyarrow as pa

        store.write_shard(pa.table({"x": [1]}), "results", 0)
    assert victim.read_text() == "keep me"
    assert not os.path.islink(tmp_path / "s" / "results" / "part-j2-00000.parquet")


def test_a_folder_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="not empty and is not a result store"):
        Store.open(str(tmp_path / "photos"), "j")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        Store.open(str(tmp_path / "file"), "j")


def test_full_disk_stops_with_one_line_and_nothing_half_written(scenes, tmp_path, monkeypatch):
    root, keys = scenes
    store = tmp_path / "s"
    real = pq.write_table
    calls = {"n": 0}

    def full_disk(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard: bytes reach the file, then the disk is full
            where.write(b"PAR1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(StoreError) as e:
        run(spec([root], store, batch_size=4, shard_rows=4), progress=False)
    msg = str(e.value)
    assert "the disk is full" in msg and str(store) in msg and "\n" not in msg
    assert not list(store.rglob(".tmp-*"))
    assert len(vx.read_results(store)) == 4 and check_store(store) == []  # the first shard, whole
    monkeypatch.setattr(pq, "write_table", real)
    result = run(spec([root], store, batch_size=4), progress=False)  # the same job resumes
    assert result.skipped == 4 and result.explained == len(keys) - 4
    assert len(vx.read_results(store)) == len(keys) and check_store(store) == []


def test_unwritable_store_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot write to result store") as e:
        Store.open(str(blocker / "sub"), "j")
    assert "\n" not in str(e.value)


def test_check_store_finds_a_unit_stored_twice(scenes, tmp_path):
    root, keys = scenes
    store = tmp_path / "s"
    run(spec([root / "a"], store), progress=False)
    assert check_store(store) == []
    (shard,) = (store / "results").glob("part-*.parquet")
    os.link(shard, store / "results" / "part-copy.parquet")
    assert any("stored twice" in p for p in check_store(store))
