"""`vitx evaluate` / vitx_fast.evaluate: rows per method, the random-weights baseline, refusals skipped, files
written."""
import copy
import csv

import pytest
import torch

from vitx_fast import evaluate as ev
from vitx_fast.cli import main
from vitx_fast.models import load_demo_model


@pytest.fixture(scope="module")
def one_object():
    return ev.bundled(n=6, objects=1, seed=3)


def test_rows_and_refused_method_skipped(one_object, capsys):
    model = load_demo_model()
    rnd = copy.deepcopy(model)
    torch.manual_seed(0)
    rnd.init_weights()
    rows, curves = ev.evaluate(rnd.eval(), one_object, ["rollout", "tame"], batch_size=4, progress=False,
                               label="random weights")
    # the shipped T-TAME explainer is tied to the trained backbone: refused for other weights, not a crash
    assert [r["method"] for r in rows] == ["rollout"]
    assert "skipping tame" in capsys.readouterr().err
    trained, _ = ev.evaluate(model, one_object, ["rollout", "tame"], batch_size=4, progress=False)
    assert [r["method"] for r in trained] == ["rollout", "tame"]
    r = trained[0]
    assert r["images"] == 6 and 0 <= r["accuracy"] <= 1 and 0 <= r["iou"] <= 1 and 0 <= r["ad100"] <= 100
    assert len(curves["rollout (random weights)"]["deletion_curve"]) > 2


def test_two_object_rows():
    data = ev.bundled(n=4, objects=2, seed=1)
    rows, _ = ev.evaluate(load_demo_model(), data, ["gae"], batch_size=4, progress=False)
    assert {"pointing_own", "pointing_other", "iou_own", "top2_has_label"} <= set(rows[0])
    assert "abpc" not in rows[0]


def test_cli_writes_table(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", "--n", "4", "--method", "rollout", "tame", "--objects", "1", "--metrics",
                 "localization", "adic", "--random-baseline", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| trained |" in text and "| random weights |" in text
    with open(out / "evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["method"]) for r in rows] == [("trained", "rollout"), ("trained", "tame"),
                                                         ("random weights", "rollout")]
    assert (out / "evaluation.md").read_text().count("\n") >= 4
