"""Service benchmark: requests/s and p50/p95 latency of POST /v1/explain for 1, 8 and 32 concurrent clients, with
dynamic batching on (max_batch_size 32) and off (1), on the bundled demo model and ViT-S/16 (random weights).
One local Ray; both configurations deployed side by side on 127.0.0.1 and measured in alternation; the same image
and request for every call. Writes benchmarks/results/serve.{csv,md}.

    python benchmarks/bench_serve.py                     # demo + vit_small_patch16_224, reciprocam and gae
    python benchmarks/bench_serve.py --quick             # demo model, reciprocam only
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["model", "method", "batching", "max_batch_size", "clients", "requests", "rps", "p50_ms", "p95_ms",
           "mean_batch", "failures", "speedup_vs_off", "cpus", "load_before", "version", "commit", "timestamp"]


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the service at {url} did not become healthy in {timeout:.0f} s")


def test_image(model_name: str) -> bytes:
    """A PNG the model classifies: a generated benchmark scene, resized for a 224-px model."""
    from PIL import Image

    from vitx_fast.data import make_benchmark

    img = Image.fromarray(make_benchmark("test", 1, 1, seed=0).raw[0])
    if model_name != "demo":
        img = img.resize((224, 224))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--requests", type=int, default=240, help="requests per run of a (config, clients) cell")
    ap.add_argument("--reps", type=int, default=3, help="alternating runs per cell (the median is reported)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from vitx_fast import __version__
    from vitx_fast.serve.app import build
    from vitx_fast.serve.client import load, multipart
    from vitx_fast.serve.core import ServeConfig

    models = ["demo"] if args.quick else ["demo", "vit_small_patch16_224"]
    methods = ["reciprocam"] if args.quick else ["reciprocam", "gae"]
    load_before = os.getloadavg()[0]
    cpus = os.cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    rows = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    for model in models:
        image = test_image(model)
        # both configurations deployed side by side (/on, /off) and measured in alternation, so that both see the
        # same background load; the median of `--reps` alternating runs per cell
        for mbs, prefix in ((32, "/on"), (1, "/off")):
            cfg = ServeConfig(model=model, random_weights=model != "demo", max_batch_size=mbs,
                              batch_wait_timeout_s=0.01, threads=1)
            serve.run(build(cfg, replicas=1, num_cpus=0.5), name=prefix.strip("/"), route_prefix=prefix)
            wait_healthy(url + prefix)
        for method in methods:
            body, ctype = multipart({"method": method}, image)
            for prefix in ("/on", "/off"):
                load(url + prefix, body, ctype, clients=4, requests=20)  # warm-up
            for clients in (1, 8, 32):
                n = max(24, args.requests // (4 if clients == 1 else 1) // (4 if model != "demo" else 1))
                runs = {"/on": [], "/off": []}
                for _ in range(args.reps):
                    for prefix in ("/on", "/off"):
                        runs[prefix].append(load(url + prefix, body, ctype, clients=clients, requests=n,
                                                 deadline_s=300))
                for prefix, rs in runs.items():
                    r = sorted(rs, key=lambda x: x.rps)[len(rs) // 2]  # the median run
                    rows.append({"model": model, "method": method, "batching": prefix.strip("/"),
                                 "max_batch_size": 32 if prefix == "/on" else 1, "clients": clients,
                                 "requests": len(r.latencies_ms), "rps": round(r.rps, 1),
                                 "p50_ms": round(r.quantile(0.5), 1), "p95_ms": round(r.quantile(0.95), 1),
                                 "mean_batch": round(sum(r.batch_sizes) / max(1, len(r.batch_sizes)), 2),
                                 "failures": sum(len(x.failures) for x in rs), "cpus": cpus,
                                 "load_before": round(load_before, 2), "version": __version__, "commit": commit,
                                 "timestamp": stamp})
                    print(rows[-1], flush=True)
        for prefix in ("/on", "/off"):
            serve.delete(prefix.strip("/"))
    serve.shutdown()
    ray.shutdown()
    off = {(r["model"], r["method"], r["clients"]): r["rps"] for r in rows if r["batching"] == "off"}
    for r in rows:
        base = off.get((r["model"], r["method"], r["clients"]))
        r["speedup_vs_off"] = round(r["rps"] / base, 2) if base else ""
    write(rows)
    return 0


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "serve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["# Service benchmark (`benchmarks/bench_serve.py`)", "",
             f"Ray Serve on 127.0.0.1: the two configurations deployed side by side (one replica each, 1 torch "
             f"thread) and measured in alternation, the median of 3 runs per cell; {rows[0]['cpus']} CPUs shared by "
             f"the replicas, Serve's proxy and the load clients (threads with keep-alive connections, in the same "
             f"machine); load average before: {rows[0]['load_before']}. Commit {rows[0]['commit']}, "
             f"{rows[0]['timestamp']}. `batching on`: `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)`; "
             "`off`: max_batch_size 1. Every request: one PNG, `POST /v1/explain` multipart, JSON response.", "",
             "| model | method | batching | clients | req/s | p50 ms | p95 ms | mean batch | failures | x off |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['batching']} | {r['clients']} | {r['rps']} | {r['p50_ms']} "
                     f"| {r['p95_ms']} | {r['mean_batch']} | {r['failures']} | {r['speedup_vs_off']} |")
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'serve.csv'} and {RESULTS / 'serve.md'}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
