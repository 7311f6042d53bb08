"""The HTTP application: a FastAPI app served by one Ray Serve deployment with `@serve.batch` dynamic batching.

Routes (OpenAPI schema at /openapi.json, interactive docs at /docs):
    GET  /                               the web page (upload an image, pick methods and a class, see the overlays)
    GET  /healthz                        liveness
    GET  /v1/models                      the model, its token layout, the methods with their refusal reasons
    POST /v1/explain                     multipart (field `image` + form fields) or JSON {"image": "<base64>", ...}
    POST /v1/models/{name}:explain       KServe V1: {"instances": [...], "parameters": {...}} -> {"explanations": [...]}
    GET  /v1/stats                       batch sizes the replica has run (proves dynamic batching)

Every request is validated before it reaches the model; a bad one gets a 4xx JSON error naming the problem and the
service keeps serving.
"""

import asyncio
import base64
import binascii
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve

from vitx_fast import __version__
from vitx_fast.serve.core import FORMATS, ApiError, ServeConfig, ServingModel, to_json, to_npy

STATIC = Path(__file__).with_name("static")

app = FastAPI(title="vitx-fast explanation service", version=__version__,
              description="Explanations of a Vision Transformer's predictions at request time, dynamically batched.")


class ExplainJSON(BaseModel):
    """The JSON form of POST /v1/explain (the multipart form has the same fields, with `image` a file)."""

    image: str = Field(description="the image file's bytes, base64-encoded (PNG, JPEG, WebP, ...)")
    method: str = Field("reciprocam", description="an explanation method, see GET /v1/models")
    target: Any = Field(None, description="top1 (default), topK (e.g. top5), all, a class index, or a list of them")
    options: dict = Field(default_factory=dict, description="the method's options, e.g. {\"head_fusion\": \"max\"}")
    format: str = Field("json", description=f"one of {FORMATS}: maps as nested lists, a .npy array, or a PNG overlay")


class Prediction(BaseModel):
    class_: int = Field(alias="class")
    label: str
    probability: float


class ExplainResponse(BaseModel):
    model: str
    model_id: str
    method: str
    options: dict
    target_spec: str
    predictions: list[Prediction] = Field(description="top-5 classes with probabilities")
    targets: list[int] = Field(description="the explained classes, one map each")
    scores: list[dict] = Field(description="per target: target, rank, logit, probability")
    grid: list[int] = Field(description="(h, w) of each map: the patch grid")
    maps: list[list[list[float]]] = Field(description="(K, h, w) raw maps at patch-grid size")
    timings: dict = Field(description="decode_ms, explain_ms, total_ms and the batch_size the request ran in")


class KServeRequest(BaseModel):
    instances: list[Any] = Field(description='images: "<base64>" or {"b64": "<base64>"} or {"image": {"b64": ...}}')
    parameters: dict = Field(default_factory=dict, description="method, target, options (as /v1/explain)")


ERRORS = {400: {"description": "bad request (image, method, option, target)"},
          413: {"description": "payload too large"}, 422: {"description": "the method cannot explain this model"}}
MULTIPART = {"multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
    "image": {"type": "string", "format": "binary"}, "method": {"type": "string", "default": "reciprocam"},
    "target": {"type": "string", "default": "top1"}, "options": {"type": "string", "description": "JSON object"},
    "format": {"type": "string", "enum": list(FORMATS), "default": "json"}}}},
    "application/json": {"schema": ExplainJSON.model_json_schema()}}


def _b64(value) -> bytes:
    """An image given as base64 text: "<b64>", "data:image/png;base64,<b64>", {"b64": ...} or {"image": {"b64": ...}}
    (KServe's forms)."""
    while isinstance(value, dict):
        value = value.get("b64", value.get("image"))
    if not isinstance(value, str):
        raise ApiError(400, "bad_image", "image must be a base64 string")
    try:
        return base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_image", "image is not valid base64") from None


