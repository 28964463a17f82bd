"""Reading binary uploads: size limits while streaming, octet-stream or multipart, CBF1 frame sets."""

from __future__ import annotations

from fastapi import Request

from service.errors import ApiError
from service.protocol import FRAMES_MEDIA_TYPE, WireError, unpack_frames


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


async def _multipart(request: Request, limit: int, file_field: str) -> tuple[bytes, dict[str, str]]:
    try:
        form = await request.form(max_files=2, max_fields=16, max_part_size=limit)
    except Exception as exc:
        raise ApiError(400, "bad_multipart", f"could not parse multipart body: {exc}") from None
    fields: dict[str, str] = {}
    data = None
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = value
        elif name == file_field:
            data = await value.read()
    if data is None:
        raise ApiError(400, "missing_field", f"multipart body has no file field {file_field!r}")
    return data, fields


async def binary_input(request: Request, limit: int, what: str, file_field: str) -> tuple[bytes, dict[str, str]]:
    """The uploaded bytes plus any multipart text fields; raw octet-stream or multipart/form-data."""
    body = await read_body(request, limit, what)
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _multipart(request, limit, file_field)
    if ctype in ("application/octet-stream", FRAMES_MEDIA_TYPE, ""):
        return body, {}
    raise ApiError(
        415, "unsupported_media_type", f"send {what} as application/octet-stream or multipart/form-data, not {ctype!r}"
    )


def param(request: Request, fields: dict[str, str], name: str) -> str:
    """A required parameter from the query string or, for multipart uploads, a form field."""
    value = request.query_params.get(name, fields.get(name))
    if value is None or value == "":
        raise ApiError(422, "missing_parameter", f"parameter {name!r} is required (query or multipart field)")
    return value


def unpack(data: bytes, max_frames: int, max_bytes: int) -> list[bytes]:
    """The ciphertext frames of an upload (400 bad_frames when malformed or empty)."""
    try:
        frames = unpack_frames(data, max_frames=max_frames, max_bytes=max_bytes)
    except (WireError, ValueError) as exc:
        raise ApiError(400, "bad_frames", f"malformed ciphertext frames: {exc}") from None
    if not frames:
        raise ApiError(400, "bad_frames", "no ciphertext frames in the body")
    return frames
