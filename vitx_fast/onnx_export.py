"""Model and explanation in one ONNX graph: `export_onnx(model, path, method=..., ...)`.

The graph is `ExplainerModule` (the method's fast path) traced by `torch.onnx.export(dynamo=True)`: inputs `images`
(batch, 3, H, W) and optionally `classes` (batch,) int64; outputs `logits` (batch, C), `maps` (batch, h, w) or
(batch, C, h, w) for target="all", and optionally `flow` (batch, L, h, w) (DAAM's per-block maps). The gradient
methods run their backward as explicit VJPs (`vitx_fast.engine.vjp`), so the backward is ordinary operators in
the graph and nothing needs autograd at run time.

Every check runs before anything is written. The temporary file is created in the target folder before tracing (an
unwritable folder fails at once), filled, checked with `onnx.checker`, then renamed over `path`; a failure or an
interrupt at any point removes it (no partial file, an existing file untouched).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from vitx_fast.engine import vjp
from vitx_fast.engine.adapter import UnsupportedModelError, ViTAdapter
from vitx_fast.engine.targets import top_k
from vitx_fast.methods.registry import get_method, list_methods
from vitx_fast.postprocess import UPSAMPLE_MODES

# opsets the exporter emits natively (torchlib starts at 18) up to torch's declared maximum; an opset outside this
# range goes through ONNX's version converter, which silently keeps the old opset when an op has no adapter
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 23, 20
# methods whose graph holds a backward: every module on the path needs an explicit VJP
GRADIENT_METHODS = ("agcam", "daam", "gae", "grad_rollout", "lrp")
FLOW_METHODS = ("daam",)
PROTOBUF_LIMIT = 2 * 2**30  # one ONNX file (no external data) holds at most 2 GiB
TARGETS = (None, "top1", "all", "input")


class OnnxExportError(RuntimeError):
    """The exporter or the checker failed on a model that passed validation (nothing was written)."""


def exportable_methods() -> list[str]:
    """Methods with a single-program fast path (a traceable fast implementation)."""
    return [m for m in list_methods() if getattr(get_method(m).implementations.get("fast"), "TRACEABLE", False)]


def _require_onnx() -> None:
    import importlib

    missing = []
    for name, attr in (("onnx", "checker"), ("onnxscript", "ir")):
        try:  # a real import: a folder named like the package on sys.path would pass a find_spec check
            if not hasattr(importlib.import_module(name), attr):
                missing.append(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {' and '.join(missing)}: pip install 'vitx-fast[onnx]'")


def _check_path(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"ONNX output {str(path)!r} is a folder; give a file name such as model.onnx")
    parent = path.parent
    if not parent.exists():
        raise FileNotFoundError(f"cannot write {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {str(path)!r}: the folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"cannot write {str(path)!r}: the existing file is read-only")
    return path


def check_method(method):
    """The method object of an exportable method name; ValueError naming the exportable ones otherwise."""
    if not isinstance(method, str) or method not in list_methods():
        raise ValueError(f"unknown method {method!r}; methods that export to ONNX: {exportable_methods()}")
    m = get_method(method)
    if method not in exportable_methods():
        raise ValueError(f"{method} has no single-program fast path (only {sorted(m.implementations)} "
                         f"implementations) and cannot be exported; methods that export to ONNX: "
                         f"{exportable_methods()}")
    return m


def _check_opset(opset) -> int:
    if opset is None:
        return DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset!r} is not supported: choose an int from {MIN_OPSET} to {MAX_OPSET} "
                         f"(default {DEFAULT_OPSET})")
    return opset


def _explainer_target(method, target, class_input: bool, targets_per_image=None):
    """export target -> ExplainerModule target (None, 'all', 'topK', a class list or 'input'), with the method-level
    refusals."""
    fixed = isinstance(target, (list, tuple))
    if fixed and (not target or not all(isinstance(c, int) and not isinstance(c, bool) for c in target)):
        raise ValueError(f"a class list target must be a non-empty list of class indices, got {target!r}")
    if not fixed and not (target is None or isinstance(target, str) and (target in TARGETS or top_k(target))):
        raise ValueError(f"target must be None / 'top1' (the predicted class), 'all' (every class, one map each), "
                         f"'topK' (the K best classes, e.g. 'top5'), a list of class indices or 'input' (a "
                         f"class-index input); got {target!r}. For given classes use class_input=True")
    if targets_per_image is not None:
        if isinstance(targets_per_image, bool) or not isinstance(targets_per_image, int) or targets_per_image < 1:
            raise ValueError(f"targets_per_image must be an int >= 1 (the K columns of a (batch, K) classes input), "
                             f"got {targets_per_image!r}")
        if not class_input and target != "input":
            raise ValueError("targets_per_image sets the shape (batch, K) of the classes input: it needs "
                             "class_input=True")
    if target == "top1":
        target = None
    if fixed or top_k(target):
        if class_input:
            raise ValueError(f"class_input=True feeds the classes to explain; it cannot be combined with "
                             f"target={target!r}")
        if method.class_agnostic:
            raise ValueError(f"{method.name}: the map depends on no class, so a class list would be unused")
        return list(target) if fixed else target
    if class_input:
        if target not in (None, "input"):
            raise ValueError(f"class_input=True feeds the classes to explain; it cannot be combined with "
                             f"target={target!r}")
        target = "input"
    if target == "all" and not method.multi_target:
        multi = [m for m in exportable_methods() if get_method(m).multi_target]
        raise ValueError(f"{method.name}: target='all' needs a method that yields every class in one pass "
                         f"({', '.join(multi)}); use class_input=True to choose the class at run time")
    if target == "input" and method.class_agnostic:
        raise ValueError(f"{method.name}: the map depends on no class, so a class-index input would be unused")
    return target


def validate(model, method: str, target=None, *, class_input=False, upsample=False, flow=False, opset=None,
             dynamic_batch=True, batch_size=1, options=None, targets_per_image=None):
    """All checks of `export_onnx` that need no tracing; raises with the reason. Returns (method, target, opset)."""
    _require_onnx()
    m = check_method(method)
    opts = m.resolve_options(dict(options or {}))
    opset = _check_opset(opset)
    target = _explainer_target(m, target, bool(class_input), targets_per_image)
    if method == "rollout" and dynamic_batch and opts["discard_ratio"] > 0:
        raise ValueError("rollout with discard_ratio > 0 discards per image in a Python loop (vit-explain's per-image "
                         "top-k), so its program depends on the batch size: export it with dynamic_batch=False and "
                         "batch_size=B, or with discard_ratio=0")
    if flow and method not in FLOW_METHODS:
        raise ValueError(f"flow=True: {method} has no per-block flow (only {', '.join(FLOW_METHODS)})")
    if upsample not in (False, True, None) and upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be False, True (bilinear) or one of {UPSAMPLE_MODES}; got {upsample!r}")
    if not dynamic_batch and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int (the fixed batch of a static graph), got {batch_size!r}")
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    adapter = ViTAdapter(model)
    if adapter.dtype != torch.float32:
        # onnxruntime's CPU provider has no float64 Conv (the patch embedding), and half precision is a GPU matter
        raise UnsupportedModelError(f"the model is {adapter.dtype}; ONNX export takes float32 models "
                                    f"(cast with model.float())")
    if adapter.img_size is None:
        raise UnsupportedModelError("the model has no fixed input size (patch_embed.img_size): the graph's image "
                                    "input needs one")
    if method in GRADIENT_METHODS:
        reasons = vjp.not_supported_reasons(adapter)
        if reasons:
            raise UnsupportedModelError(
                f"{method} needs the model's backward written as explicit operators, which covers timm ViTs built "
                f"from LayerNorm, Linear-GELU-Linear MLPs, LayerScale and a token-pooled Linear head; this model "
                f"has: " + "; ".join(reasons))
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if size > PROTOBUF_LIMIT - 64 * 2**20:
        raise UnsupportedModelError(f"the model's weights take {size / 2**30:.2f} GiB; one ONNX file holds at most "
                                    f"2 GiB")
    return m, target, opset


def _json_safe(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return type(v).__name__ if isinstance(v, nn.Module) else str(v)


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and warnings about its internals; keep them out of the user's output."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def trace(module: nn.Module, args: tuple, dynamic_batch: bool):
    """torch.export of the explainer; with a dynamic batch, a program that depends on the batch size is an error
    (torch.onnx.export would silently fix the batch to the traced one)."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args)
    try:
        with _quiet():
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
    except torch._dynamo.exc.UserError as exc:
        if dynamic_batch and "batch" in str(exc):
            raise OnnxExportError(
                "the explanation program depends on the batch size (a Python loop over the images); export it with "
                "dynamic_batch=False and batch_size=B") from exc
        raise


