"""The model side of a job, the same for every executor: decode one work item, explain a batch of decoded items with
every method it still needs, and return the rows as a `schema.RECORDS` table. The local executor calls it in its
own process, the Ray executor inside each actor: both produce the same rows. docs/batch.md §5."""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from vitx_fast.data.images import ImageDecodeError, make_transform, read_image
from vitx_fast.jobs.schema import RECORDS
from vitx_fast.jobs.spec import JobSpec, MethodPlan, target_argument


@dataclass
class Decoded:
    """One decoded work item. pixels: (3, H, W) float32 preprocessed for the model, None when decoding failed."""

    key: str
    source: str
    methods: tuple[str, ...]  # the methods this image still needs
    pixels: torch.Tensor | None = None
    width: int = 0
    height: int = 0
    error: str | None = None


def decode(key: str, source: str, methods, transform, data: bytes | None = None, missing: str | None = None) \
        -> Decoded:
    """read_image (EXIF orientation, bit depth, CMYK, palette; FIFOs refused) then the model's eval transform."""
    if missing:
        return Decoded(key, source, tuple(methods), error=missing)
    try:
        img = read_image(data if data is not None else source, name=key)
        pixels = transform(img)
    except ImageDecodeError as exc:
        return Decoded(key, source, tuple(methods), error=str(exc))
    except Exception as exc:  # a transform failing on an odd image is that image's failure, not the job's
        return Decoded(key, source, tuple(methods), error=f"{key}: cannot preprocess ({type(exc).__name__}: {exc})")
    return Decoded(key, source, tuple(methods), pixels.float(), img.width, img.height)


class Worker:
    """Holds the model (loaded once) and explains batches. plans: the job's methods (spec.validate/check_model)."""

    def __init__(self, spec: JobSpec, plans: list[MethodPlan], job_id: str, model=None, data_config=None):
        from vitx_fast.models.loading import load_model

        self.spec, self.plans, self.job_id = spec, plans, job_id
        if model is None:
            model, data_config = load_model(spec.model, spec.checkpoint, spec.pretrained)
        self.device = torch.device(spec.device)
        self.model = model.to(self.device).eval()
        self.data_config = data_config
        self.transform = make_transform(data_config)
        self.model_id = spec.model_id()
        self.target_spec = spec.target_spec()
        self.input_size = tuple(data_config["input_size"][-2:])

    def explain(self, items: list[Decoded]) -> pa.Table:
        """Every pending (image, method) unit of `items` -> rows of schema.RECORDS (results and errors)."""
        created = datetime.datetime.now(datetime.timezone.utc)
        parts = []
        for p in self.plans:
            todo = [it for it in items if p.name in it.methods]
            bad = [it for it in todo if it.pixels is None]
            parts += [self._error(it, p, "decode", it.error, created) for it in bad]
            ok = [it for it in todo if it.pixels is not None]
            if ok:
                parts += self._explain(ok, p, created)
        return pa.concat_tables(parts) if parts else RECORDS.empty_table()

    def _explain(self, items: list[Decoded], p: MethodPlan, created) -> list[pa.Table]:
        import vitx_fast as vx

        x = torch.stack([it.pixels for it in items]).to(self.device)
        try:
            exp = vx.explain(self.model, x, method=p.name, target=target_argument(self.target_spec, len(items)),
                             **p.options)
        except Exception as exc:
            if len(items) == 1:
                return [self._error(items[0], p, "explain", f"{p.name}: {type(exc).__name__}: {exc}", created)]
            # one image must not fail its batch: retry one at a time, so only the images that fail are errors
            return [t for it in items for t in self._explain([it], p, created)]
        return [self._rows(items, p, exp, created)]

    def _rows(self, items: list[Decoded], p: MethodPlan, exp, created) -> pa.Table:
        B = len(items)
        targets = exp.targets.reshape(B, -1).cpu()
        K = targets.shape[1]
        maps = exp.maps.detach().reshape(B, K, *exp.maps.shape[-2:]).float().cpu()
        h, w = maps.shape[-2:]
        n = B * K
        if exp.logits is not None and targets.min() >= 0:
            logits = exp.logits.detach().double().cpu()
            logit = logits.gather(1, targets).reshape(-1).numpy()
            prob = logits.softmax(-1).gather(1, targets).reshape(-1).numpy()
        else:  # a headless model: no classes, no scores
            logit = prob = np.full(n, np.nan)
        flat = maps.reshape(n, h * w).numpy()
        cols = {
            "image": np.repeat([it.key for it in items], K), "method": [p.name] * n, "options": [p.options_json] * n,
            "options_digest": [p.digest] * n, "model": [self.spec.model] * n, "model_id": [self.model_id] * n,
            "target_spec": [self.target_spec] * n, "rank": np.tile(np.arange(K, dtype=np.int32), B),
            "num_targets": np.full(n, K, np.int32), "target": targets.reshape(-1).numpy(),
            "logit": pa.array(logit, pa.float64(), from_pandas=True),
            "probability": pa.array(prob, pa.float64(), from_pandas=True),
            "map_height": np.full(n, h, np.int32), "map_width": np.full(n, w, np.int32),
            "map": _lists(flat, pa.float32()),
            "image_height": np.repeat([it.height for it in items], K).astype(np.int32),
            "image_width": np.repeat([it.width for it in items], K).astype(np.int32),
            "source": np.repeat([it.source for it in items], K), "job_id": [self.job_id] * n,
            "created": pa.array([created] * n, pa.timestamp("ms", tz="UTC")),
        }
        if self.spec.heatmap:
            H, W = self.input_size
            import vitx_fast as vx

            heat = vx.upsample(vx.normalize(maps.reshape(n, h, w).double()), (H, W))
            cols["heatmap"] = _lists((heat * 255).round().clamp(0, 255).to(torch.uint8).reshape(n, H * W).numpy(),
                                     pa.uint8())
            cols["heatmap_height"], cols["heatmap_width"] = np.full(n, H, np.int32), np.full(n, W, np.int32)
        return _table(cols, n)

    def _error(self, it: Decoded, p: MethodPlan, stage: str, reason: str, created) -> pa.Table:
        cols = {"image": [it.key], "method": [p.name], "options": [p.options_json], "options_digest": [p.digest],
                "model": [self.spec.model], "model_id": [self.model_id], "target_spec": [self.target_spec],
                "source": [it.source], "job_id": [self.job_id], "stage": [stage], "error": [reason.splitlines()[0]],
                "created": pa.array([created], pa.timestamp("ms", tz="UTC"))}
        return _table(cols, 1)


def _lists(flat: np.ndarray, kind) -> pa.Array:
    """(n, m) array -> list<kind> array of n lists of m values, without a Python loop."""
    n, m = flat.shape
    offsets = pa.array(np.arange(0, (n + 1) * m, m, dtype=np.int32) if n else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(flat).reshape(-1), kind))


def _table(cols: dict, n: int) -> pa.Table:
    """Columns of RECORDS (missing ones null) -> a table in exactly that schema."""
    arrays = []
    for f in RECORDS:
        v = cols.get(f.name)
        arrays.append(pa.nulls(n, f.type) if v is None else v if isinstance(v, pa.Array) else pa.array(v, f.type))
    return pa.Table.from_arrays(arrays, schema=RECORDS)
