"""`run(spec)`: one batch job from its spec to a summary. docs/batch.md §1.

Order: validate the spec (no image read, no model loaded) -> take the store's lock -> find the inputs -> load the
model and check methods and target against it -> skip the units the store holds -> run the executor -> commit.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import uuid
from dataclasses import dataclass, field

from vitx_fast.jobs.inputs import discover
from vitx_fast.jobs.spec import JobSpec, JobSpecError, check_model
from vitx_fast.jobs.store import Store, StoreError, now_iso
from vitx_fast.jobs.writer import ShardWriter

RAY_MISSING = "the ray executor needs Ray Data: pip install 'vitx-fast[ray]'"


@dataclass
class JobResult:
    """What a job did. explained / skipped (the store held every unit) / failed: images; failures: (image, reason)."""

    job_id: str
    store: str
    images: int
    explained: int
    skipped: int
    failed: int
    rows_written: int
    error_rows_written: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"explained {self.explained}, skipped {self.skipped} (already done), failed {self.failed} of "
                f"{self.images} image(s); {self.rows_written} row(s) written to {self.store} in {self.seconds:.1f} s")

    @property
    def ok(self) -> bool:
        return self.failed == 0


def versions(executor: str) -> dict:
    import platform

    import pyarrow
    import timm
    import torch

    import vitx_fast

    v = {"vitx_fast": vitx_fast.__version__, "torch": torch.__version__, "timm": timm.__version__,
         "pyarrow": pyarrow.__version__, "python": platform.python_version()}
    if executor == "ray":
        import ray

        v["ray"] = ray.__version__
    return v


def run(spec: JobSpec, progress: bool = True, on_progress=None) -> JobResult:
    """Run a job. progress: a tqdm bar (images/s, ETA) on stderr. on_progress(done, total): called after every batch.
    Raises JobSpecError / InputError (bad spec or inputs, before any work), StoreError (store locked, unwritable or
    full: one line; rows committed before are kept)."""
    from vitx_fast.models.loading import ModelLoadError, load_model

    t0 = time.perf_counter()
    plans = spec.validate()
    if spec.executor == "ray" and importlib.util.find_spec("ray") is None:  # before the store is opened
        raise JobSpecError(RAY_MISSING)
    job_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
    notes: list[str] = []
    with Store.open(spec.store, job_id, {"command": " ".join(sys.argv[:1] + sys.argv[1:])[:500]}) as store:
        items = discover(spec.inputs, store.path, spec.image_column, spec.id_column, notes)
        try:
            model, data_config = load_model(spec.model, spec.checkpoint, spec.pretrained)
        except ModelLoadError as exc:
            raise JobSpecError(str(exc)) from None
        plans, dropped = check_model(spec, plans, model)
        notes += dropped
        model_id, target = spec.model_id(), spec.target_spec()
        done = store.done_units()
        pending = []
        for it in items:
            need = tuple(p.name for p in plans if (it.key, p.name, p.digest, model_id, target) not in done)
            if need:
                pending.append((it, need))
        job = {"job_id": job_id, "status": "running", "started": now_iso(), "spec": spec.to_dict(),
               "methods": {p.name: {"options": p.options_json, "options_digest": p.digest} for p in plans},
               "model_id": model_id, "target_spec": target, "versions": versions(spec.executor)}
        cfg = {k: data_config.get(k) for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
               if k in data_config}
        store.update_manifest(job, {model_id: {"data_config": cfg, "model": spec.model}})
        writer = ShardWriter(store, done, spec.shard_rows, spec.flush_seconds)
        n_done = 0
        bar = _bar(len(pending), progress)

        def step(n: int) -> None:
            nonlocal n_done
            n_done += n
            bar.update(n)
            if on_progress is not None:
                on_progress(n_done, len(pending))

        status = "failed"
        try:
            if pending:
                _execute(spec, plans, job_id, model, data_config, pending, writer, step)
            writer.close()
            status = "finished"
        except KeyboardInterrupt:
            writer.close()  # complete units are kept: a re-run continues from here
            status = "interrupted"
            raise
        except StoreError:
            raise
        except Exception:
            with contextlib.suppress(OSError):
                writer.close()  # keep what is complete; the original error is the one to report
            raise
        finally:
            bar.close()
            result = _result(job_id, store.path, items, pending, plans, model_id, target, writer, t0, notes)
            job.update(status=status, finished=now_iso(), counts={
                "images": result.images, "explained": result.explained, "skipped": result.skipped,
                "failed": result.failed, "rows_written": result.rows_written,
                "error_rows_written": result.error_rows_written})
            if status != "failed":
                store.update_manifest(job)
            else:  # the store may be full: the manifest is informational, the shards are the truth
                with contextlib.suppress(OSError):
                    store.update_manifest(job)
    return result


def _execute(spec, plans, job_id, model, data_config, pending, writer, step) -> None:
    if spec.executor == "ray":
        try:
            from vitx_fast.jobs.ray_executor import run_ray
        except ImportError:
            raise JobSpecError(RAY_MISSING) from None
        del model  # each actor loads its own
        run_ray(spec, plans, job_id, data_config, pending, writer, step)
    else:
        from vitx_fast.jobs.local import run_local
        from vitx_fast.jobs.worker import Worker

        run_local(pending, Worker(spec, plans, job_id, model, data_config), writer, step)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="explain", disable=not enabled or total == 0, dynamic_ncols=True,
                smoothing=0.1)


def _result(job_id, path, items, pending, plans, model_id, target, writer, t0, notes) -> JobResult:
    failures: dict[str, str] = {}
    for (image, _m, _d, _mid, _t), reason in writer.failed.items():
        failures.setdefault(image, reason)
    for it, need in pending:  # a unit neither committed nor failed did not run (the job stopped first)
        digest = {p.name: p.digest for p in plans}
        if it.key not in failures and any((it.key, m, digest[m], model_id, target) not in writer.committed
                                          for m in need):
            failures.setdefault(it.key, "not explained: the job stopped before this image")
    failed = len(failures)
    return JobResult(job_id, path, len(items), len(pending) - failed, len(items) - len(pending), failed,
                     writer.rows_written, writer.error_rows_written, time.perf_counter() - t0,
                     sorted(failures.items()), notes)
