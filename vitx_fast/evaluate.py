"""`vitx evaluate`: every method on every metric, on the bundled benchmark or an ImageNet-style folder with VOC boxes.

Protocols (docs/metrics.md): localization explains the predicted class and keeps correctly classified images (AGCAM);
ABPC explains the ground-truth label on all images (AGCAM); AD/IC at 100/50/15 % and ROAD explain the top-1 (T-TAME);
insertion/deletion explain the top-1. Two-object scenes measure class sensitivity: each digit's class is explained and
scored against its own mask (pointing game and IoU "own") and against the other digit's mask ("other").
"""
from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

METRICS = ("localization", "abpc", "adic", "road", "insertion_deletion")


log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """images (N, 3, H, W) normalised for the model; labels (N,) or (N, 2); masks (N, K, H, W) bool per object."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    name: str


def bundled(n: int = 100, objects: int = 1, seed: int = 0) -> EvalData:
    from vitx_fast.data import make_benchmark

    b = make_benchmark(split="test", n=n, objects=objects, seed=seed)
    labels = torch.as_tensor(np.asarray(b.labels)).long()
    return EvalData(images=b.images, labels=labels, masks=torch.as_tensor(np.asarray(b.masks)),
                    name=f"bundled-{objects}obj")


def folder(path: str, size: tuple[int, int], mean, std) -> EvalData:
    """An ImageNet-style folder with VOC XML boxes; boxes become masks with the AGCAM rule (inclusive ends)."""
    from vitx_fast.data.voc import load_image_folder
    from vitx_fast.metrics import boxes_to_mask

    d = load_image_folder(path, size=(size[1], size[0]), mean=mean, std=std)
    masks = []
    for boxes in d.boxes:
        m = boxes_to_mask(torch.as_tensor(np.asarray(boxes)).reshape(-1, 4), size) if len(boxes) else \
            torch.zeros(size, dtype=torch.bool)
        masks.append(m.reshape(1, *size) if m.dim() == 2 else m.any(0, keepdim=True))
    return EvalData(images=d.images, labels=torch.as_tensor(d.labels).long(), masks=torch.stack(masks),
                    name=Path(path).name)


def _explain(model, x, method, target):
    import vitx_fast as vx

    return vx.explain(model, x, method=method, target=target)


def evaluate(model, data: EvalData, methods, metrics=METRICS, batch_size: int = 32, progress: bool = True,
             label: str = "model") -> tuple[list[dict], dict]:
    """Returns (rows: one dict of aggregated metrics per method, curves: method -> name -> mean curve)."""
    from tqdm import tqdm

    from vitx_fast.api import not_supported_reasons

    rows, curves = [], {}
    N = data.images.shape[0]
    steps = math.ceil(N / batch_size)
    bar = tqdm(total=len(methods) * steps, desc=f"evaluate {label} {data.name}", disable=not progress)
    for method in methods:
        reasons = not_supported_reasons(model, method)
        if reasons:  # a method that refuses this model (e.g. T-TAME on other weights than its backbone's) is skipped
            log.warning("skipping %s for %s: %s", method, label, "; ".join(reasons))
            bar.update(steps)
            continue
        acc: dict[str, list] = {}
        t_explain = 0.0
        for s in range(0, N, batch_size):
            sl = slice(s, s + batch_size)
            t_explain += _evaluate_batch(acc, model, method, data.images[sl], data.labels[sl], data.masks[sl], metrics)
            bar.update(1)
        row, curves[f"{method} ({label})"] = _aggregate(acc)
        rows.append({"model": label, "data": data.name, "method": method, "images": N,
                     "ms_per_image": 1000 * t_explain / N, **row})
    bar.close()
    return rows, curves


def _evaluate_batch(acc: dict, model, method: str, x, y, masks, metrics) -> float:
    """Explain one batch and append its per-image metric values to `acc`; returns the seconds spent explaining.
    x: (B, 3, H, W); y: (B,) labels or (B, 2) for two-object scenes; masks: (B, K, H, W) per-object masks."""
    with torch.no_grad():
        pred = model(x).argmax(-1)
    t0 = time.perf_counter()
    if y.dim() == 2:
        exp = _explain(model, x, method, y)  # (B, 2, h, w): each digit's own class
        seconds = time.perf_counter() - t0
        _two_object_metrics(acc, model, x, y, masks, exp.maps)
        return seconds
    exp = _explain(model, x, method, torch.stack([pred, y], 1))  # (B, 2, h, w): predicted, label
    seconds = time.perf_counter() - t0
    _one_object_metrics(acc, model, x, y, pred, masks.any(1), exp.maps[:, 0], exp.maps[:, 1], metrics)
    return seconds


def _two_object_metrics(acc: dict, model, x, y, masks, maps) -> None:
    """Class sensitivity on two-digit scenes: does each digit's map point at its own digit or at the other one?"""
    from vitx_fast import metrics as M

    with torch.no_grad():
        top2 = model(x).topk(2, -1).indices
    for j in range(2):
        own, other = masks[:, j], masks[:, 1 - j]
        acc.setdefault("pointing_own", []).append(M.pointing_game(maps[:, j], own)["pointing_game"])
        acc.setdefault("pointing_other", []).append(M.pointing_game(maps[:, j], other)["pointing_game"])
        acc.setdefault("iou_own", []).append(M.localization(maps[:, j], own)["iou"])
        acc.setdefault("top2_has_label", []).append((top2 == y[:, j:j + 1]).any(-1).double())


