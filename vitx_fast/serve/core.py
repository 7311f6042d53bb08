"""The service's model side, independent of Ray: validate one request, explain a batch of them.

A request is checked completely before it reaches the model (image decodes, method known and allowed, options valid,
the method can explain this model, classes in range); `explain_batch` then groups the requests of one dynamic batch
by (method, options, target form), stacks each group's images into one tensor and calls `vx.explain` once per group.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import vitx_fast as vx
from vitx_fast.data.images import ImageDecodeError, make_transform, read_image
from vitx_fast.engine.targets import top_k
from vitx_fast.models.loading import load_model, model_identity

FORMATS = ("json", "npy", "png")


class ApiError(Exception):
    """A request the service refuses: HTTP status, a short code and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "status": self.status}}


@dataclass
class ServeConfig:
    """What `vitx serve` runs: the model, the methods it offers, batching and limits."""

    model: str = "demo"
    checkpoint: str | None = None
    random_weights: bool = False
    methods: tuple[str, ...] = ()  # empty: every method that can explain the model
    device: str = "cpu"
    max_batch_size: int = 16  # 1 turns dynamic batching off
    batch_wait_timeout_s: float = 0.01
    max_bytes: int = 10 * 2**20  # largest request body
    max_pixels: int = 40_000_000  # largest decoded image
    threads: int | None = None  # torch intra-op threads per replica
    offload: bool = False  # decode and explain in a worker thread instead of the replica's event loop


@dataclass
class Prepared:
    """One validated request, ready for the model. image: (3, H, W) preprocessed for the model."""

    image: torch.Tensor
    original: object  # the decoded PIL image (for png overlays)
    method: str
    options: dict
    target: object  # None, "topK", "all" or a list of class indices
    target_spec: str
    fmt: str
    received: float = field(default_factory=time.perf_counter)
    decode_ms: float = 0.0

    @property
    def group(self) -> tuple:
        return self.method, json.dumps(self.options, sort_keys=True, default=str), self.target_spec


