"""Fused-op benchmark: reference (torch) vs cpp (and triton on CUDA) at ViT-B/16 sizes.

    nice python benchmarks/bench_ops.py                       # all ops, float32 and float64, CPU (+ CUDA if present)
    nice python benchmarks/bench_ops.py --ops agcam_epilogue --dtypes float32 --rep 30
    nice python benchmarks/bench_ops.py --compare benchmarks/results/ops.csv   # ratios to the last recorded run

Sizes: B=8, L=12, H=12, T=197, d=64; masked_variant_attention with N=196 variants of the 14x14 Gaussian ReciproCAM table
(CLS + up to 9 patches active), padded to A=11; safe_divide at the (P, K, Q) of the LRP fast path's divisions
(SAFE_DIVIDE_SHAPES). Every backend's result is checked against the reference before it is timed. Appends to
benchmarks/results/ops.csv and rewrites benchmarks/results/ops.md with this run and the verdict "cpp beats torch" per
op (in every dtype, shape and thread count), which is what `CPP_DEFAULT` in vitx_fast/ops/<op>.py must say. Without a
GPU the CPU backends still run, and the script says so.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from utils import append_csv, assert_close, bench_interleaved, latest, markdown_table, nbytes, read_csv, row_key, stamp

import vitx_fast.ops as ops
from vitx_fast import _ext

B, L, H, T, D_HEAD = 8, 12, 12, 197, 64
GRID, P, A = (14, 14), 1, 11
# (P, K, Q) of the LRP fast path's safe_divide on ViT-B/16 at batch 8 with K classes: the fc1 output (197 x 3072), the
# block width (197 x 768, one and three classes), attention probabilities (B*H = 96 rows of 197 x 197) and per-head
# values (197 x 64)
SAFE_DIVIDE_SHAPES = [(8, 1, 197 * 3072), (8, 1, 197 * 768), (8, 3, 197 * 768), (96, 1, 197 * 197), (96, 3, 197 * 64)]
RESULTS = Path(__file__).parent / "results"


def gaussian_table(dtype: torch.dtype):
    """ReciproCAM's Gaussian mask (cls_token=True) as the padded active table: idx, m, valid (N, A), log_nz (N,)."""
    G = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))
    h, w = GRID
    N = h * w
    idx = torch.zeros(N, A, dtype=torch.long)
    m = torch.zeros(N, A, dtype=dtype)
    valid = torch.zeros(N, A, dtype=torch.bool)
    log_nz = torch.empty(N, dtype=dtype)
    for i in range(h):
        for j in range(w):
            act = [(t, 1.0) for t in range(P)]
            act += [(P + (i + di) * w + j + dj, G[di + 1][dj + 1]) for di in (-1, 0, 1) for dj in (-1, 0, 1)
                    if 0 <= i + di < h and 0 <= j + dj < w]
            n = i * w + j
            for a, (t, wt) in enumerate(act):
                idx[n, a], m[n, a], valid[n, a] = t, wt, True
            log_nz[n] = math.log(P + N - len(act))
    return idx, m, valid, log_nz


def op_shapes(op: str) -> list:
    """The shapes an op is timed at: SAFE_DIVIDE_SHAPES for safe_divide, the one ViT-B/16 case (None) otherwise."""
    return SAFE_DIVIDE_SHAPES if op == "safe_divide" else [None]


