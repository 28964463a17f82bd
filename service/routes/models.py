"""Models: what this replica serves, and the client bundle (JSON + files) each model's clients need."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.deps import ReadyTenant, ServiceDep
from service.errors import ApiError
from service.pool import ServedModel
from service.routes import API_PREFIX
from service.schemas import ERRORS, ModelList, ModelSummary

router = APIRouter(prefix="/models", tags=["models"])


def summary(model_id: str, served: ServedModel) -> ModelSummary:
    b = served.info.bundle
    return ModelSummary(
        model_id=model_id,
        model_hash=served.info.model_hash,
        max_tokens=served.info.max_tokens,
        num_labels=b.get("num_labels"),
        labels=[str(x) for x in b.get("labels", [])] or None,
    )


@router.get("", response_model=ModelList, responses=ERRORS)
async def list_models(svc: ServiceDep, tenant: ReadyTenant) -> ModelList:
    return ModelList(models=[summary(k, v) for k, v in sorted(svc.models.items())])


@router.get("/{model_id}/bundle", responses=ERRORS)
async def model_bundle(model_id: str, svc: ServiceDep, tenant: ReadyTenant) -> dict[str, Any]:
    served = svc.model(model_id)
    bundle = dict(served.info.bundle)
    bundle["files"] = [
        {
            "name": f.name,
            "bytes": f.bytes,
            "sha256": f.sha256,
            "url": f"{API_PREFIX}/models/{model_id}/bundle/files/{f.name}",
        }
        for f in served.files
    ]
    return bundle


@router.get(
    "/{model_id}/bundle/files/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **ERRORS},
)
async def model_bundle_file(model_id: str, name: str, svc: ServiceDep, tenant: ReadyTenant) -> FileResponse:
    for f in svc.model(model_id).files:
        if f.name == name:
            return FileResponse(f.path, media_type="application/octet-stream", filename=name)
    raise ApiError(404, "unknown_file", f"model {model_id!r} has no bundle file {name!r}")
