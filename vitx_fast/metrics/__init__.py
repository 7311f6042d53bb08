"""Evaluation metrics of the method papers, batched, exact to the protocols of docs/metrics.md.

Every metric takes batched torch tensors - images (B, C, H, W) normalised as the model expects, maps (B, h, w) raw at
the token grid or the image size - and returns a dict of per-image tensors (B,) (plus curves) so that callers
aggregate as the protocols do (mean over kept images, nanmean for the pointing game, `adcc_score` of the means).

    localization(maps, gt_masks, threshold=0.5)             AGCAM pixel accuracy / IoU / dice / precision / recall
    pointing_game(maps, gt_masks)
    abpc(model, images, maps, targets, steps=11)            AGCAM ABPC (MoRF / LeRF, normalised-space zeroing)
    average_drop_increase(model, images, maps, targets, keep=..., convention="ttame" | "vitcam" | "openvino")
    adcc(model, images, maps, targets, explain_fn, convention="vitcam" | "openvino"); adcc_score(ad, coh, com)
    road(model, images, maps, targets, percentages, order="both")   noisy linear imputation, batched CG solver
    insertion_deletion(model, images, maps, targets, steps=30, baseline="black" | "mean" | "blur")

Perturbed copies are scored in chunks (`batch_size=` images per forward, or `memory_budget=` bytes); scores are
softmax probabilities except ROAD accuracy (argmax). SciPy is needed by `localization` (component labelling) and
the "blur" baseline only.
"""
from vitx_fast.metrics._common import DEFAULT_MEMORY_BUDGET, prepare_maps
from vitx_fast.metrics._impute import noisy_linear_impute
from vitx_fast.metrics.abpc import abpc
from vitx_fast.metrics.adcc import adcc, adcc_score
from vitx_fast.metrics.adic import average_drop_increase
from vitx_fast.metrics.insertion_deletion import insertion_deletion
from vitx_fast.metrics.localization import boxes_to_mask, localization, pointing_game
from vitx_fast.metrics.road import removal_masks, road

__all__ = [
    "DEFAULT_MEMORY_BUDGET", "abpc", "adcc", "adcc_score", "average_drop_increase", "boxes_to_mask",
    "insertion_deletion", "localization", "noisy_linear_impute", "pointing_game", "prepare_maps", "removal_masks",
    "road",
]