def make_case(op: str, dtype: torch.dtype, device: torch.device, shape=None, seed: int = 0):
    """(args, bytes moved by a fused kernel: inputs read once + output written)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).to(device)

    if op == "masked_variant_attention":
        idx, m, valid, log_nz = (x.to(device) for x in gaussian_table(dtype))
        N = idx.shape[0]
        args = [randn(B, N, H, D_HEAD, scale=0.5), randn(B, T, H, D_HEAD), randn(B, T, H, D_HEAD), idx, m, valid,
                log_nz, randn(H, D_HEAD), randn(H, D_HEAD)]
        moved = nbytes(*args) + nbytes(args[0])  # out has the shape of q
    elif op == "safe_divide":
        Pn, K, Q = shape
        a, b = randn(Pn, K, Q), randn(Pn, Q)
        b[:, ::7] = 0  # masked entries, as where LRP's denominators vanish
        args = [a, b]
        moved = nbytes(a, b, a)  # out has the shape of a
    elif op == "agcam_epilogue":
        args = [randn(B, L, H, D_HEAD), randn(B, L, H, T, D_HEAD), randn(B, L, H, T, scale=3.0)]
        moved = nbytes(*args) + B * T * args[0].element_size()
    else:
        a = torch.softmax(randn(B, L, H, T, scale=2.0).double(), -1).to(dtype)
        args = [a, randn(B, L, H, T, D_HEAD), randn(B, L, H, D_HEAD)]
        moved = nbytes(*args) + B * L * T * a.element_size()
    return args, moved


def shape_str(op: str, shape=None) -> str:
    if op == "safe_divide":
        return "P{}-K{}-Q{}".format(*shape)
    if op == "masked_variant_attention":
        return f"B{B}-N{GRID[0] * GRID[1]}-A{A}-H{H}-T{T}-d{D_HEAD}"
    return f"B{B}-L{L}-H{H}-T{T}-d{D_HEAD}"


def impls_for(device: torch.device, wanted: list[str]) -> list[str]:
    out = []
    for impl in wanted:
        if impl == "cpp" and (device.type != "cpu" or not _ext.is_available()):
            continue
        if impl == "triton" and device.type != "cuda":
            continue
        out.append(impl)
    return out


def run(ops_wanted, impls_wanted, dtypes, devices, threads, warmup, rep) -> list[dict]:
    rows = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)  # the C++ kernels follow torch's thread count
        ctx = stamp()
        for device in devices:
            for op in ops_wanted:
                fn = getattr(ops, op)
                for dtype, shape in ((d, s) for d in dtypes for s in op_shapes(op)):
                    args, moved = make_case(op, dtype, device, shape)
                    expected = fn(*args, kernels="reference")
                    impls = ["reference"] + [i for i in impls_for(device, impls_wanted) if i != "reference"]
                    for impl in impls[1:]:
                        assert_close(fn(*args, kernels=impl), expected, f"{op} {impl} {dtype}")
                    timed = bench_interleaved({impl: (lambda fn=fn, args=args, impl=impl: fn(*args, kernels=impl))
                                               for impl in impls}, device, warmup=warmup, rep=rep)
                    ref_ms = timed["reference"]["ms_p50"]
                    for impl, t in timed.items():
                        rows.append({"op": op, "backend": impl, "dtype": str(dtype).replace("torch.", ""),
                                     "shape": shape_str(op, shape), **{k: f"{v:.4f}" for k, v in t.items()},
                                     "gbps": f"{moved / t['ms_p50'] / 1e6:.3f}",
                                     "speedup_vs_reference": f"{ref_ms / t['ms_p50']:.3f}", "device": device.type,
                                     **ctx})
                        print(f"{device.type:>4} {n_threads}T {op:<25} {rows[-1]['dtype']:<8} {rows[-1]['shape']:<24} "
                              f"{impl:<9} {t['ms_p50']:9.2f} ms (p20 {t['ms_p20']:.2f}, p80 {t['ms_p80']:.2f})  "
                              f"x{ref_ms / t['ms_p50']:.2f} vs reference", flush=True)
    return rows


def verdict(rows: list[dict]) -> dict[str, bool]:
    """op -> the cpp kernel is faster than torch for every dtype, shape and thread count measured on CPU."""
    out: dict[str, bool] = {}
    for r in rows:
        if r["backend"] == "cpp" and r["device"] == "cpu":
            out[r["op"]] = out.get(r["op"], True) and float(r["speedup_vs_reference"]) > 1.0
    return out


def write_markdown(rows: list[dict], path: Path, compare: dict | None) -> None:
    extra = None
    if compare is not None:
        col = []
        for r in rows:
            old = compare.get(row_key(r))
            col.append(f"{float(old['ms_p50']) / float(r['ms_p50']):.2f}x" if old else "-")
        extra = {"vs --compare": col}
    wins = verdict(rows)
    defaults = ops.cpp_defaults()
    r0 = rows[0]
    lines = [
        "# Fused ops: reference (torch) vs C++ (and Triton on CUDA)",
        "",
        f"`nice python benchmarks/bench_ops.py` - torch {r0['torch']}, commit {r0['commit']}, {r0['timestamp']}, on a "
        "2-core machine shared with other jobs. Wall-clock median (p20-p80 shown) of runs that alternate the backends, "
        "so each sees the same background load; every backend was checked against the reference before timing. "
        "`threads` is torch.set_num_threads, which the C++ kernels follow. GB/s counts the inputs read once plus the "
        "output written.",
        "",
        f"Sizes: ViT-B/16 at 224 - B={B}, L={L}, H={H}, T={T}, d={D_HEAD}; masked_variant_attention with N=196 "
        f"variants (14x14 Gaussian table, A={A}); safe_divide at the (P, K, Q) of the LRP fast path's divisions at "
        "B=8 (fc1 output, block width with 1 and 3 classes, attention probabilities, per-head values).",
        "",
        markdown_table(rows, extra),
        "",
        "## cpp beats torch?",
        "",
        "| op | cpp faster on CPU (all dtypes, shapes and thread counts) | CPP_DEFAULT in vitx_fast/ops/<op>.py |",
        "|---|---|---|",
    ]
    lines += [f"| {op} | {'yes' if win else 'no'} | {defaults.get(op)} |" for op, win in wins.items()]
    if not any(r["device"] == "cuda" for r in rows):
        lines += ["", "No CUDA device in this run: Triton was not timed."]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=list(ops.OPS), choices=list(ops.OPS))
    ap.add_argument("--impls", nargs="+", default=["reference", "cpp", "triton"], choices=list(ops.FAMILIES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64", "float16"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rep", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="torch (and C++) thread counts to run; default: 1 and torch's default")
    ap.add_argument("--compare", type=Path, default=None, help="an older ops.csv: show p50 ratios to its last run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    threads = args.threads or sorted({1, torch.get_num_threads()})
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    if not torch.cuda.is_available():
        print("no CUDA device: timing the CPU backends only (reference, cpp)", file=sys.stderr)
    if not _ext.is_available():
        print(f"native module not loaded ({_ext.import_error()}): cpp is skipped", file=sys.stderr)
    compare = latest(read_csv(args.compare)) if args.compare else None
    rows = run(args.ops, args.impls, [getattr(torch, d) for d in args.dtypes], devices, threads, args.warmup, args.rep)
    append_csv(args.out / "ops.csv", rows)
    write_markdown(rows, args.out / "ops.md", compare)
    for op, win in verdict(rows).items():
        print(f"{op}: cpp {'beats' if win else 'does NOT beat'} torch; CPP_DEFAULT = {ops.cpp_defaults()[op]}")
    print(f"wrote {args.out / 'ops.csv'} and {args.out / 'ops.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
