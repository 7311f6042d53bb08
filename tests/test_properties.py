"""Property-based tests of `vx.explain` (hypothesis) over random tiny timm ViTs, image batches, targets, methods,
backends and options, valid and not.

The property: `explain` returns a valid Explanation (finite maps of the right shape, targets of the right shape) or
raises a ValueError / TypeError (the project's errors subclass them) with a message, never another exception; and
the model is untouched (parameters and buffers, training flags, requires_grad flags, no .grad). The triton backend is
left out (its CPU interpreter takes seconds per call; tests/test_backend_parity.py covers it). Missing files given
as path options (tame's explainer, daam's memory_bank) raise FileNotFoundError by design, so no random paths are drawn.
"""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import LAYOUTS, make_vit

import vitx_fast as vx
from vitx_fast.engine.adapter import ViTAdapter

# VITX_PROPERTY_EXAMPLES: more examples per test for a deeper local run (the default keeps the file under a minute)
SETTINGS = settings(max_examples=int(os.environ.get("VITX_PROPERTY_EXAMPLES", "250")), deadline=None,
                    suppress_health_check=list(HealthCheck), database=None)

# name -> (LAYOUTS base, make_vit overrides)
MODELS = {name: (name, {}) for name in LAYOUTS}
# name -> a change after building: models the engine must refuse with a clear error
BROKEN = {
    "mixed_dtype": lambda m: m.head.to(torch.float64 if m.head.weight.dtype != torch.float64 else torch.float32),
    "part_meta": lambda m: m.head.to("meta"),
}
MODELS.update({name: ("plain", {}) for name in BROKEN})
MODELS.update({
    "headless": ("plain", dict(num_classes=0)),
    "avgpool": ("plain", dict(global_pool="avg")),
    "silu": ("plain", dict(act_layer=torch.nn.SiLU)),  # no explicit VJP: the autograd gradient path
    "dynamic": ("registers", dict(dynamic_img_size=True)),
    "depth1": ("plain", dict(depth=1)),
    "no_class_token": ("plain", dict(class_token=False, global_pool="avg")),
    "map_pool": ("plain", dict(global_pool="map")),
    "dynamic_pad": ("plain", dict(dynamic_img_size=True, dynamic_img_pad=True)),
    "one_class": ("plain", dict(num_classes=1)),
    "dropout": ("plain", dict(drop_rate=0.5, attn_drop_rate=0.3, proj_drop_rate=0.2, drop_path_rate=0.3)),
})
METHODS = vx.list_methods()
BACKENDS = [None, None, "fused", "reference", "cpp", "nope"]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@functools.cache
def _model(name: str, dtype: torch.dtype, scale: float):
    base, kw = MODELS[name]
    model = make_vit(base, dtype=dtype, scale=scale, **kw)
    BROKEN.get(name, lambda m: m)(model)
    return model


@functools.cache
def _tame_explainer(name: str, dtype: torch.dtype, scale: float):
    """An explainer fitted to the model's layout (None for a headless model: tame refuses it)."""
    model = _model(name, dtype, scale)
    ok = model.num_classes and name not in BROKEN
    return vx.methods.tame.TAMEExplainer.for_model(model, seed=0) if ok else None


# ---------------------------------------------------------------------------------------------- strategies
def often(valid, invalid, p_valid: int = 3):
    """`valid` about p_valid times in p_valid + 1, else `invalid`."""
    return st.integers(0, p_valid).flatmap(lambda r: valid if r else invalid)


@st.composite
def models(draw):
    """The key of a cached model whose training and requires_grad flags are set at random here."""
    dtypes = often(st.sampled_from([torch.float32, torch.float64]), st.sampled_from([torch.float16, torch.bfloat16]), 7)
    key = (draw(st.sampled_from(sorted(MODELS))), draw(dtypes),
           draw(st.sampled_from([1.0, 1.5])))
    model = _model(*key)
    model.train(draw(st.booleans()))
    if draw(st.booleans()):
        model.blocks[0].train(not model.training)
    frozen = draw(st.sampled_from(["none", "all", "some"]))
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(frozen == "none" or (frozen == "some" and i % 2 == 0))
    return key


def _image_size(model):
    return tuple(model.patch_embed.img_size)


