"""ONNX explainer graphs: onnxruntime (CPU provider) vs the PyTorch fast path, per method, in the same run.

    nice python benchmarks/bench_onnx.py                                  # demo model + vit_tiny_patch16_224, B=1, 8
    nice python benchmarks/bench_onnx.py --models demo --methods gae agcam --batches 1 --threads 1 2 --rep 20

Per model and method: `vx.export_onnx` once (dynamic batch, top-1 target, float32; the time is recorded), then per
batch size and thread count the two contenders are checked against each other (max error of the min-max normalised
maps and of the logits, recorded; a gross mismatch stops the run) and timed in alternation (a, b, a, b, ...), so both
see the same background load on the shared machine. PyTorch: `vx.explain(model, x, method=...)` (auto backend: the
fused path with the C++ ops where they win). onnxruntime: `InferenceSession.run` with intra_op_num_threads = the torch
thread count. `ort_over_torch` = ORT time / PyTorch time (< 1: onnxruntime is faster).

Appends to benchmarks/results/onnx.csv (the history of runs) and rewrites benchmarks/results/onnx.md with this run.
tame runs with an untrained explainer of random weights (the timing does not depend on them).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from utils import append_csv, bench_interleaved, stamp

import vitx_fast as vx
from vitx_fast.onnx_export import export_onnx, exportable_methods

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["model", "method", "batch", "threads", "torch_ms_p50", "torch_ms_p20", "torch_ms_p80", "ort_ms_p50",
           "ort_ms_p20", "ort_ms_p80", "ort_over_torch", "export_s", "onnx_mb", "graph_nodes", "max_map_err",
           "median_map_err", "torch32_vs_64_max_err", "max_logit_err", "opset", "torch", "onnxruntime", "version",
           "commit", "timestamp"]
GROSS = 1e-3  # a median map error (or a logit error) above this is a broken graph, not float32 rounding


def load(name: str):
    """(model, preprocessing input size) for 'demo' or a timm name (random weights)."""
    if name == "demo":
        from vitx_fast.models.demo import load_demo_model

        model = load_demo_model()
    else:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        peaked_weights(model)
    return model.float().eval()


def peaked_weights(model, seed: int = 0) -> None:
    """Re-draw a random model's weights as the tests do (N(0, gain^2 / fan_in), gain 2.5 for qkv): timm's init gives
    near-uniform attention and nearly flat maps, whose min-max normalisation would only measure rounding."""
    import math

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                gain = 2.5 if "qkv" in name else 1.2
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def method_options(model, method: str) -> dict:
    if method == "tame":
        from vitx_fast.methods.tame.module import TAMEExplainer

        return {"explainer": TAMEExplainer.for_model(model, seed=0).eval()}
    return {}


def map_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-map max |difference| of the min-max normalised maps, (B,)."""
    return (vx.normalize(a.double()) - vx.normalize(b.double())).abs().flatten(1).amax(1)


def run_model(name: str, methods: list[str], batches: list[int], threads: list[int], rep: int, warmup: int,
              folder: Path, progress: bool) -> list[dict]:
    import onnx
    import onnxruntime as ort

    model = load(name)
    model64 = copy.deepcopy(model).double()
    H, W = model.patch_embed.img_size
    rows = []
    for method in methods:
        opts, opts64 = method_options(model, method), method_options(model64, method)
        path = folder / f"{name}-{method}.onnx"
        t0 = time.perf_counter()
        export_onnx(model, path, method, **opts)
        export_s = time.perf_counter() - t0
        proto = onnx.load(str(path))
        nodes, opset = len(proto.graph.node), {o.domain: o.version for o in proto.opset_import}[""]
        for nt in threads:
            torch.set_num_threads(nt)
            so = ort.SessionOptions()
            so.intra_op_num_threads = nt
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            for b in batches:
                g = torch.Generator().manual_seed(b)
                x = torch.randn(b, 3, H, W, generator=g)
                feeds = {"images": x.numpy()}
                ref = vx.explain(model, x, method=method, **opts)
                logits, maps = (torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds))
                ref64 = vx.explain(model64, x.double(), method=method, **opts64)
                per_map = map_errors(maps, ref.maps)
                map_err, median_err = float(per_map.max()), float(per_map.median())
                logit_err = float((logits - ref.logits).abs().max())
                # float32 conditioning of the map on this input: PyTorch float32 against PyTorch float64
                cond = map_errors(ref.maps, ref64.maps)
                # a broken graph is wrong on every image; where a map is ill-conditioned in float32 (LRP, ReciproCAM:
                # PyTorch float32 is itself off float64) ORT may differ by the same order, which is only recorded
                if not (median_err <= max(GROSS, 10 * float(cond.median())) and logit_err < GROSS):
                    raise AssertionError(f"{name} {method} B={b}: onnxruntime differs from PyTorch (median map "
                                         f"error {median_err:.2e}, PyTorch float32 vs float64 "
                                         f"{float(cond.median()):.2e}, logits {logit_err:.2e})")
                t = bench_interleaved({
                    "torch": lambda x=x, method=method, opts=opts: vx.explain(model, x, method=method, **opts),
                    "ort": lambda sess=sess, feeds=feeds: sess.run(None, feeds),
                }, torch.device("cpu"), warmup=warmup, rep=rep)
                row = {"model": name, "method": method, "batch": b, "threads": nt, "export_s": f"{export_s:.1f}",
                       "onnx_mb": f"{path.stat().st_size / 2**20:.1f}", "graph_nodes": nodes, "opset": opset,
                       "max_map_err": f"{map_err:.1e}", "median_map_err": f"{median_err:.1e}",
                       "torch32_vs_64_max_err": f"{float(cond.max()):.1e}",
                       "max_logit_err": f"{logit_err:.1e}",
                       "ort_over_torch": f"{t['ort']['ms_p50'] / t['torch']['ms_p50']:.2f}"}
                for who in ("torch", "ort"):
                    for q in ("p50", "p20", "p80"):
                        row[f"{who}_ms_{q}"] = f"{t[who][f'ms_{q}']:.2f}"
                rows.append(row)
                if progress:
                    print(f"{name:>22} {method:>10} B={b} threads={nt}: torch {row['torch_ms_p50']} ms, ort "
                          f"{row['ort_ms_p50']} ms, ratio {row['ort_over_torch']} (map err {row['max_map_err']}, "
                          f"export {export_s:.0f} s)", flush=True)
        path.unlink()
    return rows


