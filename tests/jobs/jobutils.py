"""Helpers of the batch-job tests: generated digit scenes written as files, a deadline, store comparison."""
from __future__ import annotations

import contextlib
import signal

import numpy as np
from PIL import Image


def write_scenes(root, n: int, layout=("a/{i:03d}.png", "b/{i:03d}.png", "b/{i:03d}.jpg"), seed: int = 0) -> list[str]:
    """n generated scenes per layout entry (same stems in several folders and formats); returns the keys."""
    from vitx_fast.data.generate import generate_raw

    raw = generate_raw("test", n * len(layout), 1, seed, None)["raw"]
    keys = []
    for j, pattern in enumerate(layout):
        for i in range(n):
            key = pattern.format(i=i)
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(raw[j * n + i]).save(path, quality=95)
            keys.append(key)
    return keys


@contextlib.contextmanager
def deadline(seconds: int, what: str = "test"):
    """Fail (TimeoutError) instead of hanging when the block takes longer than `seconds` (SIGALRM; main thread)."""

    def fire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def by_unit(df):
    """Results sorted by (image, method, options_digest, model_id, target_spec, rank), index reset."""
    cols = ["image", "method", "options_digest", "model_id", "target_spec", "rank"]
    return df.sort_values(cols).reset_index(drop=True)


def assert_same_rows(a, b, atol: float = 1e-5):
    """Two result tables hold the same rows: keys, classes and scores equal, maps equal to float32 rounding (the
    batches an executor forms may differ, and with them the last bits of a batched matrix product)."""
    a, b = by_unit(a), by_unit(b)
    assert len(a) == len(b)
    for col in ("image", "method", "options_digest", "model_id", "target_spec", "rank", "target", "map_height",
                "map_width", "image_height", "image_width"):
        assert (a[col].to_numpy() == b[col].to_numpy()).all(), col
    np.testing.assert_allclose(a["probability"].to_numpy(), b["probability"].to_numpy(), rtol=1e-5, atol=1e-7)
    for x, y in zip(a["map"], b["map"], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol)