def _one_object_metrics(acc: dict, model, x, y, pred, gt, maps_pred, maps_label, metrics) -> None:
    """Localization (correct predictions only), ABPC (label maps), AD/IC, ROAD, insertion/deletion (predicted)."""
    from vitx_fast import metrics as M

    def add(key, value):
        acc.setdefault(key, []).append(value)

    correct = pred == y
    add("accuracy", correct.double())
    if "localization" in metrics:
        loc = M.localization(maps_pred, gt)
        for k in ("pixel_accuracy", "iou", "dice", "precision", "recall"):
            add(k, torch.where(correct, loc[k], torch.nan))
        add("pointing_game", torch.where(correct, M.pointing_game(maps_pred, gt)["pointing_game"], torch.nan))
    if "abpc" in metrics:
        r = M.abpc(model, x, maps_label, y)
        add("abpc", r["abpc"])
        add("abpc_morf_curve", r["morf_curve"])
        add("abpc_lerf_curve", r["lerf_curve"])
    if "adic" in metrics:
        r = M.average_drop_increase(model, x, maps_pred, pred, keep=(100, 50, 15))
        for j, k in enumerate((100, 50, 15)):
            add(f"ad{k}", r["average_drop"][:, j])
            add(f"ic{k}", r["increase_in_confidence"][:, j])
    if "road" in metrics:
        r = M.road(model, x, maps_pred, pred)
        for key, name in (("road_morf_acc", "morf_accuracy"), ("road_lerf_acc", "lerf_accuracy"),
                          ("road_morf_curve", "morf_correct"), ("road_lerf_curve", "lerf_correct")):
            add(key, r[name])
    if "insertion_deletion" in metrics:
        r = M.insertion_deletion(model, x, maps_pred, pred)
        for key in ("insertion", "deletion", "insertion_curve", "deletion_curve"):
            add(key, r[key])


def _aggregate(acc: dict) -> tuple[dict, dict]:
    """Per-image values -> (row of means, mean curves); NaN entries (e.g. misclassified images) are left out."""
    row, curves = {}, {}
    for k, v in acc.items():
        t = torch.cat([a.double() for a in v])
        if k.endswith("_curve"):
            curves[k] = t.nanmean(0).tolist()
        else:
            row[k] = float(t.nanmean()) if t.numel() else float("nan")
            if k == "pixel_accuracy":
                row["kept"] = int((~t.isnan()).sum())
    return row, curves


COLUMNS = ["model", "data", "method", "accuracy", "kept", "pointing_game", "iou", "dice", "precision", "recall",
           "pixel_accuracy", "abpc", "ad100", "ic100", "ad50", "ic50", "ad15", "ic15", "road_morf_acc",
           "road_lerf_acc", "insertion", "deletion", "pointing_own", "pointing_other", "iou_own", "top2_has_label",
           "ms_per_image"]


def table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_results(rows: list[dict], curves: dict, out: Path, stem: str = "evaluation") -> list[Path]:
    """Markdown, CSV and plots (per-method bars, perturbation curves), each written to a temp name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md = out / f"{stem}.md"
    _atomic_text(md, table(rows) + "\n")
    written.append(md)
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    tmp = out / f".{stem}.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / f"{stem}.csv")
    written.append(out / f"{stem}.csv")
    written += _plots(rows, curves, out, stem)
    return written


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plots(rows, curves, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = [k for k in ("pointing_game", "iou", "abpc", "ad15", "road_morf_acc", "insertion", "pointing_own")
            if any(k in r and not math.isnan(r[k]) for r in rows)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
        for ax, k in zip(axes[0], keys, strict=True):
            sel = [r for r in rows if k in r]
            ax.bar(range(len(sel)), [r[k] for r in sel], color="tab:blue")
            ax.set_xticks(range(len(sel)), [f"{r['method']}\n{r['model']}" for r in sel], rotation=90, fontsize=7)
            ax.set_title(k)
        fig.tight_layout()
        paths.append(_save(fig, out / f"{stem}_bars.png"))
        plt.close(fig)
    for name in ("abpc_morf_curve", "abpc_lerf_curve", "insertion_curve", "deletion_curve", "road_morf_curve"):
        have = {m: c[name] for m, c in curves.items() if name in c}
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        for m, c in have.items():
            ax.plot(np.linspace(0, 1, len(c)), c, label=m)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("fraction perturbed")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out / f"{stem}_{name}.png"))
        plt.close(fig)
    return paths


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path
