"""ADCC: Average Drop, Coherency, Complexity (Poppi et al. 2021). See docs/metrics.md §5.

Per image, for the explained class c with s(x) the [0, 1] map and E the explanation image:
  drop = max(0, Y - O) / Y, Y and O the softmax probabilities of c on x and E;
  coherency = (1 + pearson(s_c(x), s_c(E))) / 2, which needs a second explanation run on E (0 when the correlation is
  undefined, i.e. a constant map; such images are flagged);
  complexity = mean |s_c(x)|.
ADCC = 3 / (1 / Coh + 1 / (1 - Com) + 1 / (1 - AD)) of the *dataset means* (`adcc_score`); the aimagelab code's
`3 * (...)` is a typo, the ViT-ReciproCAM table confirms the harmonic mean.

Conventions:
  "vitcam" (default): E = x * bicubic_PIL(minmax(map)) in normalised space; complexity and coherency on the raw h x w
      min-max maps; target = the ground-truth label in the protocol (None: the clean top-1).
  "openvino": E = normalise(unnormalise(x) * M), M the image-resolution map (bilinear, min-max); the map of E is
      brought to the same resolution and rescaled to [0, 1]; complexity and coherency at image resolution;
      target = the requested class, else the prediction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitx_fast.metrics._common import (
    check_inputs,
    chunk_size,
    clean_probs,
    eval_mode,
    prepare_maps,
    resolve_metric_targets,
    resolve_norm,
    score_perturbed,
)
from vitx_fast.metrics.adic import CLEAN_SCORES, clean_reference, drop_increase, explanation_images, explanation_maps
from vitx_fast.postprocess import normalize

CONVENTIONS = ("vitcam", "openvino")


def adcc_score(average_drop, coherency, complexity):
    """ADCC in percent from the dataset means of its components, in percent (scalars or tensors):
    3 / (1 / Coh + 1 / (1 - Com) + 1 / (1 - AD)); 0 when a component of the harmonic mean is 0."""
    ad, coh, com = (torch.as_tensor(v, dtype=torch.float64) / 100 for v in (average_drop, coherency, complexity))
    terms = torch.stack([coh, 1 - com, 1 - ad])
    safe = torch.where(terms > 0, terms, torch.ones_like(terms))
    score = 3 / (1 / safe).sum(0)
    return torch.where((terms > 0).all(0), score, torch.zeros_like(score)) * 100


def pearson(a: torch.Tensor, b: torch.Tensor):
    """Per-row Pearson correlation of (B, n) tensors -> (rho (B,), undefined (B,) bool where a row is constant)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    va, vb = a.square().sum(1), b.square().sum(1)
    undefined = (va == 0) | (vb == 0)
    rho = (a * b).sum(1) / torch.where(undefined, torch.ones_like(va), (va * vb).sqrt())
    return torch.where(undefined, torch.zeros_like(rho), rho), undefined


def _maps_of(result) -> torch.Tensor:
    maps = getattr(result, "maps", result)
    if not torch.is_tensor(maps):
        raise TypeError(f"explain_fn must return a (B, h, w) tensor or an object with .maps, got {type(result)}")
    return maps


@torch.no_grad()
def adcc(model, images: torch.Tensor, maps: torch.Tensor, targets, explain_fn, *, convention: str = "vitcam",
         mean=None, std=None, clean_score: str = "target", batch_size: int | None = None,
         memory_budget: int | None = None) -> dict:
    """ADCC components per image.

    model: classifier on normalised images (B, C, H, W) -> logits. maps: (B, h, w) raw maps of `targets`.
    targets: the explained classes (B,) (None: the clean top-1). explain_fn(images, targets) -> (B, h, w) raw maps
    (or an object with .maps), e.g. ``lambda x, t: vx.explain(model, x, method="reciprocam", target=t).maps``; it is
    called once, on the explanation images E. convention: "vitcam" (default) or "openvino" (module docstring).
    mean / std: input normalisation for "openvino" (default: the timm model's pretrained_cfg). clean_score: Y of the
    drop, "target" (default) or "top1" (the aimagelab/ADCC code's clean top-1 probability).

    Returns, per image and in percent: "average_drop", "increase_in_confidence" (100 * 1[O > Y]), "coherency",
    "complexity"; "coherency_undefined" (B,) bool (constant map: coherency set to 0); "prob" (Y), "explanation_prob"
    (O), "targets", "prediction". The table's ADCC is ``adcc_score(ad.mean(), coh.mean(), com.mean())``.
    """
    maps = check_inputs(images, maps, "adcc")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if clean_score not in CLEAN_SCORES:
        raise ValueError(f"clean_score must be one of {CLEAN_SCORES}, got {clean_score!r}")
    b, c, h, w = images.shape
    maps = maps.to(images.dtype)
    m_img = explanation_maps(maps, (h, w), convention)  # the multiplier of E
    if convention == "openvino":
        resolve_norm(model, images, mean, std, "adcc(convention='openvino')")
    chunk = chunk_size(model, images, batch_size, memory_budget)
    with eval_mode(model):
        probs0 = clean_probs(model, images, chunk)
        tg = resolve_metric_targets(targets, probs0, "adcc")
        e_img = explanation_images(images, m_img, convention, mean, std, model)
        o = score_perturbed(model, b, lambda s, e: e_img[s:e], tg, chunk)
    maps_e = _maps_of(explain_fn(e_img, tg)).to(images.dtype)
    if maps_e.dim() == 4 and maps_e.shape[1] == 1:
        maps_e = maps_e[:, 0]
    if convention == "vitcam":
        s_x = normalize(maps)  # the raw h x w min-max maps
        s_e = maps_e if maps_e.shape[-2:] == s_x.shape[-2:] else \
            F.interpolate(maps_e[:, None], size=s_x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        s_e = normalize(s_e)
    else:
        s_x = m_img
        s_e = prepare_maps(maps_e, (h, w))
    rho, undefined = pearson(s_x.flatten(1), s_e.flatten(1))
    y = clean_reference(probs0, tg, clean_score)
    drop, inc = drop_increase(y, o)
    coherency = torch.where(undefined, torch.zeros_like(rho), (1 + rho) / 2) * 100
    return {"average_drop": drop, "increase_in_confidence": inc, "coherency": coherency,
            "complexity": s_x.abs().flatten(1).mean(1) * 100, "coherency_undefined": undefined, "prob": y,
            "explanation_prob": o, "targets": tg, "prediction": probs0.argmax(-1)}
