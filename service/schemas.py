"""Pydantic models of the JSON requests and responses, and the OpenAPI pieces for binary bodies."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.protocol import FRAMES_MEDIA_TYPE


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


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
}

BINARY = {"schema": {"type": "string", "format": "binary"}}

# Bodies are CBF1 frame sets; the server also accepts Content-Type application/vnd.cipherbert.frames.
FRAMES_BODY: dict[str, Any] = {"required": True, "content": {"application/octet-stream": BINARY}}

ENVELOPE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "CBF1 frame set: frame 0 is a JSON header {inference_id, round, done, kind, meta, "
        "round_token, ...}; frames 1.. are ciphertexts (a refresh round or the encrypted logits)",
        "content": {FRAMES_MEDIA_TYPE: BINARY},
    },
    **ERRORS,
}


def multipart_body(required: list[str], **properties: dict[str, str]) -> dict[str, Any]:
    """An OpenAPI requestBody: raw octet-stream, or multipart/form-data with these fields."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {
        "requestBody": {
            "required": True,
            "content": {**FRAMES_BODY["content"], "multipart/form-data": {"schema": schema}},
        }
    }
