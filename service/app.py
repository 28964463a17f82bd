"""The cipherbert HTTP API (FastAPI, /v1): model bundles, evaluation keys, encrypted inference rounds.

See docs/service.md for the protocol, the threat model and the operator knobs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import multiprocessing
import secrets
import time
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import worker
from service.protocol import (
    FRAMES_MEDIA_TYPE, WireError, frames_digest, pack_envelope, round_token, token_matches, unpack_frames,
)
from service.settings import Settings
from service.store import InferenceRecord, KeyRecord, StoreError, open_store

log = logging.getLogger("cipherbert.service")

API_VERSION = "v1"
ROUND_TOKEN_HEADER = "X-Cipherbert-Round-Token"


# ------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. bad_ciphertext, unknown_key, rate_limited")
    detail: str = Field(description="what was wrong, for a human")


class ModelSummary(BaseModel):
    model_id: str
    model_hash: str
    max_tokens: int
    num_labels: int | None = None
    labels: list[str] | None = None


class ModelList(BaseModel):
    models: list[ModelSummary]


class KeyInfo(BaseModel):
    key_id: str
    model_id: str
    created_at: float
    expires_at: float
    size: int
    sha256: str


class KeyList(BaseModel):
    keys: list[KeyInfo]


class Health(BaseModel):
    status: str
    replica: str
    models: list[str] = []
    detail: str | None = None


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)}

# Bodies are CBF1 frame sets; the server also accepts Content-Type application/vnd.cipherbert.frames.
FRAMES_BODY = {
    "required": True,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
ENVELOPE_RESPONSE = {
    200: {"description": "CBF1 frame set: frame 0 is a JSON header {inference_id, round, done, kind, meta, "
                         "round_token, ...}; frames 1.. are ciphertexts (a refresh round or the encrypted logits)",
          "content": {FRAMES_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    **ERRORS,
}


# ------------------------------------------------------------------------------------------ metrics

class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cipherbert_http_requests_total", "HTTP requests", ["route", "method", "status"],
                                registry=r)
        self.latency = Histogram("cipherbert_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=(.005, .01, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.rounds = Counter("cipherbert_rounds_total", "engine steps served (start + every round)",
                              ["model", "kind"], registry=r)
        self.inferences = Counter("cipherbert_inferences_total", "inferences by outcome",
                                  ["model", "outcome"], registry=r)
        self.bytes = Counter("cipherbert_bytes_total", "ciphertext/context bytes", ["direction", "what"],
                             registry=r)
        self.errors = Counter("cipherbert_errors_total", "error responses by code", ["code"], registry=r)
        self.engine = Histogram("cipherbert_engine_seconds", "time in the engine pool", ["op"],
                                buckets=(.01, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32, 64), registry=r)
        self.inflight = Gauge("cipherbert_inflight", "engine jobs queued or running", registry=r)
        self.ctx_loads = Counter("cipherbert_context_loads_total", "evaluation contexts loaded by workers",
                                 registry=r)


# --------------------------------------------------------------------------------------------- state

class Service:
    """Everything one API process holds: settings, store, pool, model descriptions, limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.finalize()
        self.token_key = self.settings.subkey("round-token")
        self.store = open_store(self.settings.store_config())
        self.metrics = Metrics()
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.models: dict[str, dict] = {}
        self.model_errors: dict[str, str] = {}
        self.ready = False
        self.not_ready_reason = "starting: engine workers are loading the models"
        self.inflight = 0
        self.tenant_inflight: dict[str, int] = {}
        self._startup: asyncio.Task | None = None

    # pool -------------------------------------------------------------------------------------
    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.settings.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init, initargs=(self.settings.worker_config(),))

    async def start(self) -> None:
        self.pool = self._new_pool()
        self._startup = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            # Ready only when every engine process has loaded the models: ping until each has answered.
            pids: set[int] = set()
            deadline = time.time() + 1800
            while len(pids) < self.settings.workers and time.time() < deadline:
                pids |= set(await asyncio.gather(*(loop.run_in_executor(self.pool, worker.ping)
                                                   for _ in range(self.settings.workers))))
            info = await loop.run_in_executor(self.pool, worker.describe)
            models = {}
            for model_id, desc in info["models"].items():
                files = []
                for name, path in sorted(desc["files"].items()):
                    data = Path(path).read_bytes()
                    files.append({"name": name, "path": path, "bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()})
                desc["file_list"] = files
                models[model_id] = desc
            self.models, self.model_errors = models, info["errors"]
            if not models:
                self.not_ready_reason = "no model loaded" + (
                    f": {self.model_errors}" if self.model_errors else
                    f" (no model directory with config.json under {self.settings.models_dir})")
                log.error(self.not_ready_reason)
                return
            self.ready = True
            self.not_ready_reason = ""
            log.info("ready: models %s, %d engine workers", sorted(models), self.settings.workers)
        except Exception as exc:  # keep serving /healthz and say why in /readyz
            self.not_ready_reason = f"engine workers failed to start: {type(exc).__name__}: {exc}"
            log.exception("engine workers failed to start")

    async def stop(self) -> None:
        if self._startup is not None:
            self._startup.cancel()
        if self.pool is not None:
            _stop_pool(self.pool)
            self.pool = None
        self.store.close()

    async def run_engine(self, tenant: str, op: str, fn, *args) -> dict:
        """Run fn(*args) in the pool under the concurrency limits; map failures to ApiError."""
        if not self.ready:
            raise ApiError(503, "not_ready", self.not_ready_reason or "not ready", {"Retry-After": "5"})
        if self.inflight >= self.settings.max_inflight:
            # Saturation is back-pressure, not a server failure: 429 + Retry-After (503 is kept for
            # "not ready", a restarting pool and an unavailable store).
            raise ApiError(429, "busy", f"all {self.settings.max_inflight} engine slots of this replica are "
                           "busy; retry later", {"Retry-After": "1"})
        if self.tenant_inflight.get(tenant, 0) >= self.settings.tenant_inflight:
            raise ApiError(429, "tenant_busy", f"tenant already has {self.settings.tenant_inflight} engine jobs "
                           "in flight on this replica; retry later", {"Retry-After": "1"})
        self.inflight += 1
        self.tenant_inflight[tenant] = self.tenant_inflight.get(tenant, 0) + 1
        self.metrics.inflight.set(self.inflight)
        t0 = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, fn, *args)
        except BrokenProcessPool:
            log.error("engine pool broke during %s; restarting it", op)
            self._restart_pool()
            raise ApiError(503, "engine_restarting", "an engine worker died; the pool is restarting, retry",
                           {"Retry-After": "5"}) from None
        except worker.UnknownKey as exc:
            raise ApiError(404, "unknown_key", str(exc)) from None
        except (ValueError, TypeError, RuntimeError, LookupError) as exc:
            # EngineError and WireError are ValueErrors: bad client data. SEAL's own checks surface as
            # ValueError/RuntimeError from tenseal; all say what was wrong with the input.
            raise ApiError(400, "rejected_by_engine", f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            log.exception("engine %s failed", op)
            raise ApiError(503, "engine_failure", f"engine failure ({type(exc).__name__}); retry later",
                           {"Retry-After": "5"}) from None
        finally:
            self.inflight -= 1
            self.tenant_inflight[tenant] -= 1
            if not self.tenant_inflight[tenant]:
                del self.tenant_inflight[tenant]
            self.metrics.inflight.set(self.inflight)
            self.metrics.engine.labels(op).observe(time.perf_counter() - t0)

    def _restart_pool(self) -> None:
        old = self.pool
        self.ready = False
        self.not_ready_reason = "restarting the engine pool"
        self.pool = self._new_pool()
        loop = asyncio.get_running_loop()
        if old is not None:  # off the event loop: joining processes may take seconds
            loop.run_in_executor(None, _stop_pool, old)
        self._startup = loop.create_task(self._warm_up())

    # store (blocking calls off the event loop) -------------------------------------------------
    async def db(self, fn, *args):
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreError as exc:
            log.error("store failure: %s", exc)
            raise ApiError(503, "store_unavailable", "the key/state store is unavailable; retry later",
                           {"Retry-After": "2"}) from None

    async def rate_limit(self, tenant: str, what: str) -> None:
        limit, window = self.settings.rate_limit
        if limit <= 0:
            return
        current, previous, now = await self.db(self.store.hit, f"{tenant}", window)
        # Sliding-window estimate: the previous window weighs by how much of it still overlaps the
        # last `window` seconds, so a burst across a window boundary is not counted twice as allowed.
        frac = (now % window) / window
        estimate = previous * (1.0 - frac) + current
        if estimate > limit:
            await self.db(self.store.unhit, f"{tenant}", window, now)  # a refusal uses no allowance
            if current > limit or previous <= 0:
                retry = window - (now % window)
            else:  # until the previous window's weight has decayed enough
                retry = min(window - (now % window), (estimate - limit) / previous * window)
            raise ApiError(429, "rate_limited", f"tenant rate limit of {limit} requests per {window}s reached "
                           f"({what})", {"Retry-After": str(max(1, int(retry + 0.999)))})

    def model(self, model_id: str) -> dict:
        if not self.ready:
            raise ApiError(503, "not_ready", self.not_ready_reason or "not ready", {"Retry-After": "5"})
        desc = self.models.get(model_id)
        if desc is None:
            raise ApiError(404, "unknown_model", f"no model {model_id!r}; available: {sorted(self.models)}")
        return desc


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor, timeout: float = 5.0) -> None:
    """Stop the engine processes now: a job in flight is abandoned (its round stays answerable)."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.time() + timeout
    for proc in processes:
        proc.join(max(0.0, deadline - time.time()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


# ------------------------------------------------------------------------------------------ helpers

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def get_service(request: Request) -> Service:
    return request.app.state.service


async def tenant_of(request: Request,
                    creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
    svc: Service = request.app.state.service
    if creds is None or not creds.credentials:
        raise ApiError(401, "unauthorized", "missing bearer API key (Authorization: Bearer <key>)",
                       {"WWW-Authenticate": "Bearer"})
    tenant = svc.settings.api_keys.get(creds.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key", {"WWW-Authenticate": "Bearer"})
    request.state.tenant = tenant
    return tenant


async def read_body(request: Request, limit: int, what: str) -> bytes:
    raw = request.headers.get("content-length")
    if raw is not None:
        if not raw.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        if int(raw) > limit:
            raise ApiError(413, "too_large", f"{what} of {raw} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"{what} exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse it
    return body


async def binary_input(request: Request, limit: int, what: str, file_field: str) -> tuple[bytes, dict]:
    """The uploaded bytes plus any multipart text fields; raw octet-stream or multipart/form-data."""
    body = await read_body(request, limit, what)
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=2, max_fields=16, max_part_size=limit)
        except Exception as exc:
            raise ApiError(400, "bad_multipart", f"could not parse multipart body: {exc}") from None
        fields, data = {}, None
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            elif name == file_field:
                data = await value.read()
        if data is None:
            raise ApiError(400, "missing_field", f"multipart body has no file field {file_field!r}")
        return data, fields
    if ctype in ("application/octet-stream", FRAMES_MEDIA_TYPE, ""):
        return body, {}
    raise ApiError(415, "unsupported_media_type",
                   f"send {what} as application/octet-stream or multipart/form-data, not {ctype!r}")


def param(request: Request, fields: dict, name: str, required: bool = True) -> str | None:
    value = request.query_params.get(name, fields.get(name))
    if required and (value is None or value == ""):
        raise ApiError(422, "missing_parameter", f"parameter {name!r} is required (query or multipart field)")
    return value


def unpack(svc: Service, data: bytes) -> list[bytes]:
    try:
        frames = unpack_frames(data, max_frames=svc.settings.max_frames, max_bytes=svc.settings.max_frames_bytes)
    except WireError as exc:
        raise ApiError(400, "bad_frames", f"malformed ciphertext frames: {exc}") from None
    except ValueError as exc:
        raise ApiError(400, "bad_frames", f"malformed ciphertext frames: {exc}") from None
    if not frames:
        raise ApiError(400, "bad_frames", "no ciphertext frames in the body")
    return frames


async def key_for(svc: Service, tenant: str, key_id: str) -> KeyRecord:
    rec = await svc.db(svc.store.get_key, key_id)
    if rec is None or rec.tenant != tenant:  # a foreign key id looks exactly like a missing one
        raise ApiError(404, "unknown_key", f"key id {key_id!r} is unknown, expired or not yours")
    return rec


def envelope_response(svc: Service, tenant: str, key_id: str, model_id: str, out: dict,
                      round_tok: str | None) -> Response:
    header = {"inference_id": out["inference_id"], "round": out["round"], "done": out["done"],
              "kind": out["kind"], "meta": out["meta"], "round_token": round_tok, "model_id": model_id,
              "key_id": key_id, "server_s": round(out["seconds"], 6), "replica": svc.settings.replica_id}
    body = pack_envelope(header, out["to_client"])
    svc.metrics.bytes.labels("out", "ciphertext").inc(len(body))
    headers = {"X-Cipherbert-Inference": out["inference_id"], "X-Cipherbert-Round": str(out["round"]),
               "X-Cipherbert-Done": "true" if out["done"] else "false",
               "X-Cipherbert-Server-Seconds": f"{out['seconds']:.6f}", "Cache-Control": "no-store"}
    if round_tok:
        headers[ROUND_TOKEN_HEADER] = round_tok
    return Response(body, media_type=FRAMES_MEDIA_TYPE, headers=headers)


async def record_step(svc: Service, tenant: str, key_id: str, model_id: str, out: dict,
                      created_at: float) -> str | None:
    """Store the engine's state for the next round (or a tombstone when done); return the round token."""
    digest = frames_digest(out["to_client"])
    now = time.time()
    rec = InferenceRecord(out["inference_id"], tenant, key_id, model_id, out["round"], digest, out["done"],
                          created_at, now + svc.settings.inference_ttl_s)
    await svc.db(svc.store.put_state, rec, None if out["done"] else out["state"])
    svc.metrics.rounds.labels(model_id, out["kind"]).inc()
    if out.get("ctx_loaded"):
        svc.metrics.ctx_loads.inc()
    if out["done"]:
        svc.metrics.inferences.labels(model_id, "done").inc()
        return None
    return round_token(svc.token_key, tenant, key_id, out["inference_id"], out["round"], digest)


# ---------------------------------------------------------------------------------------------- app

def create_app(settings: Settings | None = None) -> FastAPI:
    svc = Service(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="cipherbert", version="0.1.0", lifespan=lifespan,
        description="Encrypted text classification: CKKS ciphertexts in, encrypted logits out. "
                    "The server never holds a secret key. See docs/service.md.",
    )
    app.state.service = svc
    m = svc.metrics

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        m.requests.labels(path, request.method, str(response.status_code)).inc()
        m.latency.labels(path).observe(time.perf_counter() - t0)
        response.headers["X-Cipherbert-Replica"] = svc.settings.replica_id
        return response

    def error_response(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
        m.errors.labels(code).inc()
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        errors = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", errors or "invalid request")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):  # last resort: log, stay up
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", f"internal error ({type(exc).__name__})")

    # health ---------------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz():
        return Health(status="ok", replica=svc.settings.replica_id, models=sorted(svc.models))

    @app.get("/readyz", response_model=Health, tags=["ops"], responses={503: {"model": Health}})
    async def readyz():
        detail = None
        if svc.ready:
            try:
                await asyncio.to_thread(svc.store.ping)
            except Exception as exc:
                detail = f"store unavailable: {exc}"
        else:
            detail = svc.not_ready_reason or "not ready"
        status = 200 if detail is None else 503
        body = Health(status="ready" if status == 200 else "not_ready", replica=svc.settings.replica_id,
                      models=sorted(svc.models), detail=detail)
        return JSONResponse(body.model_dump(), status_code=status)

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    # models ---------------------------------------------------------------------------------
    v1 = f"/{API_VERSION}"

    def summary(model_id: str, desc: dict) -> ModelSummary:
        b = desc["bundle"]
        return ModelSummary(model_id=model_id, model_hash=desc["model_hash"], max_tokens=desc["max_tokens"],
                            num_labels=b.get("num_labels"), labels=[str(x) for x in b.get("labels", [])] or None)

    @app.get(f"{v1}/models", response_model=ModelList, tags=["models"], responses=ERRORS)
    async def list_models(tenant: str = Depends(tenant_of)):
        if not svc.ready:
            raise ApiError(503, "not_ready", svc.not_ready_reason or "not ready", {"Retry-After": "5"})
        return ModelList(models=[summary(k, v) for k, v in sorted(svc.models.items())])

    @app.get(f"{v1}/models/{{model_id}}/bundle", tags=["models"], responses=ERRORS)
    async def model_bundle(model_id: str, request: Request, tenant: str = Depends(tenant_of)) -> dict[str, Any]:
        desc = svc.model(model_id)
        bundle = dict(desc["bundle"])
        bundle["files"] = [{"name": f["name"], "bytes": f["bytes"], "sha256": f["sha256"],
                            "url": f"{v1}/models/{model_id}/bundle/files/{f['name']}"} for f in desc["file_list"]]
        return bundle

    @app.get(f"{v1}/models/{{model_id}}/bundle/files/{{name}}", tags=["models"], response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS})
    async def model_bundle_file(model_id: str, name: str, tenant: str = Depends(tenant_of)):
        desc = svc.model(model_id)
        for f in desc["file_list"]:
            if f["name"] == name:
                return FileResponse(f["path"], media_type="application/octet-stream", filename=name)
        raise ApiError(404, "unknown_file", f"model {model_id!r} has no bundle file {name!r}")

    # keys -----------------------------------------------------------------------------------
    def key_info(rec: KeyRecord) -> KeyInfo:
        return KeyInfo(key_id=rec.key_id, model_id=rec.model_id, created_at=rec.created_at,
                       expires_at=rec.expires_at, size=rec.size, sha256=rec.sha256)

    @app.post(f"{v1}/keys", status_code=201, response_model=KeyInfo, tags=["keys"], responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                  "multipart/form-data": {"schema": {"type": "object", "required": ["context"], "properties": {
                      "context": {"type": "string", "format": "binary"}, "model": {"type": "string"}}}}}}})
    async def register_key(request: Request, model: str | None = Query(None, description="model id"),
                           tenant: str = Depends(tenant_of)):
        """Register a public CKKS context (relinearization + the model's Galois keys, no secret key)."""
        await svc.rate_limit(tenant, "key registration")
        blob, fields = await binary_input(request, svc.settings.max_key_bytes, "public context", "context")
        model_id = param(request, fields, "model")
        svc.model(model_id)
        if not blob:
            raise ApiError(400, "empty_context", "the uploaded public context is empty")
        m.bytes.labels("in", "context").inc(len(blob))
        key_id = "k_" + secrets.token_urlsafe(18)
        await svc.run_engine(tenant, "load_context", worker.validate_key, model_id, key_id, blob)
        now = time.time()
        rec = KeyRecord(key_id, tenant, model_id, now, now + svc.settings.key_ttl_s, len(blob),
                        hashlib.sha256(blob).hexdigest())
        await svc.db(svc.store.put_key, rec, blob)
        return JSONResponse(key_info(rec).model_dump(), status_code=201)

    @app.get(f"{v1}/keys", response_model=KeyList, tags=["keys"], responses=ERRORS)
    async def list_keys(tenant: str = Depends(tenant_of)):
        return KeyList(keys=[key_info(r) for r in await svc.db(svc.store.list_keys, tenant)])

    @app.get(f"{v1}/keys/{{key_id}}", response_model=KeyInfo, tags=["keys"], responses=ERRORS)
    async def get_key(key_id: str, tenant: str = Depends(tenant_of)):
        return key_info(await key_for(svc, tenant, key_id))

    @app.delete(f"{v1}/keys/{{key_id}}", status_code=204, tags=["keys"], responses=ERRORS)
    async def delete_key(key_id: str, tenant: str = Depends(tenant_of)):
        await key_for(svc, tenant, key_id)
        await svc.db(svc.store.delete_key, key_id)
        return Response(status_code=204)

    # inferences -------------------------------------------------------------------------------
    @app.post(f"{v1}/inferences", tags=["inference"], response_class=Response, responses=ENVELOPE_RESPONSE,
              openapi_extra={"requestBody": {"required": True, "content": {
                  **FRAMES_BODY["content"],
                  "multipart/form-data": {"schema": {"type": "object", "required": ["frames"], "properties": {
                      "frames": {"type": "string", "format": "binary"}, "model": {"type": "string"},
                      "key_id": {"type": "string"}, "n_tokens": {"type": "integer"}}}}}}})
    async def start_inference(request: Request,
                              model: str | None = Query(None, description="model id"),
                              key_id: str | None = Query(None, description="registered key id"),
                              n_tokens: int | None = Query(None, ge=1, description="sentence length in tokens"),
                              tenant: str = Depends(tenant_of)):
        """Start an encrypted inference: the body is a CBF1 frame set of the encrypted embeddings."""
        await svc.rate_limit(tenant, "inference")
        data, fields = await binary_input(request, svc.settings.max_frames_bytes, "ciphertext upload", "frames")
        model_id = param(request, fields, "model")
        kid = param(request, fields, "key_id")
        raw_n = param(request, fields, "n_tokens")
        try:
            n = int(raw_n)
        except ValueError:
            raise ApiError(422, "invalid_request", f"n_tokens must be an integer, got {raw_n!r}") from None
        desc = svc.model(model_id)
        if not 1 <= n <= desc["max_tokens"]:
            raise ApiError(422, "invalid_request", f"n_tokens must be in 1..{desc['max_tokens']}, got {n}")
        rec = await key_for(svc, tenant, kid)
        if rec.model_id != model_id:
            raise ApiError(400, "wrong_model", f"key {kid!r} was registered for model {rec.model_id!r}, "
                                               f"not {model_id!r}")
        frames = unpack(svc, data)
        m.bytes.labels("in", "ciphertext").inc(len(data))
        inference_id = "i_" + secrets.token_urlsafe(18)
        created = time.time()
        out = await svc.run_engine(tenant, "start", worker.start, model_id, kid, inference_id, n, frames)
        if out["inference_id"] != inference_id:
            raise ApiError(503, "engine_failure", "engine answered for another inference")
        tok = await record_step(svc, tenant, kid, model_id, out, created)
        return envelope_response(svc, tenant, kid, model_id, out, tok)

    @app.post(f"{v1}/inferences/{{inference_id}}/rounds/{{round}}", tags=["inference"], response_class=Response,
              responses=ENVELOPE_RESPONSE, openapi_extra={"requestBody": FRAMES_BODY})
    async def answer_round(inference_id: str, round: int, request: Request,
                           token: str | None = Query(None, description=f"round token (or {ROUND_TOKEN_HEADER})"),
                           tenant: str = Depends(tenant_of)):
        """Send the client's reply to a refresh round; the response is the next round or the logits."""
        tok = request.headers.get(ROUND_TOKEN_HEADER) or token
        if not tok:
            raise ApiError(400, "missing_round_token", f"send the round token in {ROUND_TOKEN_HEADER}")
        data, _ = await binary_input(request, svc.settings.max_frames_bytes, "ciphertext upload", "frames")
        rec = await svc.db(svc.store.peek_state, inference_id)
        if rec is None or rec.tenant != tenant:
            raise ApiError(404, "unknown_inference", f"inference {inference_id!r} is unknown, expired or not yours")
        if rec.done:
            raise ApiError(409, "inference_finished", f"inference {inference_id!r} already returned its logits")
        if rec.round != round:
            raise ApiError(409, "wrong_round", f"inference {inference_id!r} waits for round {rec.round}, "
                                               f"not {round} (a round is answered once)")
        expected = round_token(svc.token_key, tenant, rec.key_id, inference_id, round, rec.digest)
        if not token_matches(expected, tok):
            m.errors.labels("bad_round_token").inc()
            raise ApiError(403, "bad_round_token", "the round token does not match this inference and round")
        await key_for(svc, tenant, rec.key_id)
        frames = unpack(svc, data)
        m.bytes.labels("in", "ciphertext").inc(len(data))
        # Claim capacity before taking the state, so a 503 leaves the round answerable.
        if not svc.ready:
            raise ApiError(503, "not_ready", svc.not_ready_reason or "not ready", {"Retry-After": "5"})
        if svc.inflight >= svc.settings.max_inflight or \
                svc.tenant_inflight.get(tenant, 0) >= svc.settings.tenant_inflight:
            raise ApiError(429, "busy", "engine slots are busy; retry this round later", {"Retry-After": "1"})
        state = await svc.db(svc.store.take_state, inference_id, round, rec.digest)
        if state is None:
            raise ApiError(409, "wrong_round", f"round {round} of {inference_id!r} was already answered")
        try:
            out = await svc.run_engine(tenant, "resume", worker.resume, rec.model_id, rec.key_id, state, frames,
                                      inference_id, round)
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 429:  # not the client's fault: keep the round open
                await svc.db(svc.store.put_state, rec, state)
            else:
                m.inferences.labels(rec.model_id, "rejected").inc()
            raise
        if out["inference_id"] != inference_id:
            raise ApiError(400, "mixed_round", "the state and the reply belong to different inferences")
        tok_next = await record_step(svc, tenant, rec.key_id, rec.model_id, out, rec.created_at)
        return envelope_response(svc, tenant, rec.key_id, rec.model_id, out, tok_next)

    @app.delete(f"{v1}/inferences/{{inference_id}}", status_code=204, tags=["inference"], responses=ERRORS)
    async def abort_inference(inference_id: str, tenant: str = Depends(tenant_of)):
        rec = await svc.db(svc.store.peek_state, inference_id)
        if rec is None or rec.tenant != tenant:
            raise ApiError(404, "unknown_inference", f"inference {inference_id!r} is unknown, expired or not yours")
        await svc.db(svc.store.delete_state, inference_id)
        return Response(status_code=204)

    return app


def app_from_env() -> FastAPI:
    """uvicorn factory: `uvicorn --factory service.app:app_from_env`."""
    return create_app(Settings())
