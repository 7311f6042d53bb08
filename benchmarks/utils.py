"""Small shared harness of the op benchmarks: timing quantiles, a correctness gate before timing, an append-only CSV
and a markdown table. Used by benchmarks/bench_ops.py.

CSV columns: op,backend,dtype,shape,ms_p50,ms_p20,ms_p80,gbps,speedup_vs_reference,device,threads,torch,version,commit,
timestamp. Rows are appended, so a file keeps the history of runs; `--compare` reads an older file back.
"""
from __future__ import annotations

import csv
import datetime
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

COLUMNS = ["op", "backend", "dtype", "shape", "ms_p50", "ms_p20", "ms_p80", "gbps", "speedup_vs_reference", "device",
           "threads", "torch", "version", "commit", "timestamp"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times: list[float]) -> dict[str, float]:
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"ms_p50": float(q[0]), "ms_p20": float(q[1]), "ms_p80": float(q[2])}


def bench(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 15) -> dict[str, float]:
    """Wall time of `fn()` in ms: median (p50) and the 20th/80th percentiles over `rep` runs after `warmup` (>= 1)
    untimed runs."""
    return bench_interleaved({"fn": fn}, device, warmup, rep)["fn"]


def bench_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 3,
                      rep: int = 15) -> dict[str, dict[str, float]]:
    """Like `bench` for several functions, run in alternation (a, b, c, a, b, c, ...): on a machine shared with other
    jobs, every contender then sees the same background load, which sequential runs do not guarantee. Every function
    is warmed up at least once (`warmup` 0 still runs one untimed round): a first call pays allocation and lazy
    initialisation, and timing it would skew every ratio."""
    for _ in range(max(1, warmup)):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rep):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(ts) for name, ts in times.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Gate before timing: a wrong kernel is never timed. Tolerance relative to the output's magnitude, per dtype."""
    rel = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[expected.dtype]
    scale = float(expected.abs().max().double().clamp(min=1e-30))
    err = float((actual.double() - expected.double()).abs().max())
    if not err <= rel * scale:
        raise AssertionError(f"{what}: max error {err:.3e} exceeds {rel:g} x max|ref| = {rel * scale:.3e}; not timed")


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def stamp() -> dict[str, str]:
    """Context columns shared by every row of a run."""
    from vitx_fast import __version__

    return {"threads": str(torch.get_num_threads()), "torch": torch.__version__, "version": __version__,
            "commit": git_commit(), "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}


def append_csv(path: Path, rows: list[dict], columns=None) -> None:
    columns = columns or COLUMNS
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in columns})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_key(r: dict) -> tuple:
    return (r["op"], r["backend"], r["dtype"], r["shape"], r["device"], r["threads"])


def latest(rows: list[dict]) -> dict[tuple, dict]:
    """The most recent row per (op, backend, dtype, shape, device, threads)."""
    out = {}
    for r in rows:
        out[row_key(r)] = r
    return out


def markdown_table(rows: list[dict], extra: dict[str, list[str]] | None = None) -> str:
    head = ["op", "shape", "dtype", "threads", "backend", "ms p50", "ms p20-p80", "GB/s", "speedup vs reference"]
    extra = extra or {}
    head += list(extra)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        cells = [r["op"], r["shape"], r["dtype"], r["threads"], r["backend"], f"{float(r['ms_p50']):.2f}",
                 f"{float(r['ms_p20']):.2f}-{float(r['ms_p80']):.2f}", f"{float(r['gbps']):.2f}",
                 f"{float(r['speedup_vs_reference']):.2f}x"]
        cells += [col[i] for col in extra.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
