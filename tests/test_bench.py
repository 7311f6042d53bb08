"""The benchmark harness (vitx_fast/bench.py, `vitx bench`, benchmarks/bench_explainers.py) measures honestly:
warm-up before timing, forwards paired with each case, a peak memory > 0 from a fresh process for every row, a row
for a missing peer, and the CSV columns."""
import csv
import importlib.util
import math
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import vitx_fast as vx
from vitx_fast import bench

ROOT = Path(__file__).resolve().parents[1]


def test_every_function_is_warmed_up_before_it_is_timed():
    calls = {"fwd": 0, "a": 0, "b": 0}
    order = []

    def make(name):
        def f():
            calls[name] += 1
            order.append(name)
            if calls[name] == 1:  # a first call that pays lazy initialisation
                time.sleep(0.3)
        return f

    res = bench.time_round_robin({"a": make("a"), "b": make("b")}, make("fwd"), reps=1)
    # one untimed call of everything (the forward first), then one round of (forward, case) pairs
    assert order == ["fwd", "a", "b", "fwd", "a", "fwd", "b"]
    assert calls == {"fwd": 3, "a": 2, "b": 2}
    for name in ("a", "b", bench.FORWARD):
        assert max(res[name]["ms"]) < 250, (name, res[name])  # the slow first call was never timed
    assert len(res["a"]["ratio"]) == 1 and len(res[bench.FORWARD]["ms"]) == 2


def test_warmup_zero_still_warms_up_and_a_failing_case_is_dropped():
    calls = []
    errors = {}

    def bad():
        raise RuntimeError("boom")

    res = bench.time_round_robin({"ok": lambda: calls.append("ok"), "bad": bad}, lambda: calls.append("fwd"),
                                 reps=2, warmup=0, errors=errors)
    assert calls[:2] == ["fwd", "ok"] and calls.count("ok") == 3
    assert errors == {"bad": "RuntimeError: boom"} and "bad" not in res and len(res["ok"]["ms"]) == 2


def test_reps_of_limits_slow_cases():
    res = bench.time_round_robin({"fast": lambda: None, "slow": lambda: None}, lambda: None, reps=3,
                                 reps_of={"slow": 1})
    assert len(res["fast"]["ms"]) == 3 and len(res["slow"]["ms"]) == 1


def test_quantiles():
    assert bench.quantiles([3.0, 1.0, 2.0]) == (2.0, 1.4, 2.6)
    assert all(math.isnan(v) for v in bench.quantiles([]))


def test_autograd_floor_grads_the_input_only():
    model = bench.make_model("demo")
    x = bench.make_images(model, 2)
    g = bench.autograd_fn(model, x)()
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # restored, no weight gradient


@pytest.fixture
def no_openvino(monkeypatch):
    """The OpenVINO XAI peer missing (whatever is installed), pytorch-grad-cam left out to keep the run short."""
    monkeypatch.setitem(sys.modules, "openvino_xai", None)  # `import openvino_xai...` raises ImportError
    monkeypatch.setattr(bench, "PEERS", ("openvino_xai:reciprocam",))


def test_run_rows_with_memory_from_fresh_processes(no_openvino, tmp_path):
    rows = bench.run(models=("demo",), batches=(2,), methods=("rollout",), reps=2, memory=True, multi_class=False,
                     progress=False)
    by = {(r.method, r.backend): r for r in rows}
    assert [r.method for r in rows] == [bench.FORWARD, bench.AUTOGRAD, "rollout", "reciprocam"]
    for r in rows:
        if r.status == "ok":
            assert math.isfinite(r.median_ms) and r.median_ms > 0, r
            assert r.p20_ms <= r.median_ms <= r.p80_ms and r.reps >= 2, r
            assert math.isfinite(r.ratio_to_forward) and r.ratio_to_forward > 0, r
            assert math.isfinite(r.peak_mb) and r.peak_mb > 0, r  # measured, never an unreset high-water mark
            assert math.isfinite(r.baseline_mb) and r.baseline_mb > 0, r
            assert math.isfinite(r.peak_ratio_to_forward) and r.peak_ratio_to_forward > 0, r
    fwd = rows[0]
    assert fwd.ratio_to_forward == 1.0 and fwd.peak_ratio_to_forward == 1.0
    assert rows[2].mem_target_ok in ("yes", "no")
    assert rows[2].requested_backend == "auto" and rows[2].backend in ("fused", "cpp", "triton", "reference")
    missing = by[("reciprocam", "openvino_xai")]
    assert missing.status == "missing" and "No module named" in missing.note
    assert "pip install openvino-xai" in missing.note

    csv_path, md_path = bench.write(rows, tmp_path, "explainers", bench.header(bench.machine_facts()))
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        table = list(reader)
    required = ["model", "batch", "method", "backend", "median_ms", "p20_ms", "p80_ms", "ratio_to_forward", "peak_mb",
                "peak_ratio_to_forward", "note"]
    assert reader.fieldnames == bench.COLUMNS and set(required) <= set(reader.fieldnames)
    assert len(table) == 4 and float(table[2]["peak_mb"]) > 0 and table[3]["median_ms"] == ""
    md = md_path.read_text()
    assert "- cores: " in md and "- torch: " in md and "load average" in md and "| reciprocam |" in md


