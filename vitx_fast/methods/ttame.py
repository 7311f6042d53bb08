"""T-TAME (Ntrougkas, Gkalelis & Mezaris, IEEE Access 2024), specs/ttame.md §3: a trained attention mechanism on the
frozen ViT's norm1 features; one forward pass yields the maps of every class.

Maps are the raw pre-sigmoid class maps c[:, k], (B, h', w') with (h', w') = (min(h, 56), min(w, 56)) — the model's
grid for any ViT up to 896 px at patch 16. The paper's min-max `(m - min) / (max - min + 1e-10)` is the display step.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from vitx_fast.methods.base import Method, MethodResult
from vitx_fast.methods.registry import register_method
from vitx_fast.tame.checkpoint import SHIPPED, load_tame, mismatch_reasons
from vitx_fast.tame.module import TAMEExplainer, capture_features, fast_scores, reference_features

_LOADED: dict = {}


def resolve_explainer(explainer) -> TAMEExplainer:
    """None -> the shipped explainer; a path -> loaded (cached while the file is unchanged); an explainer as is."""
    if isinstance(explainer, TAMEExplainer):
        return explainer
    path = Path(SHIPPED if explainer is None else explainer).resolve()
    st = path.stat() if path.is_file() else None
    key = (str(path), st.st_mtime_ns if st else None, st.st_size if st else None)
    if key not in _LOADED:
        _LOADED.clear()  # keep one: explainers can be large (ViT-B/16: 16 MB)
        _LOADED[key] = load_tame(None if explainer is None else path)
    return _LOADED[key]


@register_method
class TTAME(Method):
    name = "tame"
    summary = "T-TAME: trained attention mechanism on the frozen ViT's norm1 features (all classes in one pass)"
    # explainer: None (the one shipped for the bundled demo model), a checkpoint path, or vx.load_tame(path)
    # verify_weights: refuse a backbone whose weights differ from the one the explainer was trained on
    options = {"explainer": None, "verify_weights": True}
    multi_target = True

    def validate_options(self, opts):
        e = opts["explainer"]
        if not (e is None or isinstance(e, (str, os.PathLike, TAMEExplainer))):
            raise ValueError(f"tame: explainer must be None, a checkpoint path or vx.load_tame(path), "
                             f"got {type(e).__name__}")
        if not isinstance(opts["verify_weights"], bool):
            raise ValueError(f"tame: verify_weights must be True or False, got {opts['verify_weights']!r}")

    def refusals(self, adapter, opts):
        reasons = super().refusals(adapter, opts)
        try:
            ex = resolve_explainer(opts["explainer"])
        except FileNotFoundError as exc:
            if opts["explainer"] is not None:
                raise
            return reasons + [str(exc)]
        return reasons + mismatch_reasons(ex, adapter.model, opts["verify_weights"])


def select_classes(c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """c: (B, C, h, w); targets (B,) -> (B, h, w), (B, K) -> (B, K, h, w)."""
    if targets.dim() == 1:
        return c[torch.arange(c.shape[0], device=c.device), targets]
    return c.gather(1, targets[:, :, None, None].expand(-1, -1, *c.shape[-2:]))


@TTAME.instance.register("reference")
def tame_reference(adapter, images, targets, opts) -> MethodResult:
    """The authors' path: norm1 outputs from the instrumented forward, NCHW AM with BN in eval, full fuser."""
    ex = resolve_explainer(opts["explainer"])
    ex = copy.deepcopy(ex).to(device=images.device, dtype=images.dtype).eval()  # the caller's copy keeps its mode
    grid = adapter.grid_for(*images.shape[-2:])
    with torch.no_grad():
        feats, _ = reference_features(adapter, images, ex.layers)
        _, c = ex(feats, grid)
    return MethodResult(maps=select_classes(c, targets))


@TTAME.instance.register("fused", resolves_targets=True)
def tame_fused(adapter, images, resolve, opts) -> MethodResult:
    """One native backbone pass for features and logits; folded BN; only the requested fuser rows (all for 'all')."""
    ex = resolve_explainer(opts["explainer"])
    grid = adapter.grid_for(*images.shape[-2:])
    with torch.no_grad():
        feats, logits = capture_features(adapter, images, ex.layers)
        targets = resolve(logits)
        rows = targets[:, None] if targets.dim() == 1 else targets  # target="all" -> the full fuser GEMM
        maps = fast_scores(ex.attn_mech, feats, adapter.num_prefix_tokens, grid, rows)
    if targets.dim() == 1:
        maps = maps[:, 0]
    return MethodResult(maps=maps, targets=targets, logits=logits)
