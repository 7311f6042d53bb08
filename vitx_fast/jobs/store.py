"""The result store: one directory, written only by the job holding its lock. docs/batch.md §3-4.

    STORE/manifest.json            format, job history (spec, versions, counts, status), data configs of the models
    STORE/results/part-*.parquet   result shards (schema.RESULTS); a unit of rows is always in exactly one shard
    STORE/errors/part-*.parquet    error shards (schema.ERRORS)
    STORE/.lock                    fcntl.flock'ed by the running job; holds its id, pid, host and start time

Every file is written under a name made by `tempfile.mkstemp` in its final folder (O_CREAT | O_EXCL: a planted
symlink is never followed), flushed, fsynced and `os.replace`d into place; a killed job leaves at most `.tmp-*`
files, which the next job removes once it holds the lock. Readers ignore temporary files.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket

from vitx_fast.data.images import atomic_write

FORMAT = "vitx-result-store"
VERSION = 1
TMP_PREFIX = ".tmp-"
STORE_ENTRIES = (".lock", "manifest.json", "results", "errors")


class StoreError(OSError):
    """The store cannot be used or written; the message is one line naming the store and the reason."""


class StoreLockedError(StoreError):
    """Another job holds the store's lock."""


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_parquet(table, path: str) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))


def shard_files(path: str, kind: str = "results") -> list[str]:
    folder = os.path.join(path, kind)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith("part-") and f.endswith(".parquet"))


def read_manifest(path: str) -> dict | None:
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot read manifest.json ({exc})") from None


class Store:
    """An open store held by one job: `Store.open(path, job_id, ...)`, then `close()` (or use as a context)."""

    def __init__(self, path: str, lock_fd: int, job_id: str):
        self.path, self._lock_fd, self.job_id = path, lock_fd, job_id
        self.results_dir = os.path.join(path, "results")
        self.errors_dir = os.path.join(path, "errors")
        self.manifest = read_manifest(path) or {"format": FORMAT, "version": VERSION, "created": now_iso(),
                                                "jobs": [], "models": {}, "counts": {}}

    @classmethod
    def open(cls, path: str, job_id: str, info: dict | None = None) -> Store:
        """Create or open the store and take its lock (StoreLockedError naming the job that has it); remove the
        temporary files a killed job left."""
        path = os.path.abspath(path)
        try:
            if os.path.lexists(path) and not os.path.isdir(path):
                raise StoreError(f"cannot use {path} as a result store: it exists and is not a folder")
            os.makedirs(path, exist_ok=True)
            foreign = [e for e in os.listdir(path) if e not in STORE_ENTRIES and not e.startswith(TMP_PREFIX)]
            if read_manifest(path) is None and foreign:
                raise StoreError(f"{path} is not empty and is not a result store (no manifest.json); give a new or "
                                 "empty folder to --out")
            for sub in ("results", "errors"):
                d = os.path.join(path, sub)
                if os.path.islink(d):
                    raise StoreError(f"{d} is a symlink; a result store's folders must be real folders")
                os.makedirs(d, exist_ok=True)
            fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except StoreError:
            raise
        except OSError as exc:
            raise StoreError(f"cannot write to result store {path}: {exc.strerror or exc}") from None
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            try:
                o = json.loads(other)
                who = f"job {o.get('job_id')} (pid {o.get('pid')} on {o.get('host')}, started {o.get('started')})"
            except ValueError:
                who = "another job"
            raise StoreLockedError(f"result store {path} is in use by {who}; wait for it to finish or give another "
                                   "--out") from None
        me = {"job_id": job_id, "pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(),
              **(info or {})}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot write to result store {path}: {exc.strerror or exc}") from None
        store = cls(path, fd, job_id)
        store.remove_stale_temporaries()
        if read_manifest(path) is None:
            try:
                store.update_manifest(None)
            except OSError as exc:
                store.close()
                raise StoreError(f"cannot write to result store {path}: {exc.strerror or exc}") from None
        return store

    def remove_stale_temporaries(self) -> int:
        """Remove `.tmp-*` files (of killed jobs: only the lock holder writes, and it holds the lock now)."""
        n = 0
        for d in (self.path, self.results_dir, self.errors_dir):
            for name in os.listdir(d):
                if name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(d, name))  # unlink never follows a symlink
                        n += 1
        return n

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ contents
    def done_units(self) -> set[tuple]:
        """Units (schema.UNIT) the store holds."""
        from vitx_fast.jobs.schema import UNIT, unit_keys

        return {u for f in shard_files(self.path) for u in unit_keys(_read(f, list(UNIT)))}

    def write_shard(self, table, kind: str, seq: int) -> str:
        path = os.path.join(self.path, kind, f"part-{self.job_id}-{seq:05d}.parquet")
        write_parquet(table, path)
        return path

    def update_manifest(self, job: dict | None, models: dict | None = None) -> None:
        """Record this job's entry (replaced on each call) and the store's counts, atomically."""
        m = self.manifest
        for j in m["jobs"]:
            if j.get("status") == "running" and j.get("job_id") != self.job_id:
                j["status"] = "interrupted"  # its process is gone: we hold the lock
        if job is not None:
            m["jobs"] = [j for j in m["jobs"] if j.get("job_id") != self.job_id] + [job]
        m["models"].update(models or {})
        m["counts"] = counts(self.path)
        m["updated"] = now_iso()
        atomic_write(os.path.join(self.path, "manifest.json"),
                     lambda f: f.write(json.dumps(m, indent=1, sort_keys=True, default=str).encode()))


def _read(path: str, columns=None):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=columns)


def counts(path: str) -> dict:
    import pyarrow.parquet as pq

    files = shard_files(path)
    images = set()
    for f in files:
        images.update(_read(f, ["image"]).column("image").to_pylist())
    return {"result_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in files), "result_files": len(files),
            "images": len(images),
            "error_rows": sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(path, "errors"))}
