"""Requests and expected answers for the service tests."""
from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import torch

import vitx_fast as vx
from vitx_fast.serve.client import multipart, post


def scene_png(index: int = 0) -> bytes:
    from PIL import Image

    from vitx_fast.data import make_benchmark

    buf = io.BytesIO()
    Image.fromarray(make_benchmark("test", index + 1, 1, seed=3).raw[index]).save(buf, format="PNG")
    return buf.getvalue()


_LOCAL: dict = {}


def expected_maps(png: bytes, method: str, target=None, **options) -> tuple[np.ndarray, list[int]]:
    """What vx.explain gives in this process for the same image: (K, h, w) maps and the explained classes."""
    from vitx_fast.data.images import make_transform, read_image
    from vitx_fast.models.loading import load_model

    if "model" not in _LOCAL:
        _LOCAL["model"], cfg = load_model("demo")
        _LOCAL["transform"] = make_transform(cfg)
    x = _LOCAL["transform"](read_image(png))[None]
    exp = vx.explain(_LOCAL["model"], x, method=method, target=target, **options)
    maps = exp.maps[0].float()
    return (maps[None] if maps.dim() == 2 else maps).numpy(), exp.targets[0].reshape(-1).tolist()


def explain(url: str, png: bytes, **fields) -> tuple[int, dict, bytes]:
    body, ctype = multipart({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in fields.items()}, png)
    return post(url, "/v1/explain", body, ctype)


def post_json(url: str, path: str, payload) -> tuple[int, dict]:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, body = post(url, path, raw, "application/json")
    return status, json.loads(body)


def get_json(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def assert_maps_equal(got, want, what=""):
    got = torch.tensor(np.asarray(got, dtype=np.float64))
    want = torch.tensor(np.asarray(want, dtype=np.float64))
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    scale = float(want.abs().max().clamp(min=1e-12))
    err = float((got - want).abs().max()) / scale
    assert err <= 1e-5, f"{what}: max relative error {err:.2e}"
