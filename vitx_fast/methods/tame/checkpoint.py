"""T-TAME checkpoints: safetensors tensors + one JSON metadata entry, written atomically.

Tensors: the AM under `attn_mech.*` (keys `convs.i`, `bns.i`, `fuser` as the reference AttentionTAME); a training
checkpoint adds `optim.state.<i>.<name>` (momentum buffers) and `rng.torch`. Metadata (`vitx_tame`, JSON): format,
version, layers, feature, grid, num_prefix_tokens, num_classes, dims, backbone identity, info (training config and
history), and for training checkpoints `train_state` (epoch, step, optimizer param groups, scheduler, RNG states).

The backbone identity is a fingerprint of the architecture (layout fields and every parameter's name and shape) and
a SHA-256 of its weights (float32 bytes, dtype-independent for float32-representable weights). An explainer is tied
to its frozen backbone; loading it onto another backbone is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path

import torch

from vitx_fast.engine.adapter import UnsupportedModelError

FORMAT = "vitx-tame"
VERSION = 1
META_KEY = "vitx_tame"
FEATURE = "norm1"
SHIPPED = Path(__file__).with_name("weights") / "demo_tame.safetensors"
_REQUIRED = {"format": str, "version": int, "layers": list, "grid": list, "num_prefix_tokens": int,
             "num_classes": int, "dims": list, "backbone": dict}


class TameCheckpointError(ValueError):
    """The file is not a readable, consistent T-TAME checkpoint; the message names the problem."""


class BackboneMismatchError(UnsupportedModelError):
    """The explainer was trained on a different backbone than the model it is applied to."""


# ------------------------------------------------------------------------------------------ backbone identity
def _arch_fields(model) -> dict:
    from vitx_fast.engine.adapter import ViTAdapter

    ad = ViTAdapter(model)
    shapes = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    return {
        "class": type(model).__name__,
        "embed_dim": ad.embed_dim,
        "depth": ad.depth,
        "num_heads": ad.num_heads,
        "patch_size": list(ad.patch_size),
        "img_size": list(ad.img_size) if ad.img_size is not None else None,
        "num_prefix_tokens": ad.num_prefix_tokens,
        "has_class_token": ad.has_class_token,
        "num_classes": ad.num_classes,
        "global_pool": ad.global_pool,
        "distilled": ad.distilled,
        "params_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
    }


_WEIGHT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_hash(model) -> str:
    """SHA-256 of every state-dict tensor (name, shape, float32 bytes); cached until a tensor changes."""
    state = model.state_dict(keep_vars=True)
    key = tuple((k, v.data_ptr(), v._version, v.dtype) for k, v in state.items())
    hit = _WEIGHT_CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    with torch.no_grad():
        for k, v in state.items():
            h.update(f"{k}:{list(v.shape)};".encode())
            t = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
            h.update(t.numpy().tobytes())
    digest = h.hexdigest()
    _WEIGHT_CACHE[model] = (key, digest)
    return digest


def backbone_identity(model) -> dict:
    """{"arch": layout fields, "arch_sha256": hash of them, "weights_sha256": hash of the weights}."""
    arch = _arch_fields(model)
    return {"arch": arch, "arch_sha256": hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest(),
            "weights_sha256": weights_hash(model)}


def not_supported_reasons(explainer, model, check_weights: bool = True) -> list[str]:
    """Why `explainer` cannot explain `model` (empty list: it can)."""
    want = explainer.backbone or {}
    if not want.get("arch"):
        return ["the explainer records no backbone identity (not written by vitx_fast.methods.tame)"]
    have = _arch_fields(model)
    diff = [f"{k}: trained {want['arch'].get(k)!r}, model {have.get(k)!r}" for k in have
            if want["arch"].get(k) != have.get(k)]
    if diff:
        return ["the T-TAME explainer was trained on a different backbone architecture (" + "; ".join(diff) +
                "); train one for this model with `vitx train-tame` / vitx_fast.train_tame"]
    depth = len(getattr(model, "blocks", ()))
    if max(explainer.layers) >= depth:
        return [f"the T-TAME explainer reads blocks {explainer.layers}, but the model has {depth} blocks"]
    if check_weights and want.get("weights_sha256") != weights_hash(model):
        return [f"the model's weights differ from the frozen backbone the T-TAME explainer was trained on "
                f"(weights sha256 {weights_hash(model)[:12]}… vs {str(want.get('weights_sha256'))[:12]}…); an AM is "
                "tied to its backbone: train one for this model with `vitx train-tame`, or pass verify_weights=False "
                "to apply it anyway"]
    return []


def check_backbone(explainer, model, check_weights: bool = True) -> None:
    reasons = not_supported_reasons(explainer, model, check_weights)
    if reasons:
        raise BackboneMismatchError("; ".join(reasons))


# ------------------------------------------------------------------------------------------ save / load
def explainer_meta(explainer) -> dict:
    return {"format": FORMAT, "version": VERSION, "feature": FEATURE, "layers": list(explainer.layers),
            "grid": list(explainer.grid), "num_prefix_tokens": explainer.num_prefix_tokens,
            "num_classes": explainer.num_classes, "dims": list(explainer.dims), "backbone": explainer.backbone,
            "info": explainer.info}


def atomic_save(path, tensors: dict, meta: dict) -> Path:
    """Write safetensors to a temporary file in the same folder, then rename (never a half-written checkpoint)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={META_KEY: json.dumps(meta)})
        os.chmod(tmp, 0o644)  # the temporary file is private; the checkpoint is an ordinary file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_explainer(path, explainer, extra_tensors: dict | None = None, extra_meta: dict | None = None) -> Path:
    tensors = {f"attn_mech.{k}": v for k, v in explainer.attn_mech.state_dict().items()}
    tensors.update(extra_tensors or {})
    meta = explainer_meta(explainer)
    meta.update(extra_meta or {})
    return atomic_save(path, tensors, meta)


