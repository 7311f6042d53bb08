"""Speed and memory of every method, as ratios to a plain forward of the same model measured in the same run.

Used by `vitx bench` and `benchmarks/bench_explainers.py` (both take the flags of `add_arguments`).

- **Warm-up**: before anything is timed, every timed function, the plain forward included, runs at least once
  untimed (first calls pay allocation, lazy initialisation, kernel loading and thread-pool start-up).
- **Time**: then `reps` rounds; in each round every case runs right after its own plain forward
  (fwd, m1, fwd, m2, ...), so a method and the forward it is compared with see the same background load on a
  shared machine. A row reports the case's median and 20th / 80th percentile (ms), and `ratio_to_forward`, the
  median of the per-pair ratios (case time / the forward timed just before it). The forward row pools every
  paired forward of the run (ratio 1 by definition).
- **Memory**: each case runs again in a fresh process (`python -m vitx_fast.bench --peak SPEC`): load the model,
  create the inputs, record the resident memory (the baseline), then warm up and run the case once while the peak
  is tracked: the kernel's high-water mark VmHWM reset at the baseline (`/proc/self/clear_refs`) and, in any case,
  a background thread sampling /proc/self/statm; `peak_mb` is the peak minus the baseline (on CUDA:
  `torch.cuda.max_memory_allocated` minus the allocation at the baseline). The plain forward's peak is a row, so
  a method's `peak_ratio_to_forward` and the target "peak <= 2 x a forward + 512 MB" (`mem_target_ok`) can be read.
- **Rows**: the plain `inference_mode` forward; "autograd fwd+bwd" (an autograd forward and
  `torch.autograd.grad(out[:, top1].sum(), x)` with every parameter frozen), the floor of the gradient methods;
  "lrp floor: forward + products" (a plain forward, then the matrix products LRP needs after it,
  `lrp_floor_products`, on random matrices), a lower bound of LRP on the machine;
  every method on the default (automatically chosen) backend, top-1 or every class for the methods that yield
  all classes in one pass (ReciproCAM); GAE with five classes per image; optionally other backends
  (`--backend`, `--reference`); the peers (OpenVINO XAI's ViTReciproCAM, pytorch-grad-cam's GradCAM) when
  installed, else a "missing" row with the import error. A case that fails is an "error" row with its message.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "vit_base_patch16_224"
DEFAULT_BATCH = 8
DEFAULT_REPS = 5
DEFAULT_METHODS = ("reciprocam", "agcam", "rollout", "gae", "daam", "grad_rollout", "lrp")  # the row order
NEEDS_TRAINING = ("tame",)  # an explainer trained for the model: not in the default rows (ask with --method tame)
MULTI_CLASS = {"gae": "top5"}  # method -> extra row with this target ("gae, 5 classes per image")
FORWARD = "forward"
AUTOGRAD = "autograd fwd+bwd"
LRP_FLOOR = "lrp floor: forward + products"
PEERS = ("openvino_xai:reciprocam", "pytorch_grad_cam:gradcam")
PEER_NOTES = {"openvino_xai:reciprocam": "peer: all classes, one image at a time",
              "pytorch_grad_cam:gradcam": "peer: top-1, GradCAM on blocks[-1].norm1 (also computes weight gradients)"}
MEM_TARGET_EXTRA_MB = 512.0  # a method's peak <= 2 x the forward's peak (weights included) + 0.5 GB

COLUMNS = ["model", "img_size", "batch", "method", "target", "backend", "requested_backend", "status", "median_ms",
           "p20_ms", "p80_ms", "images_per_s", "forward_ms", "ratio_to_forward", "ratio_p20", "ratio_p80", "reps",
           "peak_mb", "peak_ratio_to_forward", "mem_target_ok", "baseline_mb", "device", "threads", "note"]


@dataclass
class Row:
    model: str
    img_size: int
    batch: int
    method: str
    target: str = ""
    backend: str = ""
    requested_backend: str = ""
    status: str = "ok"  # ok | missing (peer not installed) | error | unsupported | skipped
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    images_per_s: float = math.nan
    forward_ms: float = math.nan  # median of the forwards paired with this case
    ratio_to_forward: float = math.nan  # median of the paired ratios
    ratio_p20: float = math.nan
    ratio_p80: float = math.nan
    reps: int = 0
    peak_mb: float = math.nan
    peak_ratio_to_forward: float = math.nan
    mem_target_ok: str = ""
    baseline_mb: float = math.nan
    device: str = "cpu"
    threads: int = 0
    note: str = ""


@dataclass
class Case:
    """One timed function. kind: forward | autograd | lrp_floor | method | peer."""

    kind: str
    label: str  # the row's method column
    method: str = ""  # method name (kind method) or peer key (kind peer)
    target: str | None = None
    backend: str | None = None  # requested backend name; None = chosen automatically
    note: str = ""
    reps: int = 0  # timed rounds (0: the run's reps)
    fn: Callable[[], object] | None = field(default=None, repr=False)
    resolved: str = ""

    def spec(self) -> dict:
        return {"kind": self.kind, "method": self.method, "target": self.target, "backend": self.backend}


def default_methods() -> list[str]:
    """DEFAULT_METHODS, then any other registered method (a new method gets its row without editing this file),
    without the ones that need a trained explainer."""
    import vitx_fast as vx

    known = vx.list_methods()
    return [m for m in DEFAULT_METHODS if m in known] + [m for m in known if m not in DEFAULT_METHODS
                                                         and m not in NEEDS_TRAINING]


# ---------------------------------------------------------------- models, inputs and the timed functions
def make_model(name: str, img_size: int | None = None, seed: int = 0, device: str = "cpu"):
    """'demo' (the bundled trained ViT) or a timm model with random weights (seeded: the same weights in the timing
    process and in every memory process; no download)."""
    if name == "demo":
        from vitx_fast.models.demo import load_demo_model

        if img_size:
            raise ValueError("--img-size does not apply to the demo model (64 px)")
        return load_demo_model().eval().to(device)
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r} (see timm.list_models('vit*'))")
    torch.manual_seed(seed)
    kw = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=False, **kw).eval().to(device)


def make_images(model, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=g).to(next(model.parameters()).device)


def forward_fn(model, x) -> Callable[[], object]:
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def autograd_fn(model, x) -> Callable[[], object]:
    """Autograd forward and the gradient of the top-1 logits to the input only: every parameter has
    requires_grad False for the call (restored after), so no weight gradient is computed."""
    def run():
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            with torch.enable_grad():
                xi = x.detach().requires_grad_(True)
                out = model(xi)
                top1 = out.argmax(-1, keepdim=True)
                (g,) = torch.autograd.grad(out.gather(1, top1).sum(), xi)
            return g
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
    return run


def lrp_floor_products(model, batch: int) -> list[tuple[int, int, int, int]]:
    """(G, M, K, N), G products of (M, K) @ (K, N), of every matrix product Chefer LRP's top-1 map needs after the
    forward (`start_layer` 0; B = batch images of the model's own size, T tokens, r pooled rows, R = r in the top
    block and T below, H heads of size d), per block from the top down:

    - the gradient to the input through each Linear (qkv, proj, fc1, fc2; block 0: none through its qkv), and through
      the attention: dA = dO V^T, then (above block 0) dQ = dS K, dK = dS^T Q, dV = A^T dO;
    - the z+ rule of each Linear, with W = W+ + W- and x = x+ + x-: the denominator x+ W+^T + x- W-^T =
      (x W^T + |x| |W|^T) / 2 costs one product (x W^T is the forward's), the relevance x+ (S W+) + x- (S W-) two
      (S W and S |W|); block 0's qkv none (the map reads its attention relevance, which lies above its qkv);
    - the attention matmuls' gradient x input rules: R_A = A (S V^T), then (above block 0) R_V = V (A^T S),
      R_Q = Q (S' K), R_K = K (S'^T Q); their denominators A V and Q K^T are the forward's.

    The top block's proj, MLP and query rows are the r pooled rows. Nothing else is counted (no norm, softmax or
    element-wise step, nothing recomputed), so a plain forward plus these products is a lower bound of the method."""
    from vitx_fast.engine.adapter import ViTAdapter
    from vitx_fast.engine.backward import pooled_rows

    a = ViTAdapter(model)
    T, D, r = a.layout().num_tokens, a.embed_dim, pooled_rows(a)
    G, d = batch * a.num_heads, a.head_dim
    out: list[tuple[int, int, int, int]] = []
    for i in range(a.depth - 1, -1, -1):
        hidden = model.blocks[i].mlp.fc1.out_features
        R = r if i == a.depth - 1 else T
        # Linear products, as (rows, out, in): the gradient and the z+ relevances; the denominators transposed
        lin = [(batch * R, D, hidden), (batch * R, hidden, D), (batch * R, D, D)]
        if i > 0:
            lin += [(batch * T, 2 * D, D), (batch * R, D, D)]  # key and value rows, then the query rows
        out += [(1, m, k, n) for m, k, n in lin * 3] + [(1, m, n, k) for m, k, n in lin]
        # attention products: dA and R_A (R x d @ d x T); above block 0 dQ, R_Q (R x T @ T x d), dK, dV, R_K, R_V
        out += [(G, R, d, T)] * 2
        if i > 0:
            out += [(G, R, T, d)] * 2 + [(G, T, R, d)] * 4
    return out


def lrp_floor_fn(model, x) -> Callable[[], object]:
    """A plain forward of x, then the products of `lrp_floor_products` on preallocated random matrices (torch.mm /
    torch.bmm into kept outputs), in the model's dtype and device."""
    g = torch.Generator().manual_seed(0)
    p = next(model.parameters())
    shapes = lrp_floor_products(model, x.shape[0])
    mats = {}
    for G, m, k, n in shapes:
        if (G, m, k, n) not in mats:
            dims = [(m, k), (k, n), (m, n)] if G == 1 else [(G, m, k), (G, k, n), (G, m, n)]
            mats[G, m, k, n] = tuple(torch.randn(*dm, generator=g).to(p) for dm in dims)
    seq = [(torch.mm if G == 1 else torch.bmm, *mats[G, m, k, n]) for G, m, k, n in shapes]
    forward = forward_fn(model, x)

    def run():
        forward()
        for mm, a, b, c in seq:
            mm(a, b, out=c)
        return seq[-1][3]
    return run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def peer_missing(key: str) -> str:
    """Why a peer library cannot run here (its import error and how to install it), or "" when it can."""
    try:
        if key == "openvino_xai:reciprocam":
            from openvino_xai.methods.white_box.torch import TorchViTReciproCAM  # noqa: F401
        elif key == "pytorch_grad_cam:gradcam":
            from pytorch_grad_cam import GradCAM  # noqa: F401
        else:
            raise ValueError(f"unknown peer {key!r}; known: {', '.join(PEERS)}")
    except ImportError as exc:  # not installed, or its own imports fail
        how = {"openvino_xai:reciprocam": "pip install openvino-xai; 1.1 pins numpy 1.x and openvino-dev 2024.4, so "
               "it installs only beside a numpy-1 stack", "pytorch_grad_cam:gradcam": "pip install grad-cam"}[key]
        return f"{_first_line(exc)} ({how})"
    except Exception as exc:  # a broken install: the import itself fails
        return _first_line(exc)
    return ""


