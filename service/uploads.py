"""Receiving binary uploads within bounded memory: size limits, a per-replica byte budget, spool files.

A body is refused before it is read when its Content-Length is over the request's limit (413) or does
not fit the replica's upload budget or the tenant's share of it (429 + Retry-After); a body without a
Content-Length is counted against both as it streams. It is read with `request.stream()` in the chunks
the server hands over: up to `spool_above_bytes` in memory, beyond that into a spool file (mode 0600)
that the engine worker reads itself, so the API process never holds a large body whole (and glibc has
no large buffer to keep). `receive` is an async context manager: the budget and the spool file are given
back when the request is done with them.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from service.contracts import Upload
from service.errors import ApiError
from service.protocol import FRAMES_MEDIA_TYPE, WireError, unpack_frames

RAW_TYPES = ("application/octet-stream", FRAMES_MEDIA_TYPE, "")
WRITE_CHUNK = 1 << 20  # buffered bytes per write to a spool file


class UploadBudget:
    """Bytes of request bodies this replica holds now, in total and per tenant (one event loop: no lock)."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total, self.per_tenant = total, per_tenant
        self.used = 0
        self.by_tenant: dict[str, int] = {}

    def take(self, tenant: str, n: int) -> None:
        """Reserve n more bytes for the tenant, or 429 (upload_budget / tenant_upload_budget)."""
        mine = self.by_tenant.get(tenant, 0)
        if self.used + n > self.total:
            raise ApiError(
                429,
                "upload_budget",
                f"this replica already receives {self.used} bytes of uploads (budget "
                f"CIPHERBERT_UPLOAD_BUDGET_BYTES={self.total}); retry later",
                {"Retry-After": "2"},
            )
        if mine + n > self.per_tenant:
            raise ApiError(
                429,
                "tenant_upload_budget",
                f"tenant already uploads {mine} bytes to this replica (share "
                f"CIPHERBERT_TENANT_UPLOAD_BYTES={self.per_tenant}); retry later",
                {"Retry-After": "2"},
            )
        self.used += n
        self.by_tenant[tenant] = mine + n

    def give(self, tenant: str, n: int) -> None:
        self.used -= n
        left = self.by_tenant.get(tenant, 0) - n
        if left > 0:
            self.by_tenant[tenant] = left
        else:
            self.by_tenant.pop(tenant, None)


