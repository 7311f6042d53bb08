"""ROAD, RemOve And Debias (Rong et al. 2022): remove a percentage of pixels by the map, impute them with noisy
linear imputation in the normalised tensor, and score the model on the result. See docs/metrics.md §6.

Removal (pytorch-grad-cam `RemoveMostRelevantFirst`): the map is bilinear at the input size, min-max. MoRF at p%
removed: thr = numpy.percentile(map, 100 - p) (linear), keep map < thr, remove the rest (ties at thr are removed, a
flat map removes everything). LeRF: the same rule on 1 - map.
"""
from __future__ import annotations

import math

import torch

from vitx_fast.metrics._common import (
    CPU_MAX_BATCH,
    DEFAULT_MEMORY_BUDGET,
    check_inputs,
    chunk_size,
    clean_probs,
    eval_mode,
    prepare_maps,
    resolve_metric_targets,
    score_perturbed,
)
from vitx_fast.metrics._impute import noisy_linear_impute

TTAME_PERCENTAGES = (10, 20, 30, 40, 50, 70, 90)
GRADCAM_PERCENTAGES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def percentile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """numpy.percentile(v, q) (method "linear", numpy >= 2 with a Python-scalar q) of every row of values (B, n).

    The virtual index (n - 1) * q / 100 and its fraction g are float64; the interpolation a + (b - a) g (or
    b - (b - a)(1 - g) for g >= 0.5) runs in the values' dtype, as numpy does. Returns (B,) in values' dtype.
    """
    n = values.shape[-1]
    vi = (n - 1) * (q / 100)
    lo = math.floor(vi)
    hi = min(lo + 1, n - 1)
    g = vi - lo
    s = values.sort(dim=-1).values
    a, b = s[:, lo], s[:, hi]
    d = b - a
    if g >= 0.5:
        return b - d * torch.tensor(1 - g, dtype=values.dtype, device=values.device)
    return a + d * torch.tensor(g, dtype=values.dtype, device=values.device)


def removal_masks(maps01: torch.Tensor, percentages, order: str = "morf") -> torch.Tensor:
    """(B, H, W) [0, 1] maps -> removed (P, B, H, W) bool, one mask per percentage (pixels >= the threshold of
    the map, MoRF, or of 1 - map, LeRF)."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', got {order!r}")
    m = maps01 if order == "morf" else 1 - maps01
    flat = m.flatten(1)
    out = []
    for p in percentages:
        thr = percentile_threshold(flat, 100 - p)
        out.append(~(m < thr[:, None, None]))
    return torch.stack(out)


def _resolve_order(order):
    orders = ("morf", "lerf") if order == "both" else (order,) if isinstance(order, str) else tuple(order)
    for o in orders:
        if o not in ("morf", "lerf"):
            raise ValueError(f"order must be 'morf', 'lerf' or 'both', got {order!r}")
    return orders


@torch.no_grad()
def road(model, images: torch.Tensor, maps: torch.Tensor, targets=None, percentages=TTAME_PERCENTAGES,
         order="both", *, noise: float = 0.01, seed: int = 0, generator: torch.Generator | None = None,
         tol: float | None = None, max_iter: int = 100, preconditioner: str = "multigrid",
         batch_size: int | None = None, memory_budget: int | None = None) -> dict:
    """ROAD with noisy linear imputation, batched.

    model: classifier, images (B, C, H, W) normalised -> logits. maps: (B, h, w) raw (upsampled bilinearly to H x W,
    then min-max). targets: class scored by the probability keys (None: the clean top-1). percentages: removed
    percentages p (default T-TAME's 10, 20, 30, 40, 50, 70, 90; pytorch-grad-cam's averages use 10..90).
    order: "morf", "lerf" or "both". noise: std of the Gaussian added to imputed values; drawn as float32 from
    `generator` (default: a CPU generator seeded with `seed`) in the order (order, percentage, image), each system
    channel-major (C, n), as pytorch-grad-cam draws it. tol / max_iter / preconditioner: of the batched CG solver
    (relative residual per image; None: 1e-5 for float32, 1e-9 for float64 images). batch_size / memory_budget:
    images per forward (and systems per solve).

    Returns (for each order o in ("morf", "lerf") computed; P = len(percentages)):
      "{o}_correct" (B, P): 1.0 where the argmax after imputation equals the clean top-1 (T-TAME's ROAD accuracy;
          average over images for the table);
      "{o}_prob" (B, P): softmax probability of the target after imputation;
      "{o}_diff" (B, P): that minus the clean probability (pytorch-grad-cam's ROAD score with a softmax target);
      "{o}_accuracy" (B,): mean of "{o}_correct" over the percentages;
      "road_{o}" (B,): mean of "{o}_diff" over the percentages (pytorch-grad-cam `ROAD...Average`);
      "road_combined" (B,) if both orders: (road_lerf - road_morf) / 2 (`ROADCombined`);
      "prob" (B,), "prediction" (B,), "targets" (B,), "percentages" (P,).
    """
    maps = check_inputs(images, maps, "road")
    orders = _resolve_order(order)
    percentages = [float(p) if not float(p).is_integer() else int(p) for p in percentages]
    if not percentages or any(not 0 <= p <= 100 for p in percentages):
        raise ValueError(f"road: percentages must be in [0, 100], got {percentages}")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    b, c, h, w = images.shape
    chunk = chunk_size(model, images, batch_size, memory_budget)
    # systems per solve: ~20 (C, H, W) float32 fields each; on CPU small chunks also converge together
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    solve_chunk = chunk if batch_size is not None else max(1, budget // (80 * c * h * w))
    if images.device.type == "cpu":
        solve_chunk = min(solve_chunk, CPU_MAX_BATCH)
    m01 = prepare_maps(maps, (h, w), dtype=images.dtype)
    out = {"percentages": torch.tensor(percentages, dtype=torch.float64)}
    with eval_mode(model):
        probs0 = clean_probs(model, images, chunk)
        tg = resolve_metric_targets(targets, probs0, "road")
        pred0 = probs0.argmax(-1)
        p0 = probs0.gather(1, tg[:, None])[:, 0]
        out.update(prob=p0, prediction=pred0, targets=tg)
        npct = len(percentages)
        for o in orders:
            removed = removal_masks(m01, percentages, o).reshape(npct * b, h, w)  # system i = (percentage, image)
            src = torch.arange(npct * b, device=images.device) % b
            probs, preds = [], []
            for s in range(0, npct * b, solve_chunk):
                e = min(npct * b, s + solve_chunk)
                imputed = noisy_linear_impute(images[src[s:e]], removed[s:e], noise=noise, generator=generator,
                                              tol=tol, max_iter=max_iter, preconditioner=preconditioner,
                                              batch_size=e - s)
                pr, pd = score_perturbed(model, e - s, lambda i, j, imputed=imputed: imputed[i:j], tg[src[s:e]], chunk,
                                         argmax=True)
                probs.append(pr)
                preds.append(pd)
            prob = torch.cat(probs).reshape(npct, b).t()
            correct = (torch.cat(preds).reshape(npct, b).t() == pred0[:, None]).to(prob.dtype)
            diff = prob - p0[:, None]
            out[f"{o}_correct"], out[f"{o}_prob"], out[f"{o}_diff"] = correct, prob, diff
            out[f"{o}_accuracy"] = correct.mean(1)
            out[f"road_{o}"] = diff.mean(1)
    if len(orders) == 2:
        out["road_combined"] = (out["road_lerf"] - out["road_morf"]) / 2
    return out