@st.composite
def images(draw, model):
    """A batch (B, C, H, W), mostly valid; else a wrong shape, dtype, value or type."""
    H, W = _image_size(model)
    ph, pw = model.patch_embed.patch_size
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    good = st.just((H, W)) if not dynamic else st.sampled_from([(H, W), (H + ph, W), (H, W + 2 * pw)])
    size = draw(often(good, st.sampled_from([(H + 1, W), (H - ph, W), (ph, pw), (H, W + 3), (1, 1)])))
    b = draw(often(st.integers(1, 3), st.just(0), 6))
    c = draw(often(st.just(3), st.sampled_from([1, 2, 4]), 6))
    wrong_dims = st.sampled_from([(c, *size), (1, b, c, *size), (b, c * size[0] * size[1])])
    shape = draw(often(st.just((b, c, *size)), wrong_dims, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    kind = draw(often(st.just("float"), st.sampled_from(["int", "uint8", "bool", "nan", "inf", "huge", "other"]), 5))
    dtype = draw(st.sampled_from(FLOATS))
    if kind == "float":
        return _memory_layout(x.to(dtype), draw(st.sampled_from(LAYOUT_KINDS)))
    if kind in ("int", "uint8", "bool"):
        return (x * 50).to({"int": torch.int64, "uint8": torch.uint8, "bool": torch.bool}[kind])
    if kind in ("nan", "inf") and x.numel():
        x.view(-1)[0] = float(kind)
        return x.to(dtype)
    if kind == "huge":
        return (x * 1e30).to(dtype)
    return draw(st.sampled_from([None, "image.png", [1.0, 2.0], 3.5, {"x": 1}, x.tolist()]))


LAYOUT_KINDS = ["contiguous", "contiguous", "channels_last", "expanded", "strided", "requires_grad"]


def _memory_layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout (or as a leaf that requires grad)."""
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "expanded" and x.dim() >= 1 and x.shape[0]:
        return x[:1].expand(x.shape)  # stride 0 over the batch
    if kind == "strided" and x.dim() >= 1:
        return torch.stack([x, x], dim=-1)[..., 0]  # every other element of a larger tensor
    if kind == "requires_grad":
        return x.clone().requires_grad_(True)
    return x


def targets(num_classes: int, batch: int):
    C, B = max(num_classes, 1), max(batch, 1)
    ints = st.integers(-3, C + 2)
    shapes = st.sampled_from([(B,), (B, 1), (B, 2), (B + 1,), (), (B, 2, 1), (B, 0), (0,)])
    tensors = st.tuples(shapes, st.sampled_from([torch.long, torch.int32, torch.float32, torch.bool, torch.uint8]),
                        st.integers(0, 2**16)).map(
        lambda s: torch.randint(-1, C + 1, s[0], generator=torch.Generator().manual_seed(s[2])).to(s[1]))
    rows = st.lists(st.integers(0, C - 1), min_size=B, max_size=B)
    valid = st.one_of(st.none(), st.integers(0, C - 1), rows, rows.map(tuple), rows.map(np.array),
                      st.lists(st.lists(st.integers(0, C - 1), min_size=2, max_size=2), min_size=B, max_size=B)
                      .map(np.array), st.just(range(min(B, C))), st.sampled_from(["top1", "top2", "top3", "all"]))
    invalid = st.one_of(
        ints, st.integers(2**62, 2**70), st.integers(-(2**70), -(2**62)), st.lists(ints, max_size=B + 2),
        st.lists(st.lists(ints, min_size=1, max_size=3), min_size=B, max_size=B), tensors,
        st.sampled_from(["top0", "top99", "topx", "", "banana", "TOP3", "all ", "-1"]),
        st.floats(allow_nan=True), st.booleans(), st.just([None] * B), st.just(object()),
        st.sampled_from([torch.zeros(B, dtype=torch.long, device="meta"), torch.ones(B, requires_grad=True),
                         np.zeros(B, dtype=np.int64), np.int64(1), np.float32(1.5), torch.tensor(1), (1,) * B]),
    )
    return often(valid, invalid, 2)


GARBAGE = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(-2, 2), st.sampled_from(
    [float("nan"), float("inf"), -0.0, 1e300, 1e-300, 2**31, 2**63, 2**70, -(2**70), "", "x", "sum", "mean", "max",
     (2, 3), [4], (0, 8), (8, 8, 8), (2**70, 2), b"1", object()]))
BUDGETS = st.sampled_from([None, "2GB", "unlimited", "1kB", "100MB", "abc", "-1", 0, -5, 1, 10**9, 2.5, True, [1],
                           2**70, float("inf"), float("nan"), "1e400GB", "9" * 30])


@st.composite
def options(draw, method: str, key):
    """Keyword options for `method`: declared ones with valid or garbage values, presets, shared and unknown names."""
    opts = {}
    m = vx.get_method(method) if method in METHODS else None
    names = sorted(m.options) if m else []
    for name in draw(st.lists(st.sampled_from(names), unique=True, max_size=3)) if names else []:
        if name == "explainer":
            opts[name] = draw(st.sampled_from(["own", None, 3, b"x"]))
            if opts[name] == "own":
                opts[name] = _tame_explainer(*key)
        elif name == "memory_bank":
            opts[name] = draw(st.sampled_from(["bank", "wrong_dim", None, 3]))
            if opts[name] in ("bank", "wrong_dim"):
                model = _model(*key)
                d = model.num_features if opts[name] == "bank" else model.num_features + 1
                n = max(model.num_classes, 2)
                f = torch.nn.functional.normalize(torch.randn(8, d, dtype=torch.float64), dim=1)
                opts[name] = vx.MemoryBank(f, torch.arange(8) % n)
        elif name in m.choices:
            opts[name] = draw(often(st.sampled_from(m.choices[name]), GARBAGE, 2))
        else:
            opts[name] = draw(often(st.just(m.options[name]), GARBAGE, 1))
    if m and m.presets and draw(st.integers(0, 4)) == 0:
        opts[draw(st.sampled_from(sorted(m.presets)))] = draw(st.sampled_from([True, False, 1, "yes"]))
    if draw(st.integers(0, 5)) == 0:
        opts["memory_budget"] = draw(BUDGETS)
    if draw(st.integers(0, 7)) == 0:
        opts[draw(st.sampled_from(["bogus", "Target", "backend_", "head_fusion", "k"]))] = draw(GARBAGE)
    if draw(st.integers(0, 7)) == 0:
        opts["nonfinite"] = draw(st.sampled_from(["warn", "raise", "ignore", None, 1]))
    return opts


# ---------------------------------------------------------------------------------------------- the property
def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()], [p.grad is None for p in model.parameters()])


def _assert_untouched(model, snap):
    state, training, rg, no_grad = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and now[k].shape == v.shape and now[k].device == v.device, f"{k} changed"
        assert v.is_meta or torch.equal(now[k], v), f"{k} changed"
    assert [m.training for m in model.modules()] == training, "training flags changed"
    assert [p.requires_grad for p in model.parameters()] == rg, "requires_grad flags changed"
    assert [p.grad is None for p in model.parameters()] == no_grad, "a parameter received a .grad"


def _assert_images_untouched(images, snap):
    if images is None:
        return
    values, requires_grad = snap
    assert images.requires_grad == requires_grad and images.grad is None, "the images' autograd state changed"
    now = images.detach()
    assert now.dtype == values.dtype and now.shape == values.shape, "the images were modified"
    if not values.is_meta:
        same = torch.equal(now.nan_to_num(), values.nan_to_num()) if values.is_floating_point() else \
            torch.equal(now, values)
        assert same, "the images were modified"


def _expected_grid(model, images, method, opts):
    up = opts.get("upsample")
    if up is not None:
        return (up, up) if isinstance(up, int) else tuple(up)
    h, w = ViTAdapter(model).grid_for(*images.shape[-2:])
    return (min(h, 56), min(w, 56)) if method == "tame" else (h, w)


def check_explain(model, images, method, target=None, backend=None, **opts):
    """Run `vx.explain` and assert the property; returns the Explanation or None (a clear error)."""
    snap = _snapshot(model)
    given = images if isinstance(images, torch.Tensor) else None
    given_snap = None if given is None else (given.detach().clone(), given.requires_grad)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = vx.explain(model, images, method=method, target=target, backend=backend, **opts)
    except (ValueError, TypeError) as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        _assert_untouched(model, snap)
        _assert_images_untouched(given, given_snap)
        return None
    _assert_untouched(model, snap)
    _assert_images_untouched(given, given_snap)
    assert isinstance(exp, vx.Explanation)
    t, maps = exp.targets, exp.maps
    as_given = isinstance(images, torch.Tensor) and images.is_floating_point()  # else converted by vx.preprocess
    B = images.shape[0] if as_given else t.shape[0]
    assert t.dtype == torch.long and t.shape[0] == B and t.dim() in (1, 2)
    assert maps.dim() == t.dim() + 2 and maps.shape[:t.dim()] == t.shape, (maps.shape, t.shape)
    if as_given:
        assert tuple(maps.shape[-2:]) == _expected_grid(model, images, method, {**exp.options, **opts})
    if opts.get("nonfinite") != "warn":
        assert torch.isfinite(maps.double()).all(), "non-finite maps returned"
    assert ((t >= -1) & (t < max(model.num_classes, 1))).all()  # -1: no class (headless, daam ssl without a bank)
    if exp.logits is not None:
        assert exp.logits.shape == (B, model.num_classes)
    return exp


@SETTINGS
@given(data=st.data())
def test_everything_at_once(data):
    """Every argument drawn at once, each mostly valid."""
    key = data.draw(models())
    model = _model(*key)
    x = data.draw(images(model))
    method = data.draw(often(st.sampled_from(METHODS), st.sampled_from(["unknown", "", "GAE", None, 3]), 8))
    B = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 else 2
    target = data.draw(targets(model.num_classes, B))
    backend = data.draw(st.sampled_from(BACKENDS))
    opts = data.draw(options(method, key)) if isinstance(method, str) else {}
    check_explain(model, x, method, target, backend, **opts)


@SETTINGS
@given(data=st.data())
def test_images(data):
    """Valid method and target; random image batches."""
    key = data.draw(models())
    model = _model(*key)
    x = data.draw(images(model))
    method = data.draw(st.sampled_from(METHODS))
    opts = {"explainer": _tame_explainer(*key)} if method == "tame" else {}
    check_explain(model, x, method, backend=data.draw(st.sampled_from(BACKENDS[:-1])), **opts)


@SETTINGS
@given(data=st.data())
def test_targets(data):
    """Valid images; random targets for every method, the batch in one pass or in chunks (a tiny budget)."""
    key = data.draw(models())
    model = _model(*key)
    B = data.draw(st.integers(1, 3))
    h, w = _image_size(model)
    x = torch.randn(B, 3, h, w, dtype=next(model.parameters()).dtype)
    method = data.draw(st.sampled_from(METHODS))
    opts = {"explainer": _tame_explainer(*key)} if method == "tame" else {}
    if data.draw(st.booleans()):
        opts["memory_budget"] = "1kB"  # one image per chunk
    check_explain(model, x, method, data.draw(targets(model.num_classes, B)),
                  data.draw(st.sampled_from(BACKENDS[:-1])), **opts)


@SETTINGS
@given(data=st.data())
def test_options(data):
    """Valid images and target; random options for every method."""
    key = data.draw(models())
    model = _model(*key)
    h, w = _image_size(model)
    x = torch.randn(2, 3, h, w, dtype=next(model.parameters()).dtype)
    method = data.draw(st.sampled_from(METHODS))
    check_explain(model, x, method, backend=data.draw(st.sampled_from(BACKENDS)),
                  **data.draw(options(method, key)))


NASTY = [None, True, False, 0, 1, -1, 2, 40, 2**31, 2**63, 2**70, -(2**70), 0.5, 1e300, 1e-300, float("nan"),
         float("inf"), "", "x", "mean", (2, 3), [4], (0, 8), (8, 8, 8), (2**70, 2), b"1", object()]


@SETTINGS
@given(data=st.data())
def test_one_option(data):
    """Valid model, images and target; one option (declared, preset, shared or unknown) set to a valid or nasty
    value, so that every value reaches the option checks and the engine."""
    method = data.draw(st.sampled_from(METHODS))
    m = vx.get_method(method)
    key = (data.draw(st.sampled_from(["plain", "registers", "distilled", "dynamic", "silu"])), torch.float64, 1.0)
    model = _model(*key)
    name = data.draw(st.sampled_from([*sorted(m.options), *sorted(m.presets), "memory_budget", "nonfinite", "bogus"]))
    values = [*m.choices.get(name, ()), m.options.get(name), *NASTY]
    if name in ("explainer", "memory_bank"):  # no random paths (a missing file is a FileNotFoundError)
        values = [v for v in values if not isinstance(v, str)]
    opts = {name: data.draw(st.sampled_from(values))}
    if method == "tame" and name != "explainer":
        opts["explainer"] = _tame_explainer(*key)
    if method == "daam" and name in ("memory_bank", "k", "temperature"):
        opts["mode"] = "ssl"
    h, w = _image_size(model)
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    check_explain(model, x, method, backend=data.draw(st.sampled_from([None, "reference"])), **opts)