def build_graph(program, args: tuple, input_names, output_names, opset: int):
    """An ExportedProgram -> ONNX ModelProto (in memory)."""
    with _quiet():
        onnx_program = torch.onnx.export(program, args, None, dynamo=True, input_names=list(input_names),
                                         output_names=list(output_names), opset_version=opset, optimize=True,
                                         verbose=False)
        return onnx_program.model_proto


def _open_temp(path: Path):
    """Create and open the temporary file beside `path` -> (file object, its name). Done before tracing, so a folder
    that takes no file fails in a second, not after the export. The file gets the mode a plain open() would give (an
    existing file's mode is kept)."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise type(exc)(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    f = os.fdopen(fd, "wb")
    try:
        os.chmod(tmp, mode)  # mkstemp makes 0600
    except BaseException:
        f.close()
        os.unlink(tmp)
        raise
    return f, tmp


def _write_atomic(proto, f, tmp: str, path: Path) -> None:
    """ModelProto -> the open temporary file `f` -> onnx.checker -> rename over `path`. The caller removes `tmp` on
    any failure."""
    import onnx

    with f:
        f.write(proto.SerializeToString())
        f.flush()
        os.fsync(f.fileno())
    try:
        onnx.checker.check_model(tmp, full_check=True)
    except Exception as exc:
        raise OnnxExportError(f"onnx.checker rejected the exported graph: {exc}") from exc
    os.replace(tmp, path)


def export_onnx(model: nn.Module, path, method: str = "reciprocam", target=None, *, class_input: bool = False,
                targets_per_image: int | None = None, upsample: bool | str = False, normalize: bool = False,
                flow: bool = False, opset: int | None = None, dynamic_batch: bool = True, batch_size: int = 1,
                metadata: dict | None = None, **options) -> Path:
    """Write one ONNX graph computing the model's logits and the method's maps; returns the path written.

    model: a timm VisionTransformer (float32, fixed input size H x W); its modes are restored afterwards.
    method: one of `exportable_methods()`; options: the method's options (as `vx.explain`).
    target: None / "top1" (the predicted class), "all" (every class: maps (batch, C, h, w); reciprocam, tame) or
        "input" (= class_input=True: a second input `classes` (batch,) int64 chooses the class of each image),
        "topK" (the K best classes per image, e.g. "top5": maps (batch, K, h, w)) or a list of K class indices
        (the same classes for every image: maps (batch, K, h, w)). Gradient methods serve the K classes of an
        image with one batched backward inside the graph.
    targets_per_image: with class_input, K: the input is `classes` (batch, K) int64 and maps (batch, K, h, w).
    upsample: False, True (bilinear) or a `vx.upsample` mode: maps resized to (H, W) inside the graph.
    normalize: per-map min-max (`vx.normalize`) inside the graph, after the upsampling.
    flow: also output `flow` (batch, L, h, w), DAAM's per-block maps (same epilogue).
    opset: ONNX opset from MIN_OPSET to MAX_OPSET (default DEFAULT_OPSET).
    dynamic_batch: a symbolic batch dimension "batch"; False fixes it to `batch_size`.
    metadata: extra string key/values for the model's metadata_props (e.g. the preprocessing mean and std).

    Inputs: images (batch, 3, H, W) preprocessed as the model expects [, classes (batch,) int64].
    Outputs: logits (batch, C), maps (batch, h, w) or (batch, C, h, w) [, flow]; h, w the patch grid, or H, W.
    """
    from vitx_fast.export import ExplainerModule

    path = _check_path(path)
    _, tgt, opset = validate(model, method, target, class_input=class_input, upsample=upsample, flow=flow,
                             opset=opset, dynamic_batch=dynamic_batch, batch_size=batch_size, options=options,
                             targets_per_image=targets_per_image)
    module = ExplainerModule(model, method, target=tgt, upsample=upsample or False, normalize=normalize, flow=flow,
                             **options)
    adapter = module.adapter
    H, W = adapter.img_size
    # a traced batch of 2: torch.export specialises a dimension seen as 1
    B = 2 if dynamic_batch else batch_size
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)  # the caller's random state is left alone
    images = torch.randn(B, adapter.in_chans, H, W, generator=g).to(device=p.device, dtype=p.dtype)
    args, input_names = (images,), ["images"]
    if tgt == "input":
        classes = torch.arange(B, device=p.device) % adapter.num_classes
        if targets_per_image is not None:  # (B, K): K distinct classes per image where the model has them
            classes = (classes[:, None] + torch.arange(targets_per_image, device=p.device)) % adapter.num_classes
        args += (classes,)
        input_names.append("classes")
    output_names = ["logits", "maps"] + (["flow"] if flow else [])

    f, tmp = _open_temp(path)
    try:
        proto = _graph(module, method, args, input_names, output_names, opset, dynamic_batch)
        _stamp(proto, module, method, tgt, normalize, flow, metadata)
        _write_atomic(proto, f, tmp, path)
    except BaseException:
        f.close()  # idempotent
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _graph(module, method, args, input_names, output_names, opset, dynamic_batch):
    """Trace the explainer and convert it; the opset and the batch dimension are checked."""
    with module.adapter.session():
        module.eval()
        try:
            proto = build_graph(trace(module, args, dynamic_batch), args, input_names, output_names, opset)
        except OnnxExportError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise OnnxExportError(f"tracing {method} into ONNX failed: {type(exc).__name__}: {first}") from exc
    got = {o.domain: o.version for o in proto.opset_import}.get("")
    if got != opset:
        raise OnnxExportError(f"the exporter produced opset {got} instead of {opset}")
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        if dynamic_batch and not dim0.dim_param:
            raise OnnxExportError(f"the exported graph fixed the batch of {value.name!r} to {dim0.dim_value}")
        if dynamic_batch:
            dim0.dim_param = "batch"
    return proto


def _stamp(proto, module, method, tgt, normalize, flow, metadata) -> None:
    """metadata_props (method, options, epilogue, layout, the caller's extras) and the producer."""
    from vitx_fast import __version__

    adapter = module.adapter
    H, W = adapter.img_size
    meta = {
        "vitx_fast.version": __version__, "method": method,
        "target": json.dumps(tgt) if isinstance(tgt, list) else (tgt or "top1"),
        "options": json.dumps({k: _json_safe(v) for k, v in module.opts.items()}, sort_keys=True),
        "upsample": str(module.upsample_mode or ""), "normalize": str(bool(normalize)), "flow": str(bool(flow)),
        "input_size": f"{H}x{W}", "grid": "x".join(map(str, adapter.grid_for(H, W))),
        "num_classes": str(adapter.num_classes), "num_prefix_tokens": str(adapter.num_prefix_tokens),
    }
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    for k, v in kept + list(meta.items()):
        proto.metadata_props.add(key=k, value=v)
    proto.producer_name = "vitx_fast"
    proto.producer_version = __version__
