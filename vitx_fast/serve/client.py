"""A small HTTP client for the service: multipart requests and a bounded concurrent load run (tests, benchmarks)."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field


def multipart(fields: dict, image: bytes, filename: str = "image.png") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request with the file field `image` and text `fields`."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items() if v is not None]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _split(url: str) -> tuple[str, int, str]:
    """'http://host:port/prefix' -> (host, port, '/prefix')."""
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port or 80, u.path.rstrip("/")


def post(url: str, path: str, body: bytes, content_type: str, timeout: float = 60.0) -> tuple[int, dict, bytes]:
    """One POST to `url` + `path` (url: http://host:port[/prefix]); returns (status, headers, body)."""
    host, port, prefix = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", prefix + path, body, {"Content-Type": content_type})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@dataclass
class LoadResult:
    """What a load run measured: requests/s, latency quantiles (ms), failures and the batch sizes reported."""

    clients: int
    requests: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def quantile(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def load(url: str, body: bytes, content_type: str, clients: int, requests: int, deadline_s: float = 120.0,
         keep_bodies: bool = False) -> LoadResult:
    """`requests` POSTs to `url`/v1/explain from `clients` threads with keep-alive connections, bounded by a
    deadline."""
    host, port, prefix = _split(url)
    lock, sent = threading.Lock(), [0]
    res = LoadResult(clients, requests, 0.0)
    stop = time.monotonic() + deadline_s

    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=60)
        while True:
            with lock:
                if sent[0] >= requests or time.monotonic() > stop:
                    break
                sent[0] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", prefix + "/v1/explain", body, {"Content-Type": content_type})
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    res.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
                continue
            dt = 1000 * (time.perf_counter() - t0)
            with lock:
                if r.status != 200:
                    res.failures.append(f"HTTP {r.status}: {data[:200]!r}")
                    continue
                res.latencies_ms.append(dt)
                if keep_bodies:
                    res.bodies.append(data)
                if r.getheader("Content-Type", "").startswith("application/json"):
                    res.batch_sizes.append(int(json.loads(data)["timings"]["batch_size"]))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop - time.monotonic()) + 60)
    res.seconds = time.perf_counter() - t0
    return res
