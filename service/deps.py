"""Shared route dependencies: the service object, the caller's tenant, readiness and engine capacity.

They nest, so each check is written once and runs in a fixed order: authentication (401) first, then
readiness (503 not_ready), then engine capacity (429 busy / tenant_busy), before a route reads its body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import ApiError
from service.pool import Service

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def tenant_of(
    request: Request, svc: ServiceDep, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """The tenant that owns the bearer API key (401 without a known key)."""
    if creds is None or not creds.credentials:
        raise ApiError(
            401, "unauthorized", "missing bearer API key (Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"}
        )
    tenant = svc.settings.api_keys.get(creds.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key", {"WWW-Authenticate": "Bearer"})
    request.state.tenant = tenant
    return tenant


Tenant = Annotated[str, Depends(tenant_of)]


async def ready_tenant(tenant: Tenant, svc: ServiceDep) -> str:
    """The tenant, once the engine workers serve the models (503 not_ready before)."""
    svc.require_ready()
    return tenant


ReadyTenant = Annotated[str, Depends(ready_tenant)]


async def engine_tenant(tenant: ReadyTenant, svc: ServiceDep) -> str:
    """The tenant, when an engine slot is free for it (429 otherwise, before any upload is read)."""
    svc.check_capacity(tenant)
    return tenant


EngineTenant = Annotated[str, Depends(engine_tenant)]