def declared_length(request: Request, limit: int, what: str) -> int | None:
    """The Content-Length, refused 413 at once when over the limit (None for a chunked body)."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise ApiError(400, "bad_request", "invalid Content-Length")
    if int(raw) > limit:
        raise ApiError(413, "too_large", f"{what} of {raw} bytes exceeds the limit of {limit} bytes")
    return int(raw)


def media_type(request: Request, what: str) -> str:
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if ctype != "multipart/form-data" and ctype not in RAW_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send {what} as application/octet-stream or multipart/form-data, not {ctype!r}",
        )
    return ctype


class _Sink:
    """Where a body goes while it streams: memory up to a threshold, then a spool file."""

    def __init__(self, spool_dir: Path, spool_above: int) -> None:
        self.spool_dir, self.spool_above = spool_dir, spool_above
        self.buf = bytearray()
        self.fh: BinaryIO | None = None
        self.path: str | None = None
        self.size = 0
        self.reserved = 0  # bytes of the upload budget this body holds
        self.digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.digest.update(chunk)
        self.buf += chunk
        if self.fh is None and len(self.buf) > self.spool_above:
            fd, self.path = tempfile.mkstemp(prefix="up-", suffix=".body", dir=self.spool_dir)  # mode 0600
            self.fh = os.fdopen(fd, "wb")
        if self.fh is not None and len(self.buf) >= WRITE_CHUNK:
            self.fh.write(self.buf)
            self.buf = bytearray()

    def finish(self) -> Upload:
        if self.fh is None:
            return Upload(self.size, self.digest.hexdigest(), data=bytes(self.buf))
        self.fh.write(self.buf)
        self.buf = bytearray()
        self.fh.close()
        return Upload(self.size, self.digest.hexdigest(), path=self.path)

    def discard(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()
        if self.path is not None:
            Path(self.path).unlink(missing_ok=True)


async def _stream_into(request: Request, sink: _Sink, budget: UploadBudget, tenant: str, limit: int, what: str) -> None:
    """Copy the body into the sink, growing its budget reservation as it goes (a chunked body)."""
    try:
        async for chunk in request.stream():
            if sink.size + len(chunk) > limit:
                raise ApiError(413, "too_large", f"{what} exceeds the limit of {limit} bytes")
            if sink.size + len(chunk) > sink.reserved:
                grow = max(sink.size + len(chunk) - sink.reserved, min(WRITE_CHUNK, limit - sink.reserved))
                budget.take(tenant, grow)
                sink.reserved += grow
            sink.write(chunk)
    except ClientDisconnect:  # the client went away mid-body: nobody reads the answer, nothing is kept
        raise ApiError(400, "incomplete_body", f"the client disconnected during the {what}") from None


@asynccontextmanager
async def receive(
    request: Request, budget: UploadBudget, tenant: str, *, limit: int, what: str, file_field: str,
    spool_dir: Path, spool_above: int,
) -> AsyncIterator[tuple[Upload, dict[str, str]]]:  # fmt: skip
    """The uploaded bytes (raw octet-stream, or the multipart `file_field`) plus multipart text fields."""
    declared = declared_length(request, limit, what)
    ctype = media_type(request, what)
    sinks = [_Sink(spool_dir, spool_above)]
    budget.take(tenant, declared or 0)
    sinks[0].reserved = declared or 0
    try:
        await _stream_into(request, sinks[0], budget, tenant, limit, what)
        body = sinks[0].finish()
        fields: dict[str, str] = {}
        if ctype == "multipart/form-data":
            sinks.append(_Sink(spool_dir, spool_above))
            body, fields = await _multipart(request.headers, body, sinks[1], file_field)
        yield body, fields
    finally:
        for sink in sinks:
            sink.discard()
        budget.give(tenant, sinks[0].reserved)


async def _chunks(upload: Upload) -> AsyncGenerator[bytes, None]:
    if upload.path is None:
        yield upload.data or b""
        return
    with open(upload.path, "rb") as fh:
        while chunk := fh.read(WRITE_CHUNK):
            yield chunk


async def _multipart(headers: Headers, raw: Upload, sink: _Sink, file_field: str) -> tuple[Upload, dict[str, str]]:
    """Parse a spooled multipart body; the file part goes to its own sink (memory or spool file)."""
    parser = MultiPartParser(headers, _chunks(raw), max_files=2, max_fields=16, max_part_size=1 << 16)
    try:
        form = await parser.parse()
    except Exception as exc:
        raise ApiError(400, "bad_multipart", f"could not parse multipart body: {exc}") from None
    fields: dict[str, str] = {}
    found = False
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields[name] = value
            elif name == file_field and not found:
                found = True
                while chunk := await value.read(WRITE_CHUNK):
                    sink.write(chunk)
    finally:
        await form.close()
    if not found:
        raise ApiError(400, "missing_field", f"multipart body has no file field {file_field!r}")
    return sink.finish(), fields


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


def check_frames(upload: Upload, max_frames: int) -> int:
    """Check a CBF1 frame set's structure (magic, count, lengths adding up) without copying its frames;
    the engine worker unpacks it. Returns the frame count; 400 bad_frames when malformed or empty."""
    if upload.path is None:
        return len(unpack(upload.data or b"", max_frames, max(upload.size, 8)))
    try:
        with open(upload.path, "rb") as fh:
            return _scan_frames(fh, upload.size, max_frames)
    except WireError as exc:
        raise ApiError(400, "bad_frames", f"malformed ciphertext frames: {exc}") from None


def _scan_frames(fh: BinaryIO, size: int, max_frames: int) -> int:
    head = fh.read(8)
    if len(head) < 8 or head[:4] != b"CBF1":
        raise WireError("not a framed message (expected magic b'CBF1')")
    (count,) = struct.unpack_from("<I", head, 4)
    if count > max_frames:
        raise WireError(f"{count} frames exceed the limit of {max_frames}")
    if count == 0:
        raise WireError("no ciphertext frames in the body")
    offset = 8
    for index in range(count):
        fh.seek(offset)
        raw = fh.read(8)
        if len(raw) < 8:
            raise WireError(f"truncated message: frame {index} header missing")
        (length,) = struct.unpack("<Q", raw)
        offset += 8 + length
        if offset > size:
            raise WireError(
                f"truncated message: frame {index} declares {length} bytes, {size - offset + length} remain"
            )
    if offset != size:
        raise WireError(f"{size - offset} trailing bytes after {count} frames")
    return count
