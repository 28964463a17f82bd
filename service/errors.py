"""API errors: one exception type for every refusal, and the handlers that render {error, detail}.

Routes and dependencies raise `ApiError(status, code, detail)`. FastAPI's own errors (404 for an
unknown path, 405, request validation) get the same JSON body. Anything else that escapes a route is
a bug, not bad input: it is logged with its traceback and answered 500 `internal`, and the server
keeps serving.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("cipherbert.service")


class ApiError(Exception):
    """A refusal with an HTTP status, a machine-readable code and a reason for a human."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def not_ready(reason: str) -> ApiError:
    return ApiError(503, "not_ready", reason or "not ready", {"Retry-After": "5"})


def install_error_handlers(app: FastAPI, error_counter: Counter) -> None:
    """Render every error as {"error": code, "detail": text}, counted by code."""

    def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        error_counter.labels(code).inc()
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", errors or "invalid request")

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:  # last resort: log, stay up
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal", f"internal error ({type(exc).__name__})")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