def read_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a T-TAME checkpoint; TameCheckpointError with the reason otherwise."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"T-TAME checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as exc:
        raise TameCheckpointError(f"{path} is not a readable safetensors file "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if META_KEY not in raw:
        raise TameCheckpointError(f"{path} has no '{META_KEY}' metadata: not a T-TAME checkpoint written by vitx_fast")
    try:
        meta = json.loads(raw[META_KEY])
    except json.JSONDecodeError as exc:
        raise TameCheckpointError(f"{path}: the '{META_KEY}' metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        raise TameCheckpointError(f"{path}: metadata format is {got!r}, expected {FORMAT!r}")
    for key, typ in _REQUIRED.items():
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise TameCheckpointError(f"{path}: metadata field {key!r} is missing or not a {typ.__name__} "
                                      f"(got {meta.get(key)!r})")
    if meta["version"] > VERSION:
        raise TameCheckpointError(f"{path}: checkpoint version {meta['version']} is newer than this vitx_fast "
                                  f"understands ({VERSION}); upgrade vitx_fast")
    if meta.get("feature", FEATURE) != FEATURE:
        raise TameCheckpointError(f"{path}: features {meta['feature']!r} are not supported (only {FEATURE!r})")
    if len(meta["layers"]) != len(meta["dims"]) or not meta["layers"] or len(meta["grid"]) != 2:
        raise TameCheckpointError(f"{path}: inconsistent metadata: layers {meta['layers']}, dims {meta['dims']}, "
                                  f"grid {meta['grid']}")
    _check_limits(meta, path)
    _check_tensors(tensors, meta, path)
    return tensors, meta


# sane bounds for metadata values, checked before anything is allocated
LIMITS = {"layers": (0, 4095), "dims": (1, 65536), "grid": (1, 4096), "num_prefix_tokens": (0, 1024),
          "num_classes": (1, 1_000_000)}


def _check_limits(meta: dict, path) -> None:
    def ints(key, values):
        lo, hi = LIMITS[key]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise TameCheckpointError(f"{path}: metadata field {key!r} must hold ints in [{lo}, {hi}], got "
                                          f"{str(meta[key])[:80]}")

    for key in ("layers", "dims", "grid"):
        ints(key, meta[key])
    ints("num_prefix_tokens", [meta["num_prefix_tokens"]])
    ints("num_classes", [meta["num_classes"]])
    if len(set(meta["layers"])) != len(meta["layers"]):
        raise TameCheckpointError(f"{path}: metadata field 'layers' repeats a block: {meta['layers']}")
    depth = (meta["backbone"].get("arch") or {}).get("depth")
    if isinstance(depth, int) and max(meta["layers"]) >= depth:
        raise TameCheckpointError(f"{path}: feature layers {meta['layers']} do not exist in the recorded backbone "
                                  f"({depth} blocks)")


def _expected_shapes(meta: dict) -> dict[str, tuple]:
    """The AM's state-dict shapes that the metadata implies (AttentionTAME: convs.i, bns.i, fuser)."""
    shapes = {}
    for i, d in enumerate(meta["dims"]):
        shapes[f"convs.{i}.weight"], shapes[f"convs.{i}.bias"] = (d, d, 1, 1), (d,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"bns.{i}.{name}"] = (d,)
        shapes[f"bns.{i}.num_batches_tracked"] = ()
    shapes["fuser.weight"] = (meta["num_classes"], sum(meta["dims"]), 1, 1)
    shapes["fuser.bias"] = (meta["num_classes"],)
    return shapes


def _check_tensors(tensors: dict, meta: dict, path) -> None:
    """Every AM tensor present, with the shape the metadata implies and a float dtype; nothing else under attn_mech."""
    expected = _expected_shapes(meta)
    got = {k[len("attn_mech."):]: v for k, v in tensors.items() if k.startswith("attn_mech.")}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise TameCheckpointError(f"{path}: AM tensors do not match the metadata (missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]})")
    dtypes = set()
    for k, shape in expected.items():
        t = got[k]
        if tuple(t.shape) != shape:
            raise TameCheckpointError(f"{path}: tensor attn_mech.{k} has shape {tuple(t.shape)}, the metadata "
                                      f"(dims {meta['dims']}, {meta['num_classes']} classes) implies {shape}")
        if k.endswith("num_batches_tracked"):
            continue
        if t.dtype not in (torch.float32, torch.float64):
            raise TameCheckpointError(f"{path}: tensor attn_mech.{k} is {str(t.dtype).removeprefix('torch.')}; T-TAME "
                                      "checkpoints hold float32 or float64 weights")
        dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise TameCheckpointError(f"{path}: the AM tensors mix dtypes {sorted(map(str, dtypes))}")


def explainer_from(tensors: dict, meta: dict, path="checkpoint"):
    """Build a TAMEExplainer from read_checkpoint's output; checks every AM tensor's presence and shape."""
    from vitx_fast.methods.tame.module import TAMEExplainer

    _check_limits(meta, path)
    _check_tensors(tensors, meta, path)  # before the module is built: its size is what the tensors prove
    got = {k[len("attn_mech."):]: v for k, v in tensors.items() if k.startswith("attn_mech.")}
    for k, t in got.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TameCheckpointError(f"{path}: tensor attn_mech.{k} holds NaN or inf")
    ex = TAMEExplainer(meta["dims"], meta["num_classes"], meta["layers"], tuple(meta["grid"]),
                       meta["num_prefix_tokens"], backbone=meta["backbone"], info=meta.get("info") or {})
    dtype = got["fuser.weight"].dtype
    ex = ex.to(dtype)
    ex.attn_mech.load_state_dict(got, strict=True)
    return ex.eval()


def load_tame(path=None, model=None, device=None, verify_weights: bool = True):
    """Load a T-TAME explainer (eval mode). path None -> the explainer shipped for the bundled demo model.

    model: optional timm ViT; when given, the explainer's backbone identity is checked against it now
    (BackboneMismatchError) rather than at `explain` time.
    """
    if path is None:
        path = SHIPPED
        if not path.is_file():
            raise FileNotFoundError(f"the shipped T-TAME explainer is missing ({path}); train one with "
                                    "`vitx train-tame` and pass its path")
    tensors, meta = read_checkpoint(path)
    ex = explainer_from(tensors, meta, path)
    ex.source = str(path)
    if device is not None:
        ex = ex.to(device)
    if model is not None:
        check_backbone(ex, model, verify_weights)
    return ex


_LOADED: dict = {}


def resolve_explainer(explainer):
    """The `explainer` option: None -> the shipped explainer; a path -> loaded (cached while the file is unchanged);
    a TAMEExplainer as is."""
    from vitx_fast.methods.tame.module import TAMEExplainer

    if isinstance(explainer, TAMEExplainer):
        return explainer
    path = Path(SHIPPED if explainer is None else explainer).resolve()
    st = path.stat() if path.is_file() else None
    key = (str(path), st.st_mtime_ns if st else None, st.st_size if st else None)
    if key not in _LOADED:
        _LOADED.clear()  # keep one: explainers can be large (ViT-B/16: 16 MB)
        _LOADED[key] = load_tame(None if explainer is None else path)
    return _LOADED[key]
