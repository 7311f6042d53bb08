"""A real service for the tests: `vitx serve` in a subprocess on a free loopback port, started once per module."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("ray.serve", reason="the service needs the `serve` extra (ray[serve])")
pytest.importorskip("multipart", reason="the service needs python-multipart")

MAX_BYTES = 400_000
STARTUP_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log) -> None:
    end = time.monotonic() + STARTUP_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"vitx serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    log.seek(0)
    raise RuntimeError(f"vitx serve did not become healthy in {STARTUP_S} s:\n{log.read()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """URL of a running service on the demo model (dynamic batching up to 16, 50 ms wait, 400 kB body limit)."""
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "vitx_fast", "serve", "--model", "demo", "--port", str(port), "--ray-cpus", "2",
           "--max-batch-size", "16", "--batch-wait-timeout-s", "0.05", "--max-bytes", str(MAX_BYTES), "--threads",
           "1"]
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path_factory.mktemp("serve") / "serve.log", "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_healthy(url, proc, log)
            yield url
        finally:
            stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the server's process group (Ray shuts down), SIGKILL if it lingers; a gone group is fine."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
