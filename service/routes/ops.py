"""Operations: liveness, readiness (engine workers loaded and the store reachable), Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ServiceDep
from service.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz(svc: ServiceDep) -> Health:
    return Health(status="ok", replica=svc.settings.replica_id, models=sorted(svc.models))


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(svc: ServiceDep) -> JSONResponse:
    detail = None
    if svc.ready:
        try:
            await asyncio.to_thread(svc.store.ping)
        except Exception as exc:
            detail = f"store unavailable: {exc}"
    else:
        detail = svc.not_ready_reason or "not ready"
    status = 200 if detail is None else 503
    body = Health(
        status="ready" if status == 200 else "not_ready",
        replica=svc.settings.replica_id,
        models=sorted(svc.models),
        detail=detail,
    )
    return JSONResponse(body.model_dump(), status_code=status)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(svc: ServiceDep) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