def parse_target(value, num_classes: int):
    """A request's target -> (vx.explain target, canonical spec). value: None / "top1" / "topK" / "all" / an int /
    "3,5" / a list of ints."""
    if value is None or value == "" or value == "top1":
        return None, "top1"
    if isinstance(value, str):
        v = value.strip()
        if v == "all":
            return "all", "all"
        if top_k(v) is not None:
            k = top_k(v)
            if k > num_classes:
                raise ApiError(400, "bad_target", f"target={v!r} asks for {k} classes; the model has {num_classes}")
            return (None, "top1") if k == 1 else (v, v)
        try:
            value = [int(p) for p in v.replace(" ", "").split(",") if p != ""]
        except ValueError:
            raise ApiError(400, "bad_target", f"target must be top1, topK (e.g. top5), all, a class index or a list "
                                              f"of class indices; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ApiError(400, "bad_target", f"target must be a class index or a list of them, got {value!r}")
    classes = [value] if isinstance(value, int) else list(value)
    if not classes or any(isinstance(c, bool) or not isinstance(c, int) for c in classes):
        raise ApiError(400, "bad_target", f"target must hold integer class indices, got {value!r}")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ApiError(400, "class_out_of_range", f"class index {bad[0]} out of range for a model with {num_classes} "
                                                  f"classes (0..{num_classes - 1})")
    return classes, "classes:" + ",".join(map(str, classes))


class ServingModel:
    """The model of one replica and everything to validate and explain requests for it."""

    def __init__(self, config: ServeConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.model, self.data_config = load_model(config.model, config.checkpoint,
                                                  pretrained=False if config.random_weights else None)
        self.model = self.model.to(config.device).eval()
        self.model_id = model_identity(config.model, config.checkpoint, False if config.random_weights else None)
        self.transform = make_transform(self.data_config)
        self.adapter = vx.ViTAdapter(self.model)
        self.num_classes = self.adapter.num_classes
        names = self.data_config.get("classes") or getattr(self.model, "pretrained_cfg", {}).get("label_names")
        self.labels = [str(c) for c in names] if names else [str(i) for i in range(self.num_classes)]
        offered = list(config.methods) or vx.list_methods()
        unknown = [m for m in offered if m not in vx.list_methods()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; available: {vx.list_methods()}")
        self.refusals = {m: vx.not_supported_reasons(self.model, m) for m in offered}
        self.methods = [m for m in offered if not self.refusals[m]]
        self.batch_sizes: dict[int, int] = {}  # batch size -> number of batches run

    # ---------------------------------------------------------------- description
    def describe(self) -> dict:
        a = self.adapter
        return {
            "name": self.config.model, "model_id": self.model_id, "num_classes": self.num_classes,
            "labels": self.labels,
            "input_size": list(self.data_config["input_size"]),
            "layout": {"grid": list(a.default_grid or ()), "num_prefix_tokens": a.num_prefix_tokens,
                       "has_class_token": a.has_class_token, "depth": a.depth, "num_heads": a.num_heads,
                       "embed_dim": a.embed_dim, "distilled": a.distilled},
            "methods": {m: {"available": not r, "reasons": r, "summary": vx.get_method(m).summary,
                            "options": {k: _jsonable(v) for k, v in vx.get_method(m).options.items()}}
                        for m, r in self.refusals.items()},
            "batching": {"max_batch_size": self.config.max_batch_size,
                         "batch_wait_timeout_s": self.config.batch_wait_timeout_s},
        }

    # ---------------------------------------------------------------- validation
    def prepare(self, data: bytes, method=None, target=None, options=None, fmt=None) -> Prepared:
        """Check one request completely; ApiError (4xx) names the first problem."""
        t0 = time.perf_counter()
        fmt = fmt or "json"
        if fmt not in FORMATS:
            raise ApiError(400, "bad_format", f"format must be one of {FORMATS}, got {fmt!r}")
        method = method or "reciprocam"
        if method not in vx.list_methods():
            raise ApiError(400, "unknown_method", f"unknown method {method!r}; this service offers {self.methods}")
        if method not in self.methods:
            why = "; ".join(self.refusals.get(method) or ["not offered by this service (see vitx serve --method)"])
            raise ApiError(422, "method_unavailable", f"{method} cannot explain this model: {why}")
        if options is None:
            options = {}
        if isinstance(options, str):
            try:
                options = json.loads(options) if options.strip() else {}
            except json.JSONDecodeError as exc:
                raise ApiError(400, "bad_options", f"options must be a JSON object: {exc}") from None
        if not isinstance(options, dict):
            raise ApiError(400, "bad_options", f"options must be a JSON object, got {type(options).__name__}")
        try:
            opts = vx.get_method(method).resolve_options(options)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, "bad_options", str(exc)) from None
        tgt, spec = parse_target(target, self.num_classes)
        m = vx.get_method(method)
        try:
            m.check_target(tgt, opts)
            if tgt == "all" and not (m.multi_target or m.class_agnostic):
                raise ValueError(f"{method}: target='all' needs a method that yields every class in one pass")
        except ValueError as exc:
            raise ApiError(400, "bad_target", str(exc)) from None
        if not data:
            raise ApiError(400, "missing_image", "the request has no image")
        try:
            img = read_image(bytes(data), name="image", max_pixels=self.config.max_pixels)
        except ImageDecodeError as exc:
            raise ApiError(400, "bad_image", str(exc)) from None
        x = self.transform(img).to(device=self.config.device, dtype=self.adapter.dtype)
        p = Prepared(x, img, method, opts, tgt, spec, fmt)
        p.decode_ms = 1000 * (time.perf_counter() - t0)
        return p

    # ---------------------------------------------------------------- the model
    def explain_batch(self, items: list[Prepared]) -> list[dict | ApiError]:
        """One dynamic batch -> one result dict (or ApiError) per item, in order."""
        self.batch_sizes[len(items)] = self.batch_sizes.get(len(items), 0) + 1
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.group, []).append(i)
        for idx in groups.values():
            first = items[idx[0]]
            t0 = time.perf_counter()
            x = torch.stack([items[i].image for i in idx])
            target = first.target
            if isinstance(target, list):
                target = torch.tensor([target] * len(idx))
            try:
                exp = vx.explain(self.model, x, method=first.method, target=target, **first.options)
            except (ValueError, TypeError, NotImplementedError) as exc:
                for i in idx:
                    out[i] = ApiError(422, "explain_failed", str(exc))
                continue
            ms = 1000 * (time.perf_counter() - t0)
            for j, i in enumerate(idx):
                out[i] = self._result(items[i], exp, j, ms, len(items))
        return out

    def _result(self, item: Prepared, exp, j: int, explain_ms: float, batch: int) -> dict:
        maps = exp.maps[j].detach().float().cpu()
        targets = exp.targets[j].reshape(-1).cpu()
        if maps.dim() == 2:
            maps = maps[None]
        logits = exp.logits[j].detach().double().cpu() if exp.logits is not None else None
        probs = logits.softmax(-1) if logits is not None else None
        predictions = []
        if probs is not None:
            top = probs.topk(min(5, probs.numel()))
            predictions = [{"class": int(c), "label": self.labels[int(c)], "probability": float(p)}
                           for p, c in zip(top.values, top.indices, strict=True)]
        scores = [{"target": int(t), "rank": r,
                   "logit": None if logits is None or t < 0 else float(logits[t]),
                   "probability": None if probs is None or t < 0 else float(probs[t])}
                  for r, t in enumerate(targets.tolist())]
        now = time.perf_counter()
        return {
            "model": self.config.model, "model_id": self.model_id, "method": item.method,
            "options": {k: _jsonable(v) for k, v in item.options.items()}, "target_spec": item.target_spec,
            "predictions": predictions, "targets": targets.tolist(), "scores": scores,
            "grid": list(maps.shape[-2:]), "maps_tensor": maps,
            "timings": {"decode_ms": round(item.decode_ms, 3), "explain_ms": round(explain_ms, 3),
                        "total_ms": round(1000 * (now - item.received) + item.decode_ms, 3), "batch_size": batch},
        }

    def overlay_png(self, item: Prepared, result: dict) -> bytes:
        """The first target's map over the original image at its own size (on the region the model saw), as PNG
        bytes (`vx.overlay`)."""
        import io

        from vitx_fast.imaging import overlay

        png = overlay(item.original, result["maps_tensor"][0], config=self.data_config)[0]
        buf = io.BytesIO()
        png.save(buf, format="PNG")
        return buf.getvalue()


def to_json(result: dict) -> dict:
    """A result dict -> its JSON body: maps as nested lists (K, h, w) at patch-grid size."""
    body = {k: v for k, v in result.items() if k != "maps_tensor"}
    body["maps"] = result["maps_tensor"].numpy().tolist()  # float32 values, exactly
    return body


def to_npy(result: dict) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, result["maps_tensor"].numpy().astype(np.float32))
    return buf.getvalue()


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)
