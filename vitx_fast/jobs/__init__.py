"""Batch explanation jobs: batched, exactly-once, resumable, into one Parquet result store. docs/batch.md.

    from vitx_fast.jobs import JobSpec, run
    result = run(JobSpec(inputs=["photos/"], store="results/", methods=["reciprocam", "gae"], batch_size=64))
    print(result.summary())                    # explained / skipped (already done) / failed
    df = vx.read_results("results/")           # one row per (image, method, target); df.map[i]: (h, w) float32

The same job runs on the embedded local executor (default) or on Ray Data (`executor="ray"`, `pip install
'vitx-fast[ray]'`); `vitx explain` is its command line.
"""
from vitx_fast.jobs.inputs import InputError
from vitx_fast.jobs.read import check_store, read_errors, read_results
from vitx_fast.jobs.run import JobResult, run
from vitx_fast.jobs.spec import JobSpec, JobSpecError
from vitx_fast.jobs.store import StoreError, StoreLockedError

__all__ = ["InputError", "JobResult", "JobSpec", "JobSpecError", "StoreError", "StoreLockedError", "check_store",
           "read_errors", "read_results", "run"]
