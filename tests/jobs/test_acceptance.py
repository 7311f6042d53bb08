"""The issue's acceptance scenarios on 300 generated scenes in nested folders with same-stem files (demo model):
three methods -> 900 rows; a fourth method -> exactly 300 more; killed (SIGKILL) five times at random moments and
re-run with the same command -> exactly the right rows, none twice, none truncated, no temporary files."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from jobutils import assert_same_rows, deadline, write_scenes

import vitx_fast as vx
from vitx_fast.jobs import JobSpec, check_store, run

pytestmark = pytest.mark.slow
LAYOUT = ("a/{i:03d}.png", "b/c/{i:03d}.png", "b/c/{i:03d}.jpg")  # a/007.png, b/c/007.png, b/c/007.jpg: 3 images
METHODS = ["rollout", "reciprocam", "agcam"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    keys = write_scenes(root, 100, LAYOUT, seed=3)
    assert len(keys) == len(set(keys)) == 300
    return root


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """The uninterrupted job with three methods (the first scenario)."""
    store = tmp_path_factory.mktemp("ref") / "store"
    result = run(JobSpec(inputs=[str(tree)], store=str(store), methods=METHODS, batch_size=64), progress=False)
    return store, result


def test_three_methods_then_a_fourth(reference, tree, tmp_path):
    store, result = reference
    assert (result.explained, result.skipped, result.failed, result.rows_written) == (300, 0, 0, 900)
    df = vx.read_results(store, columns=["image", "method"])
    assert len(df) == 900 and df.groupby("method").size().to_dict() == dict.fromkeys(METHODS, 300)
    assert {"a/007.png", "b/c/007.png", "b/c/007.jpg"} <= set(df["image"])
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    more = run(JobSpec(inputs=[str(tree)], store=str(copy), methods=METHODS + ["gae"], batch_size=64),
               progress=False)
    assert (more.explained, more.skipped, more.rows_written) == (300, 0, 300)
    df = vx.read_results(copy, columns=["image", "method"])
    assert len(df) == 1200 and (df["method"] == "gae").sum() == 300 and check_store(copy) == []
    again = run(JobSpec(inputs=[str(tree)], store=str(copy), methods=METHODS + ["gae"], batch_size=64),
                progress=False)
    assert (again.explained, again.skipped, again.rows_written) == (0, 300, 0)


def _shards(store) -> int:
    d = store / "results"
    return len([f for f in os.listdir(d) if f.startswith("part-")]) if d.is_dir() else 0


def test_killed_five_times_then_resumed(reference, tree, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "vitx_fast", "explain", str(tree), "--out", str(store), "--method", *METHODS,
           "--batch-size", "16", "--shard-rows", "48", "--quiet"]
    rng = random.Random(12)
    kills = []
    with deadline(420, "kill and resume"):
        for wait_for in (0, 1, 2, 3, 2):  # new shards to see before the kill (0: during start-up)
            before = _shards(store)
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            while _shards(store) < before + wait_for and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))  # a random moment: computing, or in the middle of a shard's write
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append((proc.returncode, _shards(store) - before))
        assert all(code == -signal.SIGKILL for code, _ in kills), kills  # every run was killed, none finished
        assert sum(n for _, n in kills) >= 5  # the killed runs made progress that the re-runs kept
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "failed 0 of 300" in done.stdout and "skipped" in done.stdout
    assert check_store(store) == []  # every unit once and whole, no temporary file left
    assert not list(store.rglob(".tmp-*"))
    assert_same_rows(vx.read_results(reference[0]), vx.read_results(store))
