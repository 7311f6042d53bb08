"""Metric throughput: vitx_fast.metrics against the peer implementations whose definitions coincide (each pair is
checked for agreement before it is timed). Writes benchmarks/results/metrics.{csv,md}.

    nice python benchmarks/bench_metrics.py                 # timm vit_tiny_patch16_224 (random weights), batch 8
    nice python benchmarks/bench_metrics.py --quick         # batch 2, one repetition

Pairs (peer = the reference code the metric follows, or Quantus):
  road_ttame        T-TAME's ROAD (MoRF + LeRF at 10, 20, 30, 40, 50, 70, 90 %), same seeded noise:
                    ours `road` vs pytorch-grad-cam ROADMostRelevantFirst / ROADLeastRelevantFirst (SciPy spsolve)
  road_imputation   the 14 x B imputations only: ours `noisy_linear_impute` vs pytorch-grad-cam NoisyLinearImputer and
                    Quantus `noisy_linear_imputation` (Quantus' ROAD metric itself fails on 3-channel images)
  adic_vitcam       AD / IC with the map multiplied in normalised space: ours vs pytorch-grad-cam
                    CamMultImageConfidenceChange (Drop/IncreaseInConfidence)
  abpc_49           MoRF + LeRF curves, 48 steps each: ours `abpc(steps=49)` vs two Quantus PixelFlipping runs
                    (baseline 0 in normalised space); equal work, not equal values: at 224 Quantus cannot step by
                    whole pixels (the values coincide at 40 x 48, see tests/metrics/test_abpc.py)
  localization      ours vs AGCAM's loop (cv2 findContours + box_to_seg per image)
Ours-only rows (no coinciding peer): insertion_deletion (30 steps), abpc (11 steps), adic_ttame.

ratio = peer time / our time on the same batch (higher: ours faster). Threads default to 1: SciPy's solver is
single-threaded and the machine may be shared; pass --threads to change it.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utils import git_commit

from vitx_fast import metrics as M

COLUMNS = ["metric", "implementation", "batch", "image", "ms_p50", "ms_min", "ms_max", "images_per_s", "ratio",
           "max_abs_diff", "threads", "torch", "commit", "timestamp"]
PCT = (10, 20, 30, 40, 50, 70, 90)


def timed(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, float(np.median(times)), min(times), max(times)


def gradcam_road(model, x, cams, tg):
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in tg]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        morf = [ROADMostRelevantFirst(100 - p)(x, cams, targets, model) for p in PCT]
        lerf = [ROADLeastRelevantFirst(100 - p)(x, cams, targets, model) for p in PCT]
    return np.stack(morf, 1), np.stack(lerf, 1)


def gradcam_impute(x, removed):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    imp = NoisyLinearImputer(noise=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.stack([imp(x[i % x.shape[0]], (~removed[i]).float()) for i in range(removed.shape[0])])


def quantus_impute(x, removed):
    from quantus.functions.perturb_func import noisy_linear_imputation

    xs = x.double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack([noisy_linear_imputation(arr=xs[i % x.shape[0]], indices=np.flatnonzero(removed[i].numpy()),
                                                 noise=0.0) for i in range(removed.shape[0])])


def agcam_localization(maps, gt):
    """AGCAM localization.py's per-image body: bilinear upsampling, min-max, cv2 contour boxes, box_to_seg, IoU."""
    import cv2

    out = []
    for i in range(maps.shape[0]):
        upsample = torch.nn.Upsample(gt.shape[-2:], mode="bilinear", align_corners=False)
        mask = upsample(maps[i].reshape(1, 1, *maps.shape[-2:]))
        mask = (mask - mask.min()) / (mask.max() - mask.min())
        m = (mask[0, 0].numpy() > 0.5).astype(np.uint8) * 255
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        seg = torch.zeros(gt.shape[-2:])
        for c in contours:
            x, y, w, h = cv2.boundingRect(c)
            seg[y:y + h + 1, x:x + w + 1] = 1
        tp = (seg * gt[i]).sum()
        fp = (seg * (1 - gt[i].float())).sum()
        fn = ((1 - seg) * gt[i]).sum()
        out.append(float((tp + 1e-5) / (tp + fp + fn + 1e-5)))
    return np.array(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-road-peer", action="store_true", help="skip the (slow) SciPy-based ROAD peers")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.quick:
        args.batch, args.reps = 2, 1
    torch.set_num_threads(args.threads)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    b = args.batch
    x = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    g = torch.Generator().manual_seed(2)
    maps = torch.nn.functional.interpolate(torch.rand(b, 1, 5, 5, generator=g), size=(14, 14), mode="bicubic",
                                           align_corners=False)[:, 0]  # smooth 14 x 14 "explanations"
    with torch.no_grad():
        tg = model(x).argmax(-1)
    cams = M.prepare_maps(maps, (224, 224))
    rows = []
    stamp = {"threads": str(args.threads), "torch": torch.__version__, "commit": git_commit(),
             "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}

    def add(metric, impl, ms, lo, hi, ours_ms=None, diff=""):
        rows.append({"metric": metric, "implementation": impl, "batch": b, "image": "224x224", "ms_p50": f"{ms:.1f}",
                     "ms_min": f"{lo:.1f}", "ms_max": f"{hi:.1f}", "images_per_s": f"{b / ms * 1e3:.3f}",
                     "ratio": "1.00" if ours_ms is None else f"{ms / ours_ms:.2f}", "max_abs_diff": diff, **stamp})
        print(f"{metric:18s} {impl:42s} {ms:10.1f} ms  {'' if ours_ms is None else f'ratio {ms / ours_ms:.2f}'}"
              f" {diff}", flush=True)

    # ---- ROAD, T-TAME protocol ---------------------------------------------------------------------------------
    ours, ms, lo, hi = timed(lambda: M.road(model, x, maps, tg, PCT, seed=0), args.reps)
    add("road_ttame", "vitx_fast.metrics.road", ms, lo, hi)
    if not args.skip_road_peer:
        (morf, lerf), pms, plo, phi = timed(lambda: gradcam_road(model, x, cams.numpy(), tg), 1)
        same_noise = M.road(model, x, maps, tg, PCT, generator=torch.Generator().manual_seed(0))
        diff = max(np.abs(same_noise["morf_diff"].numpy() - morf).max(), np.abs(same_noise["lerf_diff"].numpy() -
                                                                                  lerf).max())
        assert diff < 1e-3, f"ROAD disagrees with pytorch-grad-cam by {diff}"
        add("road_ttame", "pytorch-grad-cam ROAD*RelevantFirst", pms, plo, phi, ms, f"{diff:.1e}")
    # ---- imputation only ---------------------------------------------------------------------------------------
    removed = torch.cat([M.removal_masks(cams, PCT, o).reshape(-1, 224, 224) for o in ("morf", "lerf")])
    xs = x[torch.arange(removed.shape[0]) % b]
    ours_imp, ms_i, lo, hi = timed(lambda: M.noisy_linear_impute(xs, removed, noise=0), args.reps)
    add("road_imputation", "vitx_fast noisy_linear_impute (MG-PCG)", ms_i, lo, hi)
    if not args.skip_road_peer:
        ref, pms, plo, phi = timed(lambda: gradcam_impute(x, removed), 1)
        add("road_imputation", "pytorch-grad-cam NoisyLinearImputer", pms, plo, phi, ms_i,
            f"{(ours_imp - ref).abs().max().item():.1e}")
        try:
            qref, qms, qlo, qhi = timed(lambda: quantus_impute(x, removed), 1)
            add("road_imputation", "Quantus noisy_linear_imputation", qms, qlo, qhi, ms_i,
                f"{np.abs(ours_imp.double().numpy() - qref).max():.1e}")
        except ImportError:
            print("quantus not installed: skipped", file=sys.stderr)
    # ---- AD / IC, normalised-space multiply ---------------------------------------------------------------------
    ours, ms, lo, hi = timed(lambda: M.average_drop_increase(model, x, maps, tg, convention="vitcam"), args.reps)
    add("adic_vitcam", "vitx_fast.metrics.average_drop_increase", ms, lo, hi)
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    mult = M.adic.explanation_maps(maps, (224, 224), "vitcam").numpy()
    targets = [ClassifierOutputSoftmaxTarget(int(t)) for t in tg]
    ref, pms, plo, phi = timed(lambda: CamMultImageConfidenceChange()(x, mult, targets, model), args.reps)
    diff = np.abs((ours["explanation_prob"] - ours["prob"]).numpy() - ref).max()
    assert diff < 1e-4
    add("adic_vitcam", "pytorch-grad-cam CamMultImageConfidenceChange", pms, plo, phi, ms, f"{diff:.1e}")
    # ---- perturbation curves vs Quantus PixelFlipping -------------------------------------------------------------
    # Quantus requires features_in_step | H*W but ranks the channel-broadcast attribution, so whole-pixel steps need
    # 3 | features_in_step: impossible at 224 x 224 (50176 = 2^10 7^2). Equal work instead: 48 steps per curve
    # (3136 entries = 1045.3 pixels per step) against abpc(steps=49); agreement is tested at 40 x 48 in the tests.
    ours, ms, lo, hi = timed(lambda: M.abpc(model, x, maps, tg, steps=49), args.reps)
    add("abpc_49", "vitx_fast.metrics.abpc(steps=49)", ms, lo, hi)
    try:
        import quantus

        def quantus_curves():
            out = []
            for sign in (1.0, -1.0):
                metric = quantus.PixelFlipping(features_in_step=3136, perturb_baseline=0.0, normalise=False,
                                               abs=False, disable_warnings=True, display_progressbar=False)
                out.append(np.asarray(metric(model=model, x_batch=x.numpy(), y_batch=tg.numpy(),
                                             a_batch=(sign * cams[:, None]).numpy(), softmax=True, device="cpu")))
            return out

        (qm, ql), qms, qlo, qhi = timed(quantus_curves, 1 if args.reps < 3 else 2)
        assert qm.shape == (b, 48) and ql.shape == (b, 48)
        add("abpc_49", "Quantus PixelFlipping x2 (48 steps each)", qms, qlo, qhi, ms, "n/a (equal work)")
    except ImportError:
        print("quantus not installed: skipped", file=sys.stderr)
    # ---- localization vs AGCAM's cv2 loop -----------------------------------------------------------------------
    gt = M.boxes_to_mask([[(30 + 5 * i, 40, 150, 180 - 3 * i)] for i in range(b)], 224)
    ours, ms, lo, hi = timed(lambda: M.localization(maps, gt), max(args.reps, 5))
    try:
        ref, pms, plo, phi = timed(lambda: agcam_localization(maps, gt), max(args.reps, 5))
        diff = np.abs(ours["iou"].numpy() - ref).max()
        assert diff < 1e-5
        add("localization", "vitx_fast.metrics.localization", ms, lo, hi)
        add("localization", "AGCAM loop (cv2 findContours + box_to_seg)", pms, plo, phi, ms, f"{diff:.1e}")
    except ImportError:
        add("localization", "vitx_fast.metrics.localization", ms, lo, hi)
    # ---- ours only ----------------------------------------------------------------------------------------------
    for name, fn in (("insertion_deletion", lambda: M.insertion_deletion(model, x, maps, tg, steps=30)),
                     ("abpc_11", lambda: M.abpc(model, x, maps, tg)),
                     ("adic_ttame", lambda: M.average_drop_increase(model, x, maps))):
        _, ms, lo, hi = timed(fn, args.reps)
        add(name, f"vitx_fast.metrics ({name})", ms, lo, hi)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "metrics_quick" if args.quick else "metrics"
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    head = ["metric", "implementation", "ms / batch (p50)", "images/s", "peer time / ours", "max |diff|"]
    lines = ["# Metric throughput: vitx_fast.metrics vs peers\n",
             f"`nice python benchmarks/bench_metrics.py` - timm vit_tiny_patch16_224 (random weights), batch {b}, "
             f"224x224, float32, CPU, {args.threads} thread(s), torch {torch.__version__}, commit {stamp['commit']}, "
             f"{stamp['timestamp']}. Our times are the median of {args.reps} runs; the SciPy-based ROAD peers run "
             f"once. Every pair was checked for agreement before timing (last column).\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['implementation']} | {r['ms_p50']} | {r['images_per_s']} | "
                     f"{r['ratio']}x | {r['max_abs_diff']} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