def test_peak_memory_failure_is_a_reason_not_a_number():
    peak, base, why = bench.peak_memory({"model": "no_such_model", "batch": 1, "kind": "forward"}, timeout=120)
    assert math.isnan(peak) and math.isnan(base) and "unknown timm model" in why


def test_flags_repeatable_comma_lists_and_batch_alias():
    import argparse

    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    a = ap.parse_args([])
    assert a.model == [bench.DEFAULT_MODEL] and a.batch_size == [str(bench.DEFAULT_BATCH)] and a.reps == 5
    assert a.method is None and a.device == "cpu" and not a.no_memory
    a = ap.parse_args(["--method", "gae,rollout", "--method", "lrp", "--batch", "4", "--batch-size", "8,16",
                       "--model", "demo"])
    assert a.method == ["gae", "rollout", "lrp"] and a.batch_size == ["4", "8", "16"] and a.model == ["demo"]
    assert "--batch " not in ap.format_help()  # the old spelling works but is not advertised


def test_cli_bench_rejects_bad_flags(capsys):
    from vitx_fast.cli import main

    assert main(["bench", "--model", "demo", "--reps", "0", "--no-memory"]) != 0
    assert main(["bench", "--model", "demo", "--method", "nope", "--no-memory"]) != 0
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_bench_explainers_script_writes_csv_and_md(no_openvino, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_explainers", ROOT / "benchmarks" / "bench_explainers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    code = mod.main(["--model", "demo", "--batch-size", "2", "--reps", "1", "--method", "gae", "--no-memory",
                     "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "gae, 5 classes per image" in out and "autograd fwd+bwd" in out and "missing" in out
    with open(tmp_path / "explainers.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert {r["method"] for r in table} == {"forward", "autograd fwd+bwd", "gae", "gae, 5 classes per image",
                                            "reciprocam"}
    assert all(float(r["median_ms"]) > 0 for r in table if r["status"] == "ok")
    assert (tmp_path / "explainers.md").read_text().startswith("# Explainer benchmark")


def _product_macs(model, x, method):
    """MACs of the 2-D matrix products (aten.mm / addmm: Linear layers and folded matmuls) and of the batched ones
    (aten.bmm: the attention matmuls) of one explanation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class Count(TorchDispatchMode):
        mm = bmm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.mm.default, aten.addmm.default):
                a, b = (args[0], args[1]) if func is aten.mm.default else (args[1], args[2])
                Count.mm += a.shape[0] * a.shape[1] * b.shape[1]
            elif func is aten.bmm.default:
                Count.bmm += args[0].shape[0] * args[0].shape[1] * args[0].shape[2] * args[1].shape[2]
            return func(*args, **(kwargs or {}))

    with Count():
        vx.explain(model, x, method=method, backend="fused")
    return Count.mm, Count.bmm


def test_lrp_floor_is_the_fast_paths_products_less_what_the_map_does_not_need():
    """The floor's Linear products are exactly the fast path's after its forward, less those it computes for the
    relevance sums and the head (block 0's qkv z+ products, and the head's products); its attention products are at
    most the fast path's (which also recomputes the probabilities and the matmul denominators): a lower bound."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=(32, 24), patch_size=8, depth=3, embed_dim=32,
                              num_heads=2, num_classes=5).eval()
    B, T, D, C, hidden, L = 2, 1 + 4 * 3, 32, 5, 4 * 32, 3
    x = torch.randn(B, 3, 32, 24)
    shapes = bench.lrp_floor_products(model, B)
    lin = sum(m * k * n for g, m, k, n in shapes if g == 1)
    att = sum(g * m * k * n for g, m, k, n in shapes if g > 1)
    fast_mm, fast_bmm = _product_macs(model, x, "lrp")
    per_row = 3 * D * D + D * D + 2 * D * hidden
    forward = (L - 1) * B * T * per_row + B * T * 3 * D * D + B * 1 * (per_row - 3 * D * D)
    assert fast_mm - lin == forward + 3 * (B * T * D * 3 * D) + 6 * (B * D * C)
    assert 0 < att <= fast_bmm
    out = bench.lrp_floor_fn(model, x)()  # the timed function runs those products after a forward
    assert torch.isfinite(out).all()


def test_lrp_floor_row_follows_the_lrp_row():
    model = bench.make_model("demo")
    cases, _ = bench.build_cases(model, ["lrp"], [None], 2, peers=False, multi_class=False, reference_reps=1,
                                 reference_max_batch=8)
    assert [c.label for c in cases] == [bench.AUTOGRAD, "lrp", bench.LRP_FLOOR]
