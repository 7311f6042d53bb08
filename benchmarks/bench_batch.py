"""Batch-job benchmark: images/s of `vitx explain` as it was (one image at a time through vx.explain, a PNG per
method, a grid PNG and an .npz per image: the loop of the old vitx_fast/cli/explain.py, reimplemented below) against
the local executor of vitx_fast.jobs (batched, decoding overlapped, one Parquet store) and the Ray Data executor with
1 and 2 actors, on the bundled demo model (64 px) and ViT-S/16 (224 px, random weights). One method (reciprocam,
top-1), the same generated images for every contender, in one run. Writes benchmarks/results/batch.{csv,md}.

    python benchmarks/bench_batch.py                 # demo (256 images) and vit_small_patch16_224 (32 images)
    python benchmarks/bench_batch.py --quick         # demo only, fewer images

Times are wall times of the whole job in this process (model load, store, decoding, explaining, writing). Ray is
started once beforehand, so its rows show the job on a running cluster, actor start-up included (actors share
the CPUs that Ray Data's decode tasks leave).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from utils import append_csv, stamp

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["model", "executor", "batch_size", "actors", "images", "seconds", "images_per_s", "speedup_vs_loop",
           "method", "cpus", "load_before", "load_after", "threads", "torch", "version", "commit", "timestamp"]


def write_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    from vitx_fast.data.generate import generate_raw

    raw = generate_raw("test", n, 1, 0, None)["raw"]
    for i, a in enumerate(raw):
        sub = folder / f"part{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(a)
        (img.resize((size, size), Image.BILINEAR) if size != a.shape[0] else img).save(sub / f"{i:05d}.jpg",
                                                                                         quality=92)


def per_image_loop(files, model_name: str, random_weights: bool, method: str, out: Path) -> None:
    """The old `vitx explain`: for every file, decode, one vx.explain call per method at batch 1, an overlay PNG
    per method, a grid PNG and an .npz (git show HEAD~1:vitx_fast/cli/explain.py)."""
    import numpy as np
    from PIL import Image

    import vitx_fast as vx
    from vitx_fast import viz
    from vitx_fast.data.images import display_image, make_transform
    from vitx_fast.models.loading import load_model

    model, cfg = load_model(model_name, None, pretrained=False if random_weights else None)
    transform = make_transform(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        with Image.open(f) as im:
            im.load()
            rgb = im.convert("RGB")
        x = transform(rgb).unsqueeze(0).to(next(model.parameters()).dtype)
        shown = display_image(rgb, cfg)
        tiles, labels, arrays = [shown], ["image"], {}
        exp = vx.explain(model, x, method=method)
        arrays[method] = exp.maps[0].detach().float().cpu().numpy()
        arrays[f"{method}_targets"] = exp.targets[0].cpu().numpy()
        ov = np.asarray(vx.overlay(shown, exp.maps[0])[0])
        viz.save_png(ov, out / f"{f.stem}_{method}.png")
        tiles.append(ov)
        labels.append(f"{method} c={int(exp.targets.flatten()[0])}")
        arrays["logits"] = exp.logits[0].float().cpu().numpy()
        viz.save_png(viz.labeled_row(tiles, labels), out / f"{f.stem}_grid.png")
        tmp = out / f"{f.stem}.npz.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, out / f"{f.stem}.npz")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_model(model_name: str, n: int, size: int, batch: int, method: str, work: Path, with_ray: bool) -> list:
    from vitx_fast.data.images import image_files
    from vitx_fast.jobs import JobSpec, run

    images = work / f"images-{model_name}"
    write_images(images, n, size)
    files = image_files(images)
    random_weights = model_name != "demo"
    rows = []
    # warm-up outside the timings: the native module, kernel choice and timm's first calls cost every contender once
    import torch

    import vitx_fast as vx
    from vitx_fast.models.loading import load_model

    vx.explain(load_model(model_name, None, False if random_weights else None)[0], torch.randn(2, 3, size, size),
               method=method)

    def job(store: str, **kw):
        spec = JobSpec(inputs=[str(images)], store=str(work / store), methods=[method], model=model_name,
                       random_weights=random_weights, batch_size=batch, **kw)
        result = run(spec, progress=False)
        assert result.explained == n and result.failed == 0, result.summary()

    contenders = [("per-image loop", 1, 0, lambda: per_image_loop(files, model_name, random_weights, method,
                                                                    work / f"loop-{model_name}")),
                  ("local", batch, 0, lambda: job(f"local-{model_name}"))]
    if with_ray:
        contenders += [("ray", batch, k, lambda k=k: job(f"ray{k}-{model_name}", executor="ray", actors=k))
                       for k in (1, 2)]
    for name, bs, actors, fn in contenders:
        load = os.getloadavg()[0]
        seconds = timed(fn)
        rows.append({"model": model_name, "executor": name, "batch_size": bs, "actors": actors or "", "images": n,
                     "seconds": f"{seconds:.2f}", "images_per_s": f"{n / seconds:.2f}", "method": method,
                     "cpus": os.cpu_count(), "load_before": f"{load:.2f}",
                     "load_after": f"{os.getloadavg()[0]:.2f}"})
        print(f"{model_name:24s} {name:15s} batch {bs:3d} actors {actors or '-'}: {n / seconds:8.2f} images/s "
              f"({seconds:.1f} s, load {load:.2f})", flush=True)
    loop = float(rows[0]["images_per_s"])
    for r in rows:
        r["speedup_vs_loop"] = f"{float(r['images_per_s']) / loop:.2f}"
    return rows


def markdown(rows: list[dict]) -> str:
    head = ["model", "executor", "batch", "actors", "images", "seconds", "images/s", "vs per-image loop",
            "load before/after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"], r["executor"], str(r["batch_size"]), str(r["actors"] or "-"),
                                        str(r["images"]), r["seconds"], r["images_per_s"],
                                        f"{r['speedup_vs_loop']}x", f"{r['load_before']} / {r['load_after']}"])
                     + " |")
    s = stamp()
    return (f"# Batch jobs: images/s\n\nOne run, {rows[0]['cpus']} CPUs, torch {s['torch']} ({s['threads']} "
            f"threads), vitx-fast {s['version']} ({s['commit']}), {s['timestamp']}. Method {rows[0]['method']} "
            "(top-1); wall time of the whole job in one process; Ray started beforehand. The load "
            "columns are the machine's 1-minute load average (other jobs share it).\n\n" + "\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--method", default="reciprocam")
    args = ap.parse_args()
    with_ray = not args.no_ray
    if with_ray:
        import logging

        import ray

        from vitx_fast.jobs.ray_executor import loopback_only

        with loopback_only():
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
    configs = [("demo", 128 if args.quick else 256, 64, 64)]
    if not args.quick:
        configs.append(("vit_small_patch16_224", 32, 224, 16))
    work = Path(tempfile.mkdtemp(prefix="vitx-bench-batch-"))
    rows = []
    try:
        for model_name, n, size, batch in configs:
            rows += bench_model(model_name, n, size, batch, args.method, work, with_ray)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if with_ray:
            ray.shutdown()
    s = stamp()
    for r in rows:
        r.update(s)
    RESULTS.mkdir(exist_ok=True)
    append_csv(RESULTS / "batch.csv", rows, COLUMNS)
    (RESULTS / "batch.md").write_text(markdown(rows))
    print(f"wrote {RESULTS / 'batch.csv'} and {RESULTS / 'batch.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
