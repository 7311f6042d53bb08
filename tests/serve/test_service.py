"""The HTTP service against a real Ray Serve instance: maps equal `vx.explain`, the KServe route, every kind of bad
request (4xx naming the problem, and the service keeps serving), concurrent requests that are actually batched."""
from __future__ import annotations

import base64
import io
import json
import threading
import urllib.request

import numpy as np
import pytest
from helpers import assert_maps_equal, expected_maps, explain, get_json, post_json, scene_png

from vitx_fast.serve.client import load, multipart, post

METHODS = ["reciprocam", "agcam", "rollout", "gae", "daam", "lrp", "grad_rollout", "tame"]


@pytest.mark.parametrize("method", METHODS)
def test_json_maps_equal_vx_explain(server, method):
    png = scene_png(0)
    status, _, body = explain(server, png, method=method)
    assert status == 200, body
    got = json.loads(body)
    want, targets = expected_maps(png, method)
    assert got["method"] == method and got["targets"] == targets
    assert got["grid"] == list(want.shape[-2:])
    assert_maps_equal(got["maps"], want, method)
    assert len(got["predictions"]) == 5 and got["predictions"][0]["class"] == targets[0]
    probs = [p["probability"] for p in got["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    assert got["timings"]["batch_size"] >= 1 and got["model_id"].startswith("demo@")


def test_targets_options_and_formats(server):
    png = scene_png(1)
    status, _, body = explain(server, png, method="gae", target="top3")
    r = json.loads(body)
    want, targets = expected_maps(png, "gae", target="top3")
    assert status == 200 and r["targets"] == targets and len(targets) == 3
    assert_maps_equal(r["maps"], want, "top3")
    status, _, body = explain(server, png, method="rollout", target="2,5", options={"head_fusion": "max"})
    want, targets = expected_maps(png, "rollout", target=[[2, 5]], head_fusion="max")
    r = json.loads(body)
    assert status == 200 and r["targets"] == [2, 5] and r["options"]["head_fusion"] == "max"
    assert_maps_equal(r["maps"], want, "class list")
    status, headers, body = explain(server, png, method="reciprocam", target="all", format="npy")
    arr = np.load(io.BytesIO(body))
    assert status == 200 and arr.shape == (10, 8, 8) and arr.dtype == np.float32
    assert_maps_equal(arr, expected_maps(png, "reciprocam", target="all")[0], "npy all classes")
    status, headers, body = explain(server, png, method="agcam", format="png")
    assert status == 200 and headers["content-type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(io.BytesIO(body)).size == Image.open(io.BytesIO(png)).size


def test_json_body_with_base64(server):
    png = scene_png(2)
    status, r = post_json(server, "/v1/explain", {"image": base64.b64encode(png).decode(), "method": "reciprocam",
                                                   "target": 4})
    assert status == 200 and r["targets"] == [4]
    assert_maps_equal(r["maps"], expected_maps(png, "reciprocam", target=4)[0], "json body")


def test_kserve_v1_explain(server):
    pngs = [scene_png(0), scene_png(1)]
    payload = {"instances": [{"b64": base64.b64encode(pngs[0]).decode()}, base64.b64encode(pngs[1]).decode()],
               "parameters": {"method": "gae"}}
    status, r = post_json(server, "/v1/models/demo:explain", payload)
    assert status == 200 and len(r["explanations"]) == 2
    for png, e in zip(pngs, r["explanations"], strict=True):
        assert_maps_equal(e["maps"], expected_maps(png, "gae")[0], "kserve")
    status, r = post_json(server, "/v1/models/other:explain", payload)
    assert status == 404 and "other" in r["error"]["message"]


def test_models_health_docs(server):
    assert get_json(server, "/healthz")["status"] == "ok"
    m = get_json(server, "/v1/models")["models"][0]
    assert m["name"] == "demo" and m["num_classes"] == 10 and m["layout"]["grid"] == [8, 8]
    assert set(METHODS) <= set(m["methods"]) and all(v["available"] for v in m["methods"].values())
    spec = get_json(server, "/openapi.json")
    assert {"/v1/explain", "/v1/models", "/healthz", "/v1/models/{name}:explain"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/explain"]["post"]["requestBody"]["content"]
    with urllib.request.urlopen(server + "/docs", timeout=10) as r:
        assert r.status == 200 and b"swagger" in r.read().lower()


BAD = [
    ("not an image", dict(image=b"this is text, not a picture"), 400, "bad_image"),
    ("empty image", dict(image=b""), 400, "missing_image"),
    ("truncated PNG", dict(image=None, truncate=True), 400, "bad_image"),
    ("unknown method", dict(method="gradcam"), 400, "unknown_method"),
    ("unknown option", dict(method="rollout", options={"nope": 1}), 400, "bad_options"),
    ("bad option value", dict(method="rollout", options={"head_fusion": "median"}), 400, "bad_options"),
    ("options not JSON", dict(method="rollout", options="{not json"), 400, "bad_options"),
    ("class out of range", dict(target="10"), 400, "class_out_of_range"),
    ("negative class", dict(target="-1"), 400, "class_out_of_range"),
    ("bad target", dict(target="best"), 400, "bad_target"),
    ("too many classes", dict(target="top11"), 400, "bad_target"),
    ("all for a one-class method", dict(method="gae", target="all"), 400, "bad_target"),
    ("bad format", dict(format="gif"), 400, "bad_format"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_4xx_and_the_service_keeps_serving(server, case):
    _, fields, status, code = case
    fields = dict(fields)
    png = fields.pop("image", scene_png(0))
    if fields.pop("truncate", False):
        png = scene_png(0)[:120]
    got, _, body = explain(server, png, **fields)
    err = json.loads(body)["error"]
    assert got == status and err["code"] == code and err["message"], body
    ok, _, _ = explain(server, scene_png(0), method="rollout")
    assert ok == 200


def test_bad_transport(server):
    from conftest import MAX_BYTES

    status, _, body = post(server, "/v1/explain", b"x" * (MAX_BYTES + 10), "application/octet-stream")
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    big, ctype = multipart({"method": "rollout"}, b"\x89PNG" + b"\0" * MAX_BYTES)
    status, _, body = post(server, "/v1/explain", big, ctype)
    assert status == 413
    status, r = post_json(server, "/v1/explain", b"{broken")
    assert status == 400 and r["error"]["code"] == "bad_json"
    status, r = post_json(server, "/v1/explain", {"method": "gae"})
    assert status == 400 and r["error"]["code"] == "missing_image"
    status, r = post_json(server, "/v1/explain", {"image": "%%% not base64"})
    assert status == 400 and r["error"]["code"] == "bad_image"
    status, _, body = post(server, "/v1/explain", b"abc", "text/plain")
    assert status == 400 and json.loads(body)["error"]["code"] == "bad_content_type"
    status, r = post_json(server, "/v1/models/demo:explain", {"instances": "nope"})
    assert status == 400
    assert get_json(server, "/healthz")["status"] == "ok"


def test_64_concurrent_requests_are_answered_correctly_and_batched(server):
    pngs = [scene_png(i) for i in range(4)]
    want = {i: expected_maps(p, "reciprocam")[0] for i, p in enumerate(pngs)}
    results, errors = [], []

    def client(k):
        for j in range(8):
            i = (k + j) % 4
            status, _, body = explain(server, pngs[i], method="reciprocam")
            (results if status == 200 else errors).append((i, status, body))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 64
    batch_sizes = []
    for i, _, body in results:
        r = json.loads(body)
        assert_maps_equal(r["maps"], want[i], f"image {i}")
        batch_sizes.append(r["timings"]["batch_size"])
    assert max(batch_sizes) > 1, f"no request was batched: {batch_sizes}"
    stats = get_json(server, "/v1/stats")["batch_sizes"]
    assert any(int(k) > 1 for k in stats)


def test_load_client_reports_batches(server):
    body, ctype = multipart({"method": "rollout"}, scene_png(0))
    r = load(server, body, ctype, clients=8, requests=32, deadline_s=60)
    assert not r.failures and len(r.latencies_ms) == 32 and r.rps > 0 and max(r.batch_sizes) >= 1
