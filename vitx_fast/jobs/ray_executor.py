"""The Ray Data executor: the same job on a local Ray started for it (`ray.init(num_cpus=...)`, 127.0.0.1) or on an
existing cluster (`address`). docs/batch.md §7.

    ray.data.from_items(pending work items)                      the driver's plan: keys, sources, methods still needed
      .map_batches(decode_batch)                                 Ray tasks: read_image + the model's transform
      .map_batches(RayExplainer, compute=ActorPoolStrategy(size=actors), num_cpus=..., num_gpus=...)
                                                                 actors: the model loads once per actor (Worker)
      .iter_batches(batch_size=None, batch_format="pyarrow")     back to the driver, the only writer of the store

Ray Data schedules, retries and restarts: a killed actor is restarted and its batch re-run; whatever reaches the
driver twice is dropped by the writer (it keys every row by its unit). Nothing here schedules work itself.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os

import numpy as np

from vitx_fast.jobs.spec import JobSpec, JobSpecError, MethodPlan
from vitx_fast.jobs.worker import Decoded, Worker, decode

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DECODE_CPUS = 0.5  # per decode task: actors must leave CPU for them, or the pipeline starves on a small machine


@functools.cache
def _transform(config_json: str):
    from vitx_fast.data.images import make_transform

    return make_transform(json.loads(config_json))


def decode_batch(batch: dict, data_config: dict) -> dict:
    """Work items -> decoded pixels (B, 3, H, W) float32, original sizes and the decode error (None when fine)."""
    transform = _transform(json.dumps(data_config, sort_keys=True))
    H, W = data_config["input_size"][-2:]
    out = [decode(k, s, m.split(","), transform, bytes(d) if has else None, miss or None)
           for k, s, m, d, has, miss in zip(batch["key"], batch["source"], batch["methods"], batch["data"],
                                            batch["has_data"], batch["missing"], strict=True)]
    zero = np.zeros((3, H, W), np.float32)
    return {"key": np.array([o.key for o in out], object), "source": np.array([o.source for o in out], object),
            "methods": batch["methods"], "error": np.array([o.error or "" for o in out], object),
            "width": np.array([o.width for o in out], np.int32), "height": np.array([o.height for o in out], np.int32),
            "pixels": np.stack([zero if o.pixels is None else o.pixels.numpy() for o in out])}


class RayExplainer:
    """The callable class of the actor pool: one Worker (model loaded once) per actor."""

    def __init__(self, spec: dict, plans: list[dict], job_id: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.worker = Worker(JobSpec.from_dict(spec), [MethodPlan(**p) for p in plans], job_id)

    def __call__(self, batch: dict):
        import torch

        items = [Decoded(k, s, tuple(m.split(",")), None if e else torch.from_numpy(np.array(px)), int(w), int(h),
                         e or None)
                 for k, s, m, e, px, w, h in zip(batch["key"], batch["source"], batch["methods"], batch["error"],
                                                 batch["pixels"], batch["width"], batch["height"], strict=True)]
        return self.worker.explain(items)


def _connect(spec: JobSpec) -> bool:
    """Start or join Ray; True when this job started it (and so shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if spec.address:
        ray.init(address=spec.address, **common)
        return True
    with loopback_only():  # address="local": a Ray of its own, even when another one runs on this machine
        ray.init(address="local", num_cpus=spec.ray_cpus or os.cpu_count(), **common)
    return True


@contextlib.contextmanager
def loopback_only():
    """A Ray started inside binds its node and every gRPC server to 127.0.0.1: Ray's single-machine mode (the one it
    uses on macOS / Windows), switched on by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 while the processes start."""
    from ray._private import ray_constants

    saved_env, saved = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: set for a process that imported ray already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


def run_ray(spec: JobSpec, plans: list[MethodPlan], job_id: str, data_config: dict, pending, writer, progress) -> None:
    """Run the pending (WorkItem, methods) pairs on Ray Data; the driver commits what comes back."""
    from dataclasses import asdict

    import ray
    import ray.data
    import torch

    started = _connect(spec)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # after ray.data configured its logging
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the job's own bar counts committed images
        cpus = ray.cluster_resources().get("CPU", 1.0)
        per_actor = spec.cpus_per_actor or min(1.0, max(0.1, (cpus - DECODE_CPUS) / spec.actors))
        if per_actor * spec.actors + DECODE_CPUS > cpus + 1e-9:
            raise JobSpecError(f"{spec.actors} actor(s) x {per_actor:g} CPU leave less than {DECODE_CPUS} of the "
                               f"cluster's {cpus:g} CPUs for decoding: the pipeline would stall; use fewer actors or "
                               "a smaller --cpus-per-actor")
        gpus = 1 if torch.device(spec.device).type == "cuda" else 0
        # uniform columns: Arrow would turn an all-None bytes column into floats
        rows = [{"key": it.key, "source": it.source, "data": it.data or b"", "has_data": it.data is not None,
                 "missing": it.missing or "",
                 "methods": ",".join(methods)} for it, methods in pending]
        blocks = max(1, min(len(rows) // spec.batch_size, 1000))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(decode_batch, fn_kwargs={"data_config": data_config}, batch_size=spec.batch_size,
                            num_cpus=DECODE_CPUS)
        ds = ds.map_batches(RayExplainer, batch_size=spec.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=spec.actors), num_cpus=per_actor,
                            num_gpus=gpus or None,
                            fn_constructor_kwargs={"spec": spec.to_dict(), "plans": [asdict(p) for p in plans],
                                                   "job_id": job_id, "threads": int(per_actor)})
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(block)
            progress(len(set(block.column("image").to_pylist())))
    finally:
        if started:
            ray.shutdown()