def write(rows: list[dict], argv: list[str], out: Path = RESULTS) -> None:
    import onnxruntime as ort

    ctx = stamp()
    ctx.pop("threads")
    ctx["onnxruntime"] = ort.__version__
    for r in rows:
        r.update(ctx)
    out.mkdir(parents=True, exist_ok=True)
    append_csv(out / "onnx.csv", rows, COLUMNS)
    head = ["model", "method", "B", "threads", "PyTorch ms p50 (p20-p80)", "ORT ms p50 (p20-p80)", "ORT / PyTorch",
            "export s", "graph nodes", "MB", "map err max (median)", "PyTorch f32 vs f64", "max logit err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], r["method"], str(r["batch"]), str(r["threads"]),
            f"{r['torch_ms_p50']} ({r['torch_ms_p20']}-{r['torch_ms_p80']})",
            f"{r['ort_ms_p50']} ({r['ort_ms_p20']}-{r['ort_ms_p80']})", f"**{r['ort_over_torch']}**",
            r["export_s"], str(r["graph_nodes"]), r["onnx_mb"], f"{r['max_map_err']} ({r['median_map_err']})",
            r["torch32_vs_64_max_err"], r["max_logit_err"]]) + " |")
    md = [
        "# ONNX explainer graphs: onnxruntime CPU vs the PyTorch fast path",
        "",
        f"`nice python benchmarks/bench_onnx.py {' '.join(argv)}`".replace(" `", "`") + f" - torch {ctx['torch']}, "
        f"onnxruntime {ctx['onnxruntime']}, commit {ctx['commit']}, {ctx['timestamp']}, on a 2-core machine shared "
        "with other jobs. Wall-clock median (p20-p80) of runs alternating the two contenders, so both see the same "
        "background load. PyTorch: `vx.explain` (auto backend: the fused path, C++ ops where they win). ORT: "
        "`InferenceSession.run` of the graph `vx.export_onnx` wrote (model + explanation, the gradient methods' "
        "backward as ordinary operators), CPU provider, intra-op threads = torch threads. **ORT / PyTorch** < 1 "
        "means onnxruntime is faster. Errors: ORT vs PyTorch, min-max normalised maps (max and median over the "
        "images) and logits, both float32. Random inputs; timm models with random weights re-drawn as the tests' "
        "models (peaked attention); top-1 target; tame with "
        "an untrained explainer. `PyTorch f32 vs f64` is the max error of PyTorch's own float32 maps against float64: "
        "where it is large (LRP, ReciproCAM on such inputs) the map is ill-conditioned in float32, and ORT's float32 "
        "differs from PyTorch's by the same order.",
        "",
        *lines,
        "",
    ]
    (out / "onnx.md").write_text("\n".join(md))
    print(f"wrote {out / 'onnx.csv'} and {out / 'onnx.md'}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["demo", "vit_tiny_patch16_224"])
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {exportable_methods()}")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--rep", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for onnx.csv and onnx.md")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    methods = args.methods or exportable_methods()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitx-onnx-bench-") as tmp:
        for name in args.models:
            rows += run_model(name, methods, args.batches, args.threads, args.rep, args.warmup, Path(tmp),
                              not args.quiet)
    write(rows, argv, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
