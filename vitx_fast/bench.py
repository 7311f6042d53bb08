"""Speed and memory of every method and backend, as ratios to a plain forward of the same model in the same run.

Used by `vitx bench` and `benchmarks/bench_explainers.py`.

- **Time**: every case is warmed up, then run in alternation with a plain `inference_mode` forward of the same batch
  (forward, case, forward, case, ...), so both see the same background load on a shared machine. A row reports the
  case's median and its 20th / 80th percentiles (ms) and the ratio of its median to the median of its own paired
  forwards.
- **Memory**: each case runs once more in a fresh process (`python -m vitx_fast.bench --peak ...`): peak resident
  memory (VmHWM / ru_maxrss) minus the process's resident memory after loading the model and warming up one image,
  or `torch.cuda.max_memory_allocated` over the allocation before the call on CUDA. A number in MB is therefore
  always a measurement, never a 0 left by an unreset high-water mark.
- **Rows**: the plain forward; "autograd fwd+bwd" (a forward with autograd and the backward of the top-1 logit to
  the input, no parameter gradients), the floor a gradient method is measured against; every method on every
  backend that can serve it (top-1, or every class for methods that yield all classes in one pass); GAE with five
  classes per image; the peers installed as benchmark extras (`pip install -e .[bench]`: OpenVINO XAI's
  ViTReciproCAM, pytorch-grad-cam's GradCAM). A peer that is not installed is a row with its reason.
"""
from __future__ import annotations

import csv
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Row:
    model: str
    img_size: int
    batch: int
    method: str
    backend: str
    ms: float
    ms_p20: float
    ms_p80: float
    images_per_s: float
    ratio_to_forward: float
    peak_mb: float
    peak_ratio_to_forward: float
    threads: int
    torch: str
    note: str = ""


# ---------------------------------------------------------------- cases
MULTI_CLASS = {"gae-5-classes": ("gae", "top5")}  # row name -> (method, target)
AUTOGRAD = "autograd fwd+bwd"


def make_model(name: str, img_size: int | None = None, seed: int = 0):
    import timm

    torch.manual_seed(seed)  # the same random weights in the timing process and in every memory process
    kw = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=False, **kw).eval()


def make_images(model, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=g).to(next(model.parameters()).device)


def _forward(model, x):
    def run():
        with torch.inference_mode():
            return model(x)
    return run


def _autograd_floor(model, x):
    """Forward with autograd and the backward of the top-1 logits to the input only (parameters frozen for the
    call, restored after)."""
    def run():
        flags = [p.requires_grad for p in model.parameters()]
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            with torch.enable_grad():
                xi = x.detach().requires_grad_(True)
                out = model(xi)
                out.gather(1, out.argmax(-1, keepdim=True)).sum().backward()
            return xi.grad
        finally:
            for p, f in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(f)
    return run


def case_fn(kind: str, name: str, backend: str, model, x, target=None) -> Callable[[], object]:
    """The callable of one case. kind: "forward", "autograd", "method" or "peer"."""
    import vitx_fast as vx

    if kind == "forward":
        return _forward(model, x)
    if kind == "autograd":
        return _autograd_floor(model, x)
    if kind == "method":
        return lambda: vx.explain(model, x, method=name, target=target, backend=backend)
    fn, _ = _peer(name, model, x)
    return fn


def _peer(name: str, model, x) -> tuple[Callable[[], object] | None, str]:
    """(callable or None, why it is missing) of a peer library's explainer."""
    if name == "openvino_xai:reciprocam":
        try:
            from openvino_xai.methods.white_box.torch import TorchViTReciproCAM
        except Exception as exc:  # not installed, or its import fails
            return None, (f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; openvino-xai 1.1 "
                          "pins numpy 1.x and openvino-dev 2024.4, so it installs only beside a numpy-1 stack "
                          "(onnx's ml_dtypes needs numpy 2)")
        # hooks blocks[-1].norm1 (the 3rd-last norm): last block, unmasked residual, gaussian, CLS kept, all classes;
        # its residual broadcast only works for one image at a time, so a batch is a loop
        ov = TorchViTReciproCAM(model)
        xs = [x[i:i + 1].cpu().numpy() for i in range(x.shape[0])]
        return (lambda: [ov.generate_saliency_map(xi) for xi in xs]), ""
    if name == "pytorch_grad_cam:gradcam":
        try:
            from pytorch_grad_cam import GradCAM
        except Exception as exc:
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        P = model.num_prefix_tokens
        h, w = model.patch_embed.grid_size

        def reshape(t):
            return t[:, P:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

        cam = GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape)
        return (lambda: cam(input_tensor=x, targets=None)), ""
    raise ValueError(f"unknown peer {name!r}")


