"""The cipherbert HTTP API (FastAPI, /v1): model bundles, evaluation keys, encrypted inference rounds.

`create_app` wires the parts: a `Service` (service.pool) holds the state of the process, routers per
resource (service.routes) answer requests through shared dependencies (service.deps), and
service.errors renders every refusal as {error, detail}. See docs/service.md for the protocol, the
threat model and the operator knobs (service.settings).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service.errors import ApiError, install_error_handlers
from service.pool import Service
from service.routes import API_PREFIX, API_VERSION, inferences, keys, models, ops, ui
from service.routes.inferences import ROUND_TOKEN_HEADER
from service.settings import Settings

__all__ = ["API_VERSION", "ROUND_TOKEN_HEADER", "ApiError", "Service", "app_from_env", "create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    svc = Service(settings or Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = FastAPI(
        title="cipherbert",
        version="0.1.0",
        lifespan=lifespan,
        description="Encrypted text classification: CKKS ciphertexts in, encrypted logits out. "
        "The server never holds a secret key. See docs/service.md.",
    )
    app.state.service = svc
    app.middleware("http")(_observer(svc))
    install_error_handlers(app, svc.metrics.errors)
    app.include_router(ops.router)
    app.include_router(ui.router)
    for router in (models.router, keys.router, inferences.router):
        app.include_router(router, prefix=API_PREFIX)
    return app


def _observer(svc: Service) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """Middleware: request count and latency per route template, and the replica header."""

    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        path = getattr(request.scope.get("route"), "path", "unmatched")
        svc.metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        svc.metrics.latency.labels(path).observe(time.perf_counter() - t0)
        response.headers["X-Cipherbert-Replica"] = svc.settings.replica_id
        return response

    return observe


def app_from_env() -> FastAPI:
    """uvicorn factory: `uvicorn --factory service.app:app_from_env`."""
    return create_app(Settings())
