"""Tiny timm ViTs with re-drawn weights (peaked attention, structured maps) for tests, map comparisons, and the
backend parametrisation (`backend_params`, `explain_on`) shared by every test that runs each backend."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.nn as nn

from vitx_fast import _ext

# name -> VisionTransformer kwargs on top of BASE. Each layout exercises one thing the adapter reads from the model.
BASE = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=7)
LAYOUTS = {
    "plain": {},
    "registers": dict(reg_tokens=4),  # P = 5
    "distilled": dict(distilled=True),  # P = 2, head averages CLS and dist heads
    "nonsquare": dict(img_size=(24, 40)),  # grid 3 x 5
    "layerscale": dict(init_values=0.5),
    "qknorm": dict(qk_norm=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=2),
    "deep_1head": dict(depth=6, num_heads=1, embed_dim=24),
    "big_grid": dict(img_size=(40, 48), patch_size=8, depth=2),  # 5 x 6
}


def make_vit(layout: str = "plain", *, dtype=torch.float64, seed: int = 0, fused: bool = False, scale: float = 1.0,
             **overrides) -> nn.Module:
    """Build a tiny timm ViT of a named layout and re-draw its weights at a larger scale than timm's init."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(BASE)
    kw.update(LAYOUTS[layout])
    kw.update(overrides)
    distilled = kw.pop("distilled", False)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    torch.manual_seed(seed)
    model = cls(**kw)
    redraw_weights(model, seed=seed, scale=scale)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model.to(dtype).eval()


def redraw_weights(model: nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    """Weights ~ N(0, gain/fan_in): attention logits of O(1..5) so softmax rows are peaked."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                gain = 2.5 if "qkv" in name else 1.2
                p.copy_(torch.randn(p.shape, generator=g) * gain * scale / math.sqrt(fan_in))
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or ".norm.weight" in name or \
                    name.endswith("_norm.weight") or name == "norm.weight" or name.endswith("fc_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "gamma" in name:
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))
            else:  # biases, tokens, position embeddings
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make_images(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = model.patch_embed.img_size
    g = torch.Generator().manual_seed(seed + 100)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, 3, h, w, generator=g).to(dtype)


def images_at(model: nn.Module, batch: int, size=None, seed: int = 0) -> torch.Tensor:
    """Random (batch, 3, H, W) inputs in the model's dtype; size (H, W) other than the model's own for
    dynamic_img_size models, None for the model's own size (make_images)."""
    if size is None:
        return make_images(model, batch, seed=seed)
    g = torch.Generator().manual_seed(seed + 200)
    return torch.randn(batch, 3, *size, generator=g).to(next(model.parameters()).dtype)


# Layouts beyond LAYOUTS: (name, base layout, make_vit overrides, input size or None for the model's own):
# dynamic_img_size run at another input size (position embeddings resampled, grid differs from
# patch_embed.grid_size), depth 1, one head.
EXTRA_LAYOUTS = [
    ("dynamic_registers", "registers", dict(dynamic_img_size=True), (40, 24)),
    ("dynamic_distilled", "distilled", dict(dynamic_img_size=True), (24, 48)),
    ("depth1", "plain", dict(depth=1), None),
    ("depth1_1head", "plain", dict(depth=1, num_heads=1, embed_dim=24), None),
]


def extra_model_and_images(base: str, kw: dict, size, batch: int):
    """(model, images) of an EXTRA_LAYOUTS entry."""
    model = make_vit(base, **kw)
    return model, images_at(model, batch, size)


# ---------------------------------------------------------------------------------------------- backends
# What this machine can run, decided here independently of the engine's own declarations (so a backend that wrongly
# declares itself unavailable is not silently skipped): the native module for cpp; triton importable, and
# TRITON_INTERPRET set (tests/conftest.py sets it without CUDA) because the tests run on CPU tensors.
NATIVE = _ext.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
NATIVE_MARKS = [pytest.mark.native,
                pytest.mark.skipif(not NATIVE, reason=f"native module vitx_fast._C not built: {_ext.import_error()}")]
TRITON_MARKS = [pytest.mark.triton, pytest.mark.skipif(not (HAS_TRITON and TRITON_INTERPRET),
                                                       reason="needs triton, and TRITON_INTERPRET=1 for CPU tensors")]
# the backend `backend=None` picks for a method whose fused ops have a C++ kernel that beats torch (reciprocam, daam)
AUTO_FAST_BACKEND = "cpp" if NATIVE else "fused"


def family_marks(name: str) -> list:
    """Marks of a backend or kernel family: cpp needs the native module, triton the interpreter; others none."""
    return {"cpp": NATIVE_MARKS, "triton": TRITON_MARKS}.get(name, [])


def backend_params(names=None, exclude=()) -> list:
    """One pytest param per backend (default: every name of `vx.list_backends()`), id = the backend's name, with a
    skip mark when this machine cannot run it."""
    import vitx_fast as vx

    names = vx.list_backends() if names is None else names
    return [pytest.param(n, id=n, marks=family_marks(n)) for n in names if n not in exclude]


def explain_on(backend: str, model: nn.Module, x: torch.Tensor, method: str, must_serve=(), **kw):
    """`vx.explain(model, x, method=method, backend=backend, **kw)`, checking that the named backend ran.

    When the backend declares that it cannot serve this model, layout or option set (the ValueError "backend
    '<name>' cannot run ...", which lists its reasons), the test is skipped with that declared reason: a visible skip.
    For a backend in `must_serve` a refusal fails the test instead.
    """
    import vitx_fast as vx

    try:
        exp = vx.explain(model, x, method=method, backend=backend, **kw)
    except ValueError as exc:
        if f"backend {backend!r} cannot run" not in str(exc) or backend in must_serve:
            raise
        pytest.skip(str(exc))
    assert exp.backend == backend, (exp.backend, backend)
    return exp


def minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo + 1e-12)).view_as(x)


def assert_maps_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6, normalize: bool = True):
    """Compare (min-max normalised) maps; on failure report the worst index and the share of failing entries."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    if normalize:
        a, e = minmax(a), minmax(e)
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), "NaN/inf mismatch"
    err = (a - e).abs()
    if err.max() > atol:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        frac = (err > atol).double().mean().item() * 100
        raise AssertionError(f"max err {err.max().item():.3e} at {idx} (> {atol:g}); {frac:.1f}% of entries fail")


def assert_structured(maps: torch.Tensor, min_spread: float = 1e-3):
    """Guard against flat maps that would hide bugs."""
    flat = maps.detach().double().flatten(-2)
    spread = (flat.amax(-1) - flat.amin(-1)) / (flat.abs().amax(-1) + 1e-30)
    assert (spread > min_spread).all(), f"maps are (nearly) flat: relative spread {spread.min().item():.2e}"