PEERS = ("openvino_xai:reciprocam", "pytorch_grad_cam:gradcam")


# ---------------------------------------------------------------- measurement
def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    q = torch.tensor(ts, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def time_against_forward(fn: Callable[[], object], forward: Callable[[], object], x: torch.Tensor, warmup: int = 1,
                         reps: int = 5) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Warm-up, then `reps` alternations (forward, fn). Returns (median, p20, p80) in ms of fn and of its forwards."""
    for _ in range(max(warmup, 1)):  # always at least one: first calls pay allocation and lazy initialisation
        forward()
        fn()
    _sync(x)
    tf, tc = [], []
    for _ in range(reps):
        for f, ts in ((forward, tf), (fn, tc)):
            gc.collect()
            t0 = time.perf_counter()
            f()
            _sync(x)
            ts.append((time.perf_counter() - t0) * 1000)
    return _quantiles(tc), _quantiles(tf)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _peak_kb() -> int:
    try:
        return _rss_kb("VmHWM:")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux


def _current_kb() -> int:
    try:
        return _rss_kb("VmRSS:")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_here(spec: dict) -> float:
    """In this (fresh) process: load the model, warm up one image, then run the case once; the peak (MB) over the
    resident memory before the case (CUDA: the allocator's peak over its allocation before the case)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec.get("device", "cpu"))
    model = make_model(spec["model"], spec.get("img_size")).to(device)
    x = make_images(model, spec["batch"])
    with torch.inference_mode():
        model(x[:1])  # libraries and kernels loaded: what remains is the case's own memory
    fn = case_fn(spec["kind"], spec.get("name", ""), spec.get("backend"), model, x, spec.get("target"))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _reset_peak()  # where the kernel allows it, the high-water mark restarts here (model loading may have peaked)
    before = _current_kb()
    fn()
    return (_peak_kb() - before) / 1024


def peak_memory(spec: dict, timeout: float = 3600) -> float:
    """peak_memory_here in a fresh process; nan (with the reason on stderr) if it fails."""
    out = subprocess.run([sys.executable, "-m", "vitx_fast.bench", "--peak", json.dumps(spec)], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        print(f"peak memory of {spec} failed: {out.stderr.strip()[-500:]}", file=sys.stderr)
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run
def run(models=("vit_small_patch16_224", "vit_base_patch16_224"), batches=(1, 8), methods=None, backends=None,
        img_size: int | None = None, peers: bool = True, reps: int = 5, reference_reps: int = 2, warmup: int = 1,
        memory: bool = True, multi_class: bool = True, progress: bool = True,
        reference_max_batch: int = 8) -> list[Row]:
    """Time (and measure the peak memory of) every (model, batch, method, backend), the autograd floor, GAE with 5
    classes and the peers; return rows with ratios to the plain forward."""
    from tqdm import tqdm

    import vitx_fast as vx
    from vitx_fast.engine.adapter import ViTAdapter
    from vitx_fast.engine.backends import select_backend
    from vitx_fast.methods.registry import get_method

    methods = list(methods or [m for m in vx.list_methods() if m != "tame"])  # tame needs a trained explainer
    backends = list(backends or vx.list_backends())
    rows: list[Row] = []
    for name in models:
        model = make_model(name, img_size)
        adapter = ViTAdapter(model)
        size = model.patch_embed.img_size[0]
        for batch in batches:
            x = make_images(model, batch)
            forward = _forward(model, x)
            cases = [("forward", "forward", "timm", None, ""), ("autograd", AUTOGRAD, "torch", None,
                                                                   "floor of the gradient methods")]
            for method in methods:
                m = get_method(method)
                opts = m.resolve_options({})
                for backend in backends:
                    try:
                        reasons = list(m.not_supported_reasons(adapter, opts))
                        if not reasons:
                            select_backend(m, adapter, opts, backend)
                    except (ValueError, NotImplementedError) as exc:
                        reasons = [str(exc)]
                    if not reasons and backend == "reference" and batch > reference_max_batch:
                        reasons = [f"reference skipped above batch {reference_max_batch}"]
                    if reasons:
                        continue
                    target = "all" if m.multi_target else None
                    cases.append(("method", method, backend, target, "all classes" if target == "all" else "top-1"))
            if multi_class:
                for row_name, (method, target) in MULTI_CLASS.items():
                    if method in methods:
                        cases.append(("method", method, "fused", target, f"{row_name}: {target}"))
            if peers:
                for peer in PEERS:
                    fn, why = _peer(peer, model, x)
                    lib, meth = peer.split(":")
                    if fn is None:
                        rows.append(Row(name, size, batch, meth, lib, *(float("nan"),) * 7,
                                        threads=torch.get_num_threads(), torch=torch.__version__,
                                        note=f"peer missing ({why})"))
                    else:
                        cases.append(("peer", peer, lib, None, "peer"))
            bar = tqdm(cases, desc=f"bench {name} B{batch}", disable=not progress)
            fwd_peak = None
            for kind, cname, backend, target, note in bar:
                bar.set_postfix_str(f"{cname}/{backend}")
                fn = case_fn(kind, cname, backend, model, x, target)
                slow = backend == "reference"
                (ms, p20, p80), (fms, _, _) = time_against_forward(fn, forward, x, warmup=warmup,
                                                                   reps=reference_reps if slow else reps)
                spec = dict(model=name, img_size=img_size, batch=batch, kind=kind, name=cname, backend=backend,
                            target=target, threads=torch.get_num_threads(), device=str(x.device))
                mb = peak_memory(spec) if memory else float("nan")
                if kind == "forward":
                    fwd_peak = mb
                method = cname.split(":")[1] if kind == "peer" else cname
                rows.append(Row(name, size, batch, method, backend, ms, p20, p80, batch * 1000 / ms, ms / fms, mb,
                                mb / fwd_peak if fwd_peak else float("nan"), threads=torch.get_num_threads(),
                                torch=torch.__version__, note=note))
        del model
        gc.collect()
    return rows


def to_markdown(rows: list[Row]) -> str:
    lines = ["| model | px | B | method | backend | ms (p20-p80) | img/s | x forward | peak MB | x forward mem "
             "| note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.ms != r.ms:  # a missing peer
            lines.append(f"| {r.model} | {r.img_size} | {r.batch} | {r.method} | {r.backend} | - | - | - | - | - | "
                         f"{r.note} |")
            continue
        lines.append(f"| {r.model} | {r.img_size} | {r.batch} | {r.method} | {r.backend} | {r.ms:.1f} "
                     f"({r.ms_p20:.0f}-{r.ms_p80:.0f}) | {r.images_per_s:.2f} | {r.ratio_to_forward:.2f} | "
                     f"{r.peak_mb:.0f} | {r.peak_ratio_to_forward:.2f} | {r.note} |")
    return "\n".join(lines)


def write(rows: list[Row], out_dir: str | Path, stem: str, header: str = "") -> tuple[Path, Path]:
    """CSV + markdown (with an optional header paragraph), each written to a temp name and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        wr.writeheader()
        wr.writerows(asdict(r) for r in rows)
    os.replace(tmp, csv_path)
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text((header + "\n\n" if header else "") + to_markdown(rows) + "\n")
    os.replace(tmp, md_path)
    return csv_path, md_path


def _main(argv=None) -> int:
    """`python -m vitx_fast.bench --peak SPEC`: the fresh-process half of `peak_memory`."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vitx_fast.bench")
    ap.add_argument("--peak", required=True, help="JSON case spec (see peak_memory)")
    args = ap.parse_args(argv)
    print(peak_memory_here(json.loads(args.peak)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
