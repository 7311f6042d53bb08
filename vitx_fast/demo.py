"""`vitx demo`: explain bundled benchmark images with every method and write an HTML gallery."""
from __future__ import annotations

import html
import os
import time
from pathlib import Path

import numpy as np
import torch

# methods shown in the gallery, in display order (others registered later are appended)
PREFERRED = ["reciprocam", "agcam", "daam", "gae", "lrp", "rollout", "tame"]


def _gallery_methods() -> list[str]:
    import vitx_fast as vx

    avail = vx.list_methods()
    return [m for m in PREFERRED if m in avail] + [m for m in avail if m not in PREFERRED and m != "grad_rollout"]


def build_gallery(out: Path, n_single: int = 4, n_double: int = 2, quiet: bool = False, seed: int = 0) -> Path:
    """Write PNGs and index.html into `out`; return the index path."""
    from tqdm import tqdm

    import vitx_fast as vx
    from vitx_fast import viz
    from vitx_fast.data import make_benchmark
    from vitx_fast.imaging import blend
    from vitx_fast.models.demo import load_demo_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_demo_model()
    methods = _gallery_methods()
    sets = []
    if n_single > 0:
        sets.append(("one object", make_benchmark(split="test", n=n_single, objects=1, seed=seed)))
    if n_double > 0:
        sets.append(("two objects", make_benchmark(split="test", n=n_double, objects=2, seed=seed)))

    rows, timings = [], {m: [] for m in methods}
    bar = tqdm(total=len(methods) * len(sets), desc="demo", unit="run", disable=quiet)
    for set_name, bench in sets:
        images, raw, boxes = bench.images, np.asarray(bench.raw), np.asarray(bench.boxes)
        labels = torch.as_tensor(np.asarray(bench.labels)).long()
        n = images.shape[0]
        targets = labels if labels.dim() == 2 else labels.view(-1, 1)
        with torch.no_grad():
            pred = model(images).argmax(-1)
        results = {}
        for m in methods:
            t0 = time.perf_counter()
            try:
                exp = vx.explain(model, images, method=m, target=targets)
            except (ValueError, TypeError, NotImplementedError) as exc:
                bar.write(f"demo: {m} skipped: {exc}")
                bar.update(1)
                continue
            timings[m].append((time.perf_counter() - t0) * 1000 / n)
            results[m] = exp
            bar.update(1)
        for i in range(n):
            for j in range(targets.shape[1]):
                cls = int(targets[i, j])
                tiles, caps = [viz.draw_boxes(raw[i], [boxes[i, j]])], [f"label {cls} (pred {int(pred[i])})"]
                for m, exp in results.items():
                    tiles.append(viz.draw_boxes(blend(raw[i], exp.maps[i, j]), [boxes[i, j]]))
                    caps.append(m)
                name = f"{set_name.replace(' ', '_')}_{i}_class{cls}.png"
                viz.save_png(viz.labeled_row(tiles, caps), out / name)
                flow_name = None
                if "daam" in results and results["daam"].flow is not None:
                    flow = results["daam"].flow[i, j]
                    flow_name = name.replace(".png", "_daam_flow.png")
                    viz.save_png(viz.labeled_row([blend(raw[i], flow[b]) for b in range(flow.shape[0])],
                                                 [f"block {b}" for b in range(flow.shape[0])]), out / flow_name)
                rows.append((set_name, i, cls, int(pred[i]), name, flow_name))
    bar.close()
    index = out / "index.html"
    _write_index(index, rows, methods, timings, model)
    return index


def _write_index(path: Path, rows, methods, timings, model) -> None:
    import vitx_fast as vx

    def ms(m):
        return f"{np.mean(timings[m]):.1f}" if timings.get(m) else "n/a"

    parts = [
        "<!doctype html><meta charset='utf-8'><title>vitx-fast demo</title>",
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}td,th{padding:4px 10px}</style>",
        f"<h1>vitx-fast demo gallery</h1><p>Bundled demo ViT ({sum(p.numel() for p in model.parameters()):,} "
        f"parameters), vitx-fast {html.escape(vx.__version__)}, torch {html.escape(torch.__version__)}. "
        "Each row: the image with the target's ground-truth box, then one heatmap per method for that class.</p>",
        "<h2>Time per image (ms, CPU, reference backend)</h2><table><tr><th>method</th><th>ms / image</th></tr>",
    ]
    parts += [f"<tr><td>{m}</td><td>{ms(m)}</td></tr>" for m in methods]
    parts.append("</table><h2>Explanations</h2>")
    for set_name, i, cls, pred, name, flow in rows:
        parts.append(f"<h3>{html.escape(set_name)} #{i}: class {cls} (model predicts {pred})</h3>"
                     f"<img src='{name}' alt='{name}'>")
        if flow:
            parts.append(f"<p>DAAM attention flow (accumulated map after each block)</p><img src='{flow}'>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    os.replace(tmp, path)
