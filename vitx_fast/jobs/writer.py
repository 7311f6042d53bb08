"""The one writer of a job: takes the executors' records, keeps whole units together, drops what is already stored
(a retried Ray task's rows included) and commits shards. Runs in the driver only. docs/batch.md §4."""
from __future__ import annotations

import errno
import time
from collections import defaultdict

import pyarrow as pa

from vitx_fast.jobs.schema import ERRORS, RESULTS, split_records, unit_keys
from vitx_fast.jobs.store import Store, StoreError


class ShardWriter:
    """add(records) as they arrive; flush() commits the complete units buffered; close() commits the rest.

    done: units the store held before the job (their rows are never written again). A unit is complete when its
    ranks 0..num_targets-1 are all present; rows of an incomplete unit wait for the rest (an executor may split a
    batch's output), repeated ranks are dropped.
    """

    def __init__(self, store: Store, done: set[tuple], shard_rows: int = 8192, flush_seconds: float = 30.0):
        self.store, self.done = store, done
        self.shard_rows, self.flush_seconds = shard_rows, flush_seconds
        self.committed: set[tuple] = set()  # units committed by this job
        self.failed: dict[tuple, str] = {}  # unit -> reason, for units that failed in this job
        self._ready: list[pa.Table] = []
        self._ready_rows = 0
        self._errors: list[pa.Table] = []
        self._partial = RESULTS.empty_table()
        self._last = time.monotonic()
        self._seq = 0
        self.rows_written = 0
        self.error_rows_written = 0
        self.duplicates_dropped = 0

    def add(self, records: pa.Table) -> None:
        results, errors = split_records(records)
        if errors.num_rows:
            keep = [u not in self.done and u not in self.committed for u in unit_keys(errors)]
            errors = errors.filter(pa.array(keep, pa.bool_()))
            for u, reason in zip(unit_keys(errors), errors["error"].to_pylist(), strict=True):
                self.failed.setdefault(u, reason)
            if errors.num_rows:
                self._errors.append(errors)
        if results.num_rows:
            self._take(pa.concat_tables([self._partial, results]))
        if self._ready_rows >= self.shard_rows or time.monotonic() - self._last >= self.flush_seconds:
            self.flush()

    def _take(self, table: pa.Table) -> None:
        rows: dict[tuple, dict[int, int]] = defaultdict(dict)  # unit -> rank -> first row index
        ranks, want = table["rank"].to_pylist(), table["num_targets"].to_pylist()
        units = unit_keys(table)
        complete_idx, partial_idx = [], []
        for i, (u, r) in enumerate(zip(units, ranks, strict=True)):
            if u in self.done or u in self.committed or r in rows[u]:
                self.duplicates_dropped += 1
                continue
            rows[u][r] = i
        for u, by_rank in rows.items():
            n = want[next(iter(by_rank.values()))]
            (complete_idx if len(by_rank) == n else partial_idx).extend(sorted(by_rank.values()))
            if len(by_rank) == n:
                self.committed.add(u)
                self.failed.pop(u, None)
        if complete_idx:
            done = table.take(pa.array(sorted(complete_idx), pa.int64()))
            self._ready.append(done)
            self._ready_rows += done.num_rows
        self._partial = table.take(pa.array(sorted(partial_idx), pa.int64()))

    def flush(self) -> None:
        """Commit the buffered complete units (one results shard) and errors (one errors shard)."""
        self._last = time.monotonic()
        try:
            if self._ready:
                table = pa.concat_tables(self._ready)
                self.store.write_shard(table, "results", self._seq)
                self._seq += 1
                self.rows_written += table.num_rows
                self._ready, self._ready_rows = [], 0
            if self._errors:
                table = pa.concat_tables(self._errors).cast(ERRORS)
                self.store.write_shard(table, "errors", self._seq)
                self._seq += 1
                self.error_rows_written += table.num_rows
                self._errors = []
        except OSError as exc:
            if isinstance(exc, StoreError):
                raise
            why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror or str(exc)
            raise StoreError(f"cannot write to result store {self.store.path}: {why}; rows committed before "
                             f"are kept, nothing half-written (re-run the same command to resume)") from None

    def close(self) -> None:
        """Commit everything; rows of a unit that never completed are not written (the unit is recomputed by the
        next run) and are reported as failed."""
        for u in set(unit_keys(self._partial)):
            self.failed.setdefault(u, "incomplete result: not every target's map arrived")
        self._partial = RESULTS.empty_table()
        self.flush()