def peer_fn(key: str, model, x) -> Callable[[], object]:
    """A peer library's explainer on `model` (which it may hook and accumulate parameter gradients on: the timing
    process gives it a copy). Raises ImportError with the reason when the peer is missing."""
    why = peer_missing(key)
    if why:
        raise ImportError(why)
    if key == "openvino_xai:reciprocam":
        from openvino_xai.methods.white_box.torch import TorchViTReciproCAM

        # hooks blocks[-1].norm1: last block, all classes; its residual broadcast works for one image at a time,
        # so a batch is a loop
        ov = TorchViTReciproCAM(model)
        xs = [x[i:i + 1].cpu().numpy() for i in range(x.shape[0])]
        return lambda: [ov.generate_saliency_map(xi) for xi in xs]
    from pytorch_grad_cam import GradCAM

    P = model.num_prefix_tokens
    h, w = model.patch_embed.grid_size

    def reshape(t):
        return t[:, P:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

    cam = GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape)
    return lambda: cam(input_tensor=x, targets=None)


def case_fn(case: Case | dict, model, x) -> Callable[[], object]:
    """The callable of a case (or of its spec in a memory process)."""
    spec = case.spec() if isinstance(case, Case) else case
    kind = spec["kind"]
    if kind == "forward":
        return forward_fn(model, x)
    if kind == "autograd":
        return autograd_fn(model, x)
    if kind == "lrp_floor":
        return lrp_floor_fn(model, x)
    if kind == "method":
        import vitx_fast as vx

        method, target, backend = spec["method"], spec.get("target"), spec.get("backend")
        return lambda: vx.explain(model, x, method=method, target=target, backend=backend)
    if kind == "peer":
        return peer_fn(spec["method"], model, x)
    raise ValueError(f"unknown case kind {kind!r}")


