"""Speed and memory of every method and backend, as ratios to a plain forward of the same model in the same run.

Used by `vitx bench` and `benchmarks/bench_explainers.py`. Peak memory on CPU is the process's resident high-water
mark (VmHWM), reset before each case through /proc/self/clear_refs, minus the resident size before the case.
"""
from __future__ import annotations

import csv
import gc
import os
import statistics
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
    images_per_s: float
    ratio_to_forward: float
    peak_mb: float
    peak_ratio_to_forward: float
    threads: int
    torch: str
    note: str = ""


def _rss_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable[[], object], warmup: int = 1, reps: int = 3) -> tuple[float, float]:
    """Median wall time (ms) over `reps` runs after `warmup`, and the peak extra resident memory (MB) of one run."""
    for _ in range(warmup):
        fn()
    gc.collect()
    base = _rss_kb("VmRSS:")
    ok = _reset_peak()
    fn()
    peak = (_rss_kb("VmHWM:") - base) / 1024 if ok else float("nan")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(peak, 0.0)


def make_model(name: str, img_size: int | None = None):
    import timm

    kw = {"img_size": img_size} if img_size else {}
    model = timm.create_model(name, pretrained=False, **kw).eval()
    return model


def _peer_fns(model, x) -> dict[str, Callable[[], object]]:
    """Peers installed as benchmark extras (`pip install .[bench]`); missing ones are skipped."""
    peers = {}
    try:
        from openvino_xai.methods.white_box.torch import TorchViTReciproCAM

        # hooks blocks[-1].norm1 (the 3rd-last norm): last block, unmasked residual, gaussian, CLS kept, all classes;
        # its residual broadcast only works for one image at a time, so a batch is a loop
        ov = TorchViTReciproCAM(model)
        xs = [x[i:i + 1].numpy() for i in range(x.shape[0])]

        def run_ov():
            return [ov.generate_saliency_map(xi) for xi in xs]

        peers["openvino_xai:reciprocam"] = run_ov
    except Exception:
        pass
    try:
        from pytorch_grad_cam import GradCAM

        P = model.num_prefix_tokens
        h, w = model.patch_embed.grid_size

        def reshape(t):
            return t[:, P:].reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)

        cam = GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape)

        def run_gc():
            return cam(input_tensor=x, targets=None)

        peers["pytorch_grad_cam:gradcam"] = run_gc
    except Exception:
        pass
    return peers


def run(models=("vit_small_patch16_224", "vit_base_patch16_224"), batches=(1, 8), methods=None, backends=None,
        img_size: int | None = None, peers: bool = True, reps: int = 3, progress: bool = True,
        reference_max_batch: int = 8) -> list[Row]:
    """Time every (model, batch, method, backend) and the peers; return rows with ratios to the plain forward."""
    from tqdm import tqdm

    import vitx_fast as vx
    from vitx_fast.engine.adapter import ViTAdapter
    from vitx_fast.engine.backends import select_backend
    from vitx_fast.methods.registry import get_method

    methods = list(methods or [m for m in vx.list_methods() if m not in ("grad_rollout", "tame")])
    backends = list(backends or vx.list_backends())
    rows: list[Row] = []
    plan = [(m, b) for m in models for b in batches]
    bar = tqdm(total=len(plan) * (1 + len(methods) * len(backends)), desc="bench", disable=not progress)
    for name, batch in plan:
        model = make_model(name, img_size)
        size = model.patch_embed.img_size[0]
        x = torch.randn(batch, 3, *model.patch_embed.img_size)

        def forward(model=model, x=x):
            with torch.no_grad():
                return model(x)

        f_ms, f_mb = measure(forward, reps=reps)
        common = dict(model=name, img_size=size, batch=batch, threads=torch.get_num_threads(), torch=torch.__version__)
        rows.append(Row(method="forward", backend="timm", ms=f_ms, images_per_s=batch * 1000 / f_ms,
                        ratio_to_forward=1.0, peak_mb=f_mb, peak_ratio_to_forward=1.0, **common))
        bar.update(1)
        adapter = ViTAdapter(model)
        for method in methods:
            m = get_method(method)
            for backend in backends:
                bar.set_postfix_str(f"{name} B{batch} {method}/{backend}")
                opts = m.resolve_options({})
                reasons = list(m.not_supported_reasons(adapter, opts))
                try:
                    select_backend(m, adapter, opts, backend)
                except (ValueError, NotImplementedError) as exc:
                    reasons = [str(exc)]
                if not reasons and backend == "reference" and batch > reference_max_batch:
                    reasons = [f"reference skipped above batch {reference_max_batch}"]
                if reasons:
                    bar.update(1)
                    continue
                target = "all" if m.multi_target else None

                def run_one(model=model, x=x, method=method, backend=backend, target=target):
                    return vx.explain(model, x, method=method, target=target, backend=backend)

                slow = backend == "reference"
                ms, mb = measure(run_one, warmup=0 if slow else 1, reps=1 if slow else reps)
                rows.append(Row(method=method, backend=backend, ms=ms, images_per_s=batch * 1000 / ms,
                                ratio_to_forward=ms / f_ms, peak_mb=mb,
                                peak_ratio_to_forward=mb / f_mb if f_mb else float("nan"),
                                note="all classes" if target == "all" else "top-1", **common))
                bar.update(1)
        if peers:
            for peer, fn in _peer_fns(model, x).items():
                ms, mb = measure(fn, reps=reps)
                method, lib = peer.split(":")[1], peer.split(":")[0]
                rows.append(Row(method=method, backend=lib, ms=ms, images_per_s=batch * 1000 / ms,
                                ratio_to_forward=ms / f_ms, peak_mb=mb,
                                peak_ratio_to_forward=mb / f_mb if f_mb else float("nan"), note="peer", **common))
        del model
        gc.collect()
    bar.close()
    return rows


def to_markdown(rows: list[Row]) -> str:
    lines = ["| model | px | B | method | backend | ms | img/s | x forward | peak MB | x forward mem | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.img_size} | {r.batch} | {r.method} | {r.backend} | {r.ms:.1f} | "
                     f"{r.images_per_s:.2f} | {r.ratio_to_forward:.2f} | {r.peak_mb:.0f} | "
                     f"{r.peak_ratio_to_forward:.2f} | {r.note} |")
    return "\n".join(lines)


def write(rows: list[Row], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """CSV + markdown, each written to a temp name and renamed."""
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
    tmp.write_text(to_markdown(rows) + "\n")
    os.replace(tmp, md_path)
    return csv_path, md_path