@serve.deployment
@serve.ingress(app)
class ExplanationService:
    """One replica: the model, request validation, and the batched explainer."""

    def __init__(self, config: dict):
        self.config = ServeConfig(**config)
        self.model = ServingModel(self.config)
        self.explain_batch.set_max_batch_size(self.config.max_batch_size)
        self.explain_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def explain_batch(self, items: list) -> list:
        # in the event loop by default: on a small CPU the thread hop and GIL hand-offs cost more than they overlap
        # (measured: 174 vs 129 requests/s at 32 clients on the demo model); offload=True keeps the loop responsive
        if self.config.offload:
            return await asyncio.to_thread(self.model.explain_batch, items)
        return self.model.explain_batch(items)

    async def _read(self, request: Request) -> bytes:
        limit = self.config.max_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, "payload_too_large", f"the request has {int(length)} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "payload_too_large", f"the request exceeds the limit of {limit} bytes")
        request._body = bytes(body)  # starlette re-reads the cached body for .form() / .json()
        return request._body

    async def _run(self, data, method, target, options, fmt) -> tuple:
        if self.config.offload:
            item = await asyncio.to_thread(self.model.prepare, data, method, target, options, fmt)
        else:
            item = self.model.prepare(data, method, target, options, fmt)
        result = await self.explain_batch(item)
        if isinstance(result, ApiError):
            raise result
        return item, result

    @app.get("/", include_in_schema=False)
    async def page(self):
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return JSONResponse(ApiError(404, "not_found", f"no static file {name!r}").body(), status_code=404)
        return FileResponse(path)

    @app.get("/healthz", summary="liveness")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.config.model}

    @app.get("/v1/models", summary="the model, its layout and its methods (with the reasons a method is refused)")
    async def models(self) -> dict:
        return {"models": [self.model.describe()]}

    @app.get("/v1/stats", summary="how many batches of each size this replica has run")
    async def stats(self) -> dict:
        sizes = dict(sorted(self.model.batch_sizes.items()))
        return {"batch_sizes": {str(k): v for k, v in sizes.items()}, "max_batch_size": self.config.max_batch_size}

    @app.post("/v1/explain", summary="explain one image", response_model=None,
              responses={200: {"model": ExplainResponse}, **ERRORS}, openapi_extra={"requestBody": {
                  "required": True, "content": MULTIPART}})
    async def explain(self, request: Request):
        try:
            await self._read(request)
            fields = await self._fields(request)
            item, result = await self._run(**fields)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        if item.fmt == "npy":
            headers = {"X-Targets": ",".join(map(str, result["targets"])), "X-Method": item.method}
            return Response(to_npy(result), media_type="application/octet-stream", headers=headers)
        if item.fmt == "png":
            png = await asyncio.to_thread(self.model.overlay_png, item, result)
            return Response(png, media_type="image/png")
        return JSONResponse(to_json(result))

    async def _fields(self, request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            try:
                body = json.loads(request._body or b"{}")
            except json.JSONDecodeError as exc:
                raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
            if not isinstance(body, dict) or "image" not in body:
                raise ApiError(400, "missing_image", 'a JSON request needs {"image": "<base64>", ...}')
            data = _b64(body["image"])
            return {"data": data, "method": body.get("method"), "target": body.get("target"),
                    "options": body.get("options"), "fmt": body.get("format")}
        if not ctype.startswith("multipart/form-data"):
            raise ApiError(400, "bad_content_type", "send multipart/form-data with a field `image`, or "
                                                    "application/json with a base64 `image`")
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_image", "the multipart form has no file field `image`")
        return {"data": await upload.read(), "method": form.get("method"), "target": form.get("target"),
                "options": form.get("options"), "fmt": form.get("format")}

    @app.post("/v1/models/{name}:explain", summary="KServe V1 explain", response_model=None,
              responses=ERRORS)
    async def kserve_explain(self, name: str, request: Request):
        try:
            await self._read(request)
            if name != self.config.model:
                raise ApiError(404, "unknown_model", f"no model {name!r}; this service serves {self.config.model!r}")
            try:
                body = KServeRequest.model_validate_json(request._body or b"{}")
            except ValueError as exc:
                raise ApiError(400, "bad_json", f'expected {{"instances": [...]}}: {str(exc).splitlines()[0]}') \
                    from None
            p = body.parameters
            runs = [self._run(_b64(inst), p.get("method"), p.get("target"), p.get("options"), "json")
                    for inst in body.instances]
            results = await asyncio.gather(*runs, return_exceptions=True)
            for r in results:
                if isinstance(r, ApiError):
                    raise r
                if isinstance(r, BaseException):
                    raise r
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return JSONResponse({"explanations": [to_json(res) for _, res in results]})


def build(config: ServeConfig, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The Ray Serve application for `config`."""
    from dataclasses import asdict

    options = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    # a replica must hold several batches of requests at once (Serve's default allows only a few in flight, and a
    # full replica makes the proxy back off and retry); the same bound with batching on or off
    ongoing = max(64, 4 * config.max_batch_size)
    return ExplanationService.options(num_replicas=replicas, ray_actor_options=options,
                                      max_ongoing_requests=ongoing).bind(asdict(config))
