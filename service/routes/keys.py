"""Evaluation keys: a tenant registers the public CKKS context of a key pair it generated locally."""

from __future__ import annotations

import hashlib
import secrets
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from service import worker
from service.contracts import KeyRecord
from service.deps import EngineTenant, ServiceDep, Tenant
from service.errors import ApiError
from service.pool import Service
from service.schemas import ERRORS, KeyInfo, KeyList
from service.uploads import binary_input, param

router = APIRouter(prefix="/keys", tags=["keys"])

KEY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["context"],
                    "properties": {"context": {"type": "string", "format": "binary"}, "model": {"type": "string"}},
                }
            },
        },
    }
}


def key_info(rec: KeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=rec.key_id,
        model_id=rec.model_id,
        created_at=rec.created_at,
        expires_at=rec.expires_at,
        size=rec.size,
        sha256=rec.sha256,
    )


async def key_for(svc: Service, tenant: str, key_id: str) -> KeyRecord:
    """The tenant's live key (404 unknown_key: a foreign key id looks exactly like a missing one)."""
    rec = await svc.db(svc.store.get_key, key_id)
    if rec is None or rec.tenant != tenant:
        raise ApiError(404, "unknown_key", f"key id {key_id!r} is unknown, expired or not yours")
    return rec


@router.post("", status_code=201, response_model=KeyInfo, responses=ERRORS, openapi_extra=KEY_BODY)
async def register_key(
    request: Request, svc: ServiceDep, tenant: EngineTenant, model: str | None = Query(None, description="model id")
) -> JSONResponse:
    """Register a public CKKS context (relinearization + the model's Galois keys, no secret key)."""
    await svc.rate_limit(tenant, "key registration")
    blob, fields = await binary_input(request, svc.settings.max_key_bytes, "public context", "context")
    model_id = param(request, fields, "model")
    svc.model(model_id)
    if not blob:
        raise ApiError(400, "empty_context", "the uploaded public context is empty")
    svc.metrics.bytes.labels("in", "context").inc(len(blob))
    key_id = "k_" + secrets.token_urlsafe(18)
    await svc.run_engine(tenant, "load_context", worker.validate_key, model_id, key_id, blob)
    now = time.time()
    rec = KeyRecord(
        key_id, tenant, model_id, now, now + svc.settings.key_ttl_s, len(blob), hashlib.sha256(blob).hexdigest()
    )
    await svc.db(svc.store.put_key, rec, blob)
    return JSONResponse(key_info(rec).model_dump(), status_code=201)


@router.get("", response_model=KeyList, responses=ERRORS)
async def list_keys(svc: ServiceDep, tenant: Tenant) -> KeyList:
    return KeyList(keys=[key_info(r) for r in await svc.db(svc.store.list_keys, tenant)])


@router.get("/{key_id}", response_model=KeyInfo, responses=ERRORS)
async def get_key(key_id: str, svc: ServiceDep, tenant: Tenant) -> KeyInfo:
    return key_info(await key_for(svc, tenant, key_id))


@router.delete("/{key_id}", status_code=204, responses=ERRORS)
async def delete_key(key_id: str, svc: ServiceDep, tenant: Tenant) -> Response:
    await key_for(svc, tenant, key_id)
    await svc.db(svc.store.delete_key, key_id)
    return Response(status_code=204)
