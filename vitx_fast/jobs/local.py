"""The embedded executor (the default): batches through the engine in this process. Decoding runs in a thread pool
ahead of the model (PIL and the torch transforms release the GIL), so the next batch is ready when the model is
free; results go straight to the job's writer. docs/batch.md §6."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

from vitx_fast.jobs.worker import decode


def batches(pending, worker, batch_size: int, threads: int, ahead: int = 2):
    """Decoded batches of `batch_size` items in input order; at most `ahead` batches are decoded ahead of the
    consumer (memory stays bounded for any number of images). pending: [(WorkItem, methods)]."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vitx-decode") as pool:
        futures: deque = deque()
        it = iter(pending)

        def submit(n: int) -> None:
            for item, methods in _take(it, n):
                futures.append(pool.submit(decode, item.key, item.source, methods, worker.transform, item.data,
                                           item.missing))

        submit(batch_size * (ahead + 1))
        while futures:
            batch = [futures.popleft().result() for _ in range(min(batch_size, len(futures)))]
            submit(len(batch))
            yield batch


def _take(it, n: int):
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def run_local(pending, worker, writer, progress) -> None:
    """Explain every pending item; progress(n_images) is called after each batch."""
    for batch in batches(pending, worker, worker.spec.batch_size, worker.spec.decode_workers):
        writer.add(worker.explain(batch))
        progress(len(batch))