# ---------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(values: Sequence[float], qs=(0.5, 0.2, 0.8)) -> tuple[float, ...]:
    """Linearly interpolated quantiles (torch.quantile's default), nan for no values."""
    if not values:
        return tuple(math.nan for _ in qs)
    v = sorted(values)
    out = []
    for q in qs:
        pos = q * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return tuple(out)


def time_round_robin(fns: dict[str, Callable[[], object]], forward: Callable[[], object], reps: int,
                     warmup: int = 1, reps_of: dict[str, int] | None = None, device: torch.device | None = None,
                     errors: dict[str, str] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Warm up (the forward and every function, each at least once, untimed), then `reps` rounds of
    (forward, f) pairs for every f. Returns {name: {"ms": [...], "fwd": [...], "ratio": [...]}} and, under the
    key FORWARD, every paired forward. A function that raises (during the warm-up or later) is dropped, its
    message in `errors`."""
    device = device or torch.device("cpu")
    reps_of = reps_of or {}
    errors = errors if errors is not None else {}
    live = dict(fns)
    for w in range(max(1, warmup)):  # always at least one untimed call of everything, the forward first
        forward()
        for name, fn in list(live.items()):
            if progress:
                progress(f"warm-up {w + 1}: {name}")
            try:
                fn()
            except Exception as exc:  # recorded as an error row, the run goes on
                errors[name] = _first_line(exc)
                del live[name]
    _sync(device)

    def timed(f) -> float:
        gc.collect()
        t0 = time.perf_counter()
        f()
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    res = {name: {"ms": [], "fwd": [], "ratio": []} for name in live}
    res[FORWARD] = {"ms": [], "fwd": [], "ratio": []}
    for r in range(reps):
        for name, fn in list(live.items()):
            if r >= reps_of.get(name, reps):
                continue
            if progress:
                progress(f"round {r + 1}/{reps}: {name}")
            tf = timed(forward)
            try:
                tc = timed(fn)
            except Exception as exc:
                errors[name] = _first_line(exc)
                del live[name]
                del res[name]
                continue
            res[name]["ms"].append(tc)
            res[name]["fwd"].append(tf)
            res[name]["ratio"].append(tc / tf)
            res[FORWARD]["ms"].append(tf)
    return res


# ---------------------------------------------------------------- memory (fresh process per case)
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


def _statm_kb() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_KB
    except (OSError, ValueError, IndexError):
        return None


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _psutil_rss_kb() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss // 1024


def current_rss_kb() -> int:
    kb = _statm_kb()
    if kb is None:
        kb = _psutil_rss_kb()
    if kb is None:
        raise OSError("no way to read the resident memory (/proc/self/statm, psutil)")
    return kb


def _reset_hwm() -> bool:
    """Restart the kernel's resident high-water mark (VmHWM) here; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM:"), _status_kb("VmRSS:")
    return hwm is not None and rss is not None and hwm <= rss + 1024


class RSSSampler:
    """Largest resident memory seen by a background thread reading /proc/self/statm (or psutil) every `interval`
    seconds, and at start and stop."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak_kb = current_rss_kb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, current_rss_kb())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, current_rss_kb())


def peak_memory_here(spec: dict) -> dict:
    """In this (fresh) process: load the model and create the inputs, take the baseline, warm up and run the case
    once. Returns {"peak_mb": peak - baseline, "baseline_mb", "how"}."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    import vitx_fast  # noqa: F401  (the package and its native module are part of the baseline, not of a case)
    from vitx_fast import _ext  # noqa: F401

    device = torch.device(spec.get("device") or "cpu")
    model = make_model(spec["model"], spec.get("img_size"), device=str(device))
    x = make_images(model, spec["batch"])
    fn = case_fn(spec, model, x)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        fn()
        torch.cuda.synchronize(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20, "baseline_mb": before / 2**20,
                "how": "torch.cuda.max_memory_allocated"}
    before = current_rss_kb()
    hwm_ok = _reset_hwm()
    with RSSSampler() as sampler:
        fn()  # warm-up
        fn()  # the run
    peak = sampler.peak_kb
    how = "sampled /proc/self/statm"
    hwm = _status_kb("VmHWM:") if hwm_ok else None
    if hwm is not None and hwm >= peak:
        peak, how = hwm, "VmHWM reset at the baseline"
    return {"peak_mb": (peak - before) / 1024, "baseline_mb": before / 1024, "how": how}


def peak_memory(spec: dict, timeout: float = 3600) -> tuple[float, float, str]:
    """peak_memory_here in a fresh process: (peak MB, baseline MB, "") or (nan, nan, why it failed)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        out = subprocess.run([sys.executable, "-m", "vitx_fast.bench", "--peak", json.dumps(spec)],
                             capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return math.nan, math.nan, f"memory run timed out after {timeout:.0f} s"
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()
        return math.nan, math.nan, f"memory run failed: {tail[-1] if tail else f'exit {out.returncode}'}"
    try:
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return math.nan, math.nan, f"memory run printed no result: {out.stdout.strip()[-200:]!r}"
    return float(res["peak_mb"]), float(res["baseline_mb"]), ""


# ---------------------------------------------------------------- the run
def build_cases(model, methods: Sequence[str], backends: Sequence[str | None], batch: int, peers: bool,
                multi_class: bool, reference_reps: int, reference_max_batch: int) -> tuple[list[Case], list[Case]]:
    """(cases to time, cases that become rows without being timed: missing peers, unsupported backends)."""
    from vitx_fast.api import prepare
    from vitx_fast.methods.registry import get_method

    cases = [Case("autograd", AUTOGRAD, backend="torch", resolved="torch",
                  note="floor of the gradient methods: autograd forward + grad of the top-1 logits to the input, "
                       "parameters frozen")]
    untimed: list[Case] = []
    for method in methods:
        m = get_method(method)
        targets = ["all" if m.multi_target else None]
        if multi_class and method in MULTI_CLASS:
            targets.append(MULTI_CLASS[method])
        for target in targets:
            for backend in backends:
                if target in (None, "all"):
                    label, note = method, "all classes" if target else "top-1"
                else:
                    label, note = f"{method}, {target[3:]} classes per image", f"the {target[3:]} best classes"
                c = Case("method", label, method, target, backend, note=note)
                if backend == "reference" and batch > reference_max_batch:
                    c.note = f"reference skipped above batch {reference_max_batch} (--reference-max-batch)"
                    c.resolved = "reference"
                    untimed.append(c)
                    continue
                try:
                    c.resolved = prepare(model, method, {}, target, backend).backend.NAME
                except Exception as exc:  # unsupported model or backend: a row with the reason
                    c.note = _first_line(exc)
                    c.resolved = backend or "auto"
                    untimed.append(c)
                    continue
                if backend is None:
                    c.note += "; backend chosen automatically"
                if c.resolved == "reference":
                    c.reps = reference_reps
                cases.append(c)
                if method == "lrp" and backend is None:
                    cases.append(Case("lrp_floor", LRP_FLOOR, backend="torch", resolved="torch",
                                      note="lower bound of lrp: a plain forward, then only the matrix products the "
                                           "map needs (gradient, z+ denominators and relevances, attention "
                                           "rules; bench.lrp_floor_products)"))
    if peers:
        for key in PEERS:
            lib, meth = key.split(":")
            why = peer_missing(key)
            note = f"peer missing: {why}" if why else PEER_NOTES[key]
            c = Case("peer", meth, key, "all" if meth == "reciprocam" else None, lib, note=note, resolved=lib)
            (untimed if why else cases).append(c)
    return cases, untimed


def _row(where: dict, c: Case | None, **kw) -> Row:
    r = Row(method=c.label if c else FORWARD, **where)
    if c:
        r.target = c.target or ("top1" if c.kind in ("method", "autograd", "lrp_floor", "peer") else "")
        r.backend, r.requested_backend, r.note = c.resolved, c.backend or "auto", c.note
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def run(models: Sequence[str] = (DEFAULT_MODEL,), batches: Sequence[int] = (DEFAULT_BATCH,),
        methods: Sequence[str] | None = None, backends: Sequence[str | None] = (None,), img_size: int | None = None,
        device: str = "cpu", peers: bool = True, reps: int = DEFAULT_REPS, reference_reps: int = 2, warmup: int = 1,
        memory: bool = True, multi_class: bool = True, reference_max_batch: int = 8, progress: bool = True,
        memory_timeout: float = 3600) -> list[Row]:
    """Time and measure the peak memory of every case on every (model, batch); rows with ratios to the forward."""
    methods = list(methods or default_methods())
    backends = [None if b in (None, "auto") else b for b in backends] or [None]
    threads = torch.get_num_threads()
    rows: list[Row] = []

    def say(msg: str) -> None:
        if progress:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    for name in models:
        model = make_model(name, img_size, device=device)
        size = int(model.patch_embed.img_size[0])
        for batch in batches:
            x = make_images(model, batch)
            cases, untimed = build_cases(model, methods, backends, batch, peers, multi_class, reference_reps,
                                         reference_max_batch)
            errors: dict[str, str] = {}
            fns: dict[str, Callable[[], object]] = {}
            keyed: dict[str, Case] = {}
            for c in cases:
                key = f"{c.label} [{c.resolved}]"
                keyed[key] = c
                try:  # a peer hooks its model and leaves parameter gradients on it: it gets a copy
                    fns[key] = case_fn(c, copy.deepcopy(model) if c.kind == "peer" else model, x)
                except Exception as exc:
                    errors[key] = _first_line(exc)
            say(f"{name} B{batch}: {len(fns)} cases x {reps} rounds, each paired with a forward")
            res = time_round_robin(fns, forward_fn(model, x), reps, warmup, {k: c.reps for k, c in keyed.items()
                                                                               if c.reps}, x.device, errors,
                                   progress=say if progress else None)

            where = dict(model=name, img_size=size, batch=batch, device=str(x.device), threads=threads)

            def base(c: Case | None, where=where, **kw) -> Row:
                return _row(where, c, **kw)

            fwd = res.pop(FORWARD)
            med, p20, p80 = quantiles(fwd["ms"])
            group = [(None, base(None, backend="torch", requested_backend="torch", median_ms=med, p20_ms=p20,
                                 p80_ms=p80, images_per_s=batch * 1e3 / med, forward_ms=med, ratio_to_forward=1.0,
                                 ratio_p20=1.0, ratio_p80=1.0, reps=len(fwd["ms"]),
                                 note="torch.inference_mode forward; every forward paired with a case"))]
            for key, c in keyed.items():
                if key in errors:
                    group.append((None, base(c, status="error", note=f"{c.note}; {errors[key]}")))
                    continue
                t = res[key]
                med, p20, p80 = quantiles(t["ms"])
                rmed, r20, r80 = quantiles(t["ratio"])
                group.append((c, base(c, median_ms=med, p20_ms=p20, p80_ms=p80, images_per_s=batch * 1e3 / med,
                                      forward_ms=quantiles(t["fwd"])[0], ratio_to_forward=rmed, ratio_p20=r20,
                                      ratio_p80=r80, reps=len(t["ms"]))))
            for c in untimed:
                if c.kind == "peer":
                    group.append((None, base(c, status="missing")))
                else:
                    status = "skipped" if "skipped" in c.note else "unsupported"
                    group.append((None, base(c, status=status)))
            if memory:
                fwd_peak, w = math.nan, weights_mb(model)
                for c, r in group:
                    if r.status != "ok":
                        continue
                    spec = dict(model=name, img_size=img_size, batch=batch, device=str(x.device), threads=threads,
                                **(c.spec() if c else {"kind": "forward"}))
                    say(f"peak memory (fresh process): {r.method} [{r.backend}]")
                    r.peak_mb, r.baseline_mb, why = peak_memory(spec, memory_timeout)
                    if why:
                        r.note = f"{r.note}; {why}".lstrip("; ")
                    if c is None:
                        fwd_peak = r.peak_mb
                    r.peak_ratio_to_forward = r.peak_mb / fwd_peak if fwd_peak > 0 else math.nan
                    if c is not None and c.kind == "method" and r.peak_mb == r.peak_mb and fwd_peak == fwd_peak:
                        # the forward's peak counts the weights it reads: (W + peak) <= 2 (W + fwd) + margin,
                        # the rule of the default memory budget (vitx_fast.engine.memory.default_budget)
                        ok = w + r.peak_mb <= 2 * (w + fwd_peak) + MEM_TARGET_EXTRA_MB
                        r.mem_target_ok = "yes" if ok else "no"
            rows += [r for _, r in group]
        del model
        gc.collect()
    return rows


def weights_mb(model) -> float:
    from vitx_fast.engine.memory import weights_bytes

    return weights_bytes(model) / 2**20


# ---------------------------------------------------------------- output
def machine_facts(device: str = "cpu") -> dict[str, str]:
    """Facts of the machine and the software a run depends on (the markdown header)."""
    facts = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
             "torch": torch.__version__, "threads": str(torch.get_num_threads()), "cores": str(os.cpu_count())}
    with contextlib.suppress(AttributeError, OSError):
        facts["cores usable"] = str(len(os.sched_getaffinity(0)))
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
        if cpu:
            facts["cpu"] = cpu
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        facts["load average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    try:
        import timm

        facts["timm"] = timm.__version__
    except ImportError:
        pass
    try:
        from vitx_fast import __version__

        facts["vitx-fast"] = __version__
    except ImportError:
        pass
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        if out.stdout.strip():
            facts["commit"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(torch.device(device))
    facts["device"] = device
    return facts


def busy_warning(facts: dict[str, str]) -> str:
    """A warning when other processes load the cores this run's threads need ("" on a quiet machine)."""
    try:
        load = float(facts["load average"].split()[0])
        cores, threads = int(facts.get("cores usable", facts["cores"])), int(facts["threads"])
    except (KeyError, ValueError, IndexError):
        return ""
    if load > 0.5 and load + threads > cores + 0.5:
        return (f"busy machine: load average {load:.2f} with {threads} threads on {cores} cores; absolute times "
                "are unreliable (threads wait for each other), the paired ratios less so")
    return ""


def header(facts: dict[str, str], facts_after: dict[str, str] | None = None, title: str = "Explainer benchmark",
           command: str = "") -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += [f"`{command}`", ""]
    for k, v in facts.items():
        lines.append(f"- {k}: {v}" + (" (at the start)" if k == "load average" else ""))
    if facts_after and "load average" in facts_after:
        lines.append(f"- load average at the end: {facts_after['load average']}")
    warn = busy_warning(facts)
    if warn:
        lines.append(f"- **{warn}**")
    lines += ["", "Times: median (p20-p80) of the timed rounds after at least one untimed warm-up of every function; "
              "`x forward` is the median of the ratios to the plain forward timed just before each call "
              "(p20-p80 of the ratios in brackets). Peak: resident memory (CUDA: allocated) over the baseline "
              "after loading the model and creating the inputs, in a fresh process per row; `mem ok` is "
              f"W + peak <= 2 x (W + the forward's peak) + {MEM_TARGET_EXTRA_MB:.0f} MB, W the model's weights "
              "(a plain forward's peak counts the weights it reads; the rule of the default `memory_budget`)."]
    return "\n".join(lines)


def _f(v: float, fmt: str) -> str:
    return "-" if v != v else format(v, fmt)


def to_markdown(rows: list[Row]) -> str:
    head = ["model", "px", "B", "method", "target", "backend", "ms median (p20-p80)", "img/s",
            "x forward (p20-p80)", "peak MB", "x forward mem", "mem ok", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.status != "ok":
            cells = [r.model, str(r.img_size), str(r.batch), r.method, r.target, r.backend, f"{r.status}", "-", "-",
                     "-", "-", "-", r.note]
        else:
            cells = [r.model, str(r.img_size), str(r.batch), r.method, r.target, r.backend,
                     f"{_f(r.median_ms, '.1f')} ({_f(r.p20_ms, '.1f')}-{_f(r.p80_ms, '.1f')})",
                     _f(r.images_per_s, ".2f"),
                     f"{_f(r.ratio_to_forward, '.2f')} ({_f(r.ratio_p20, '.2f')}-{_f(r.ratio_p80, '.2f')})",
                     _f(r.peak_mb, ".1f"), _f(r.peak_ratio_to_forward, ".2f"), r.mem_target_ok or "-", r.note]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def _csv_value(v):
    if isinstance(v, float):
        return "" if v != v else f"{v:.6g}"
    return v


def write(rows: list[Row], out_dir: str | Path, stem: str, head: str = "") -> tuple[Path, Path]:
    """CSV (COLUMNS; empty cells where a value does not apply) + markdown (with the header), each written to a
    temporary name and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=COLUMNS)
        wr.writeheader()
        wr.writerows({k: _csv_value(v) for k, v in asdict(r).items()} for r in rows)
    os.replace(tmp, csv_path)
    tmp = md_path.with_name(md_path.name + ".tmp")
    tmp.write_text((head + "\n\n" if head else "") + to_markdown(rows) + "\n")
    os.replace(tmp, md_path)
    return csv_path, md_path


# ---------------------------------------------------------------- command line (vitx bench, bench_explainers.py)
class _Extend(argparse.Action):
    """Repeatable, comma- or space-separated list: --method a,b --method c."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = f"_{self.dest}_given"  # the first use on the command line replaces the default
        items = list(getattr(namespace, self.dest, None) or []) if getattr(namespace, given, False) else []
        setattr(namespace, given, True)
        for v in values if isinstance(values, list) else [values]:
            items += [s.strip() for s in str(v).split(",") if s.strip()]
        setattr(namespace, self.dest, items)


def add_arguments(p: argparse.ArgumentParser, out_default: str | None = None, name_default: str = "bench") -> None:
    """The flags of `vitx bench` and benchmarks/bench_explainers.py."""
    p.add_argument("--model", action=_Extend, nargs="+", default=[DEFAULT_MODEL],
                   help=f"'demo' or timm model names, random weights (repeatable or comma list; default "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--batch-size", dest="batch_size", action=_Extend, nargs="+", default=[str(DEFAULT_BATCH)],
                   help=f"batch sizes (repeatable or comma list; default {DEFAULT_BATCH})")
    p.add_argument("--batch", dest="batch_size", action=_Extend, nargs="+", help=argparse.SUPPRESS)  # older name
    p.add_argument("--img-size", type=int, default=None, help="input size of the timm model (default its own)")
    p.add_argument("--method", action=_Extend, nargs="+", default=None,
                   help=f"methods (repeatable or comma list; default or 'all': {','.join(DEFAULT_METHODS)} and any "
                        "other registered method but tame; gae also gets a 5-classes row)")
    p.add_argument("--backend", action=_Extend, nargs="+", default=None,
                   help="backends (auto, triton, cpp, fused, reference; repeatable or comma list; default auto)")
    p.add_argument("--reference", action="store_true", help="also time the reference backend")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS, help="timed rounds after the warm-up (>= 1)")
    p.add_argument("--reference-reps", type=int, default=2, help="timed rounds of reference-backend cases")
    # skip the reference backend above this batch size (hidden: one spelling per batch flag across `vitx`)
    p.add_argument("--reference-max-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (at least 1 is always run)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak-memory processes")
    p.add_argument("--no-peers", action="store_true", help="skip the peer libraries")
    p.add_argument("--no-multi-class", action="store_true", help="skip the 'gae, 5 classes per image' row")
    p.add_argument("--out", default=out_default, help="folder for <name>.csv and <name>.md"
                   + (f" (default {out_default})" if out_default else " (default: print only)"))
    p.add_argument("--name", default=name_default, help=f"file stem of the results (default {name_default})")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run_from_args(args, title: str = "Explainer benchmark", command: str = "") -> tuple[list[Row], str]:
    """Validate the flags, run, print the table; write CSV + markdown when --out is set. Raises ValueError."""
    import vitx_fast as vx

    if args.reps < 1 or args.reference_reps < 1:
        raise ValueError("--reps and --reference-reps must be >= 1")
    try:
        batches = [int(b) for b in args.batch_size]
    except ValueError:
        raise ValueError(f"--batch-size takes integers; got {args.batch_size}") from None
    if any(b < 1 for b in batches):
        raise ValueError("--batch-size must be >= 1")
    methods = args.method or default_methods()
    if methods == ["all"]:
        methods = default_methods()
    unknown = [m for m in methods if m not in vx.list_methods()]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; available: {', '.join(vx.list_methods())}")
    backends = list(args.backend or ["auto"])
    bad = [b for b in backends if b != "auto" and b not in vx.list_backends()]
    if bad:
        raise ValueError(f"unknown backend {bad[0]!r}; available: auto, {', '.join(vx.list_backends())}")
    if args.reference and "reference" not in backends:
        backends.append("reference")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    facts = machine_facts(args.device)
    warn = busy_warning(facts)
    if warn and not args.quiet:
        print(f"[bench] warning: {warn}", file=sys.stderr)
    rows = run(models=args.model, batches=batches, methods=methods, backends=backends, img_size=args.img_size,
               device=args.device, peers=not args.no_peers, reps=args.reps, reference_reps=args.reference_reps,
               warmup=args.warmup, memory=not args.no_memory, multi_class=not args.no_multi_class,
               reference_max_batch=args.reference_max_batch, progress=not args.quiet)
    head = header(facts, machine_facts(args.device), title, command)
    print(head + "\n\n" + to_markdown(rows))
    if args.out:
        csv_path, md_path = write(rows, args.out, args.name, head)
        print(f"wrote {csv_path} and {md_path}")
    return rows, head


def _main(argv=None) -> int:
    """`python -m vitx_fast.bench --peak SPEC`: the fresh-process half of `peak_memory` (prints one JSON line)."""
    ap = argparse.ArgumentParser(prog="python -m vitx_fast.bench")
    ap.add_argument("--peak", required=True, help="JSON case spec (see peak_memory)")
    args = ap.parse_args(argv)
    print(json.dumps(peak_memory_here(json.loads(args.peak))))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
