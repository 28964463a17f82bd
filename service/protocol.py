"""The HTTP protocol's binary pieces: frames, the response envelope, round tokens.

Bodies are CBF1 frame sets (he_models.wire): magic b"CBF1", u32 count, then (u64 length, bytes) per
frame. A response to POST /v1/inferences or to a round is one frame set whose frame 0 is a small UTF-8
JSON header (inference id, round, done, kind, meta, round token) and frames 1.. are the ciphertexts;
the same fields are repeated in X-Cipherbert-* headers for proxies and logs.

Round token: base64url(HMAC-SHA256(token_key, "cb-round-v1|tenant|key_id|inference_id|round|digest")),
digest = sha256 of the ciphertext frames the server sent in that round. The server recomputes it from
the stored record, so a token is valid for exactly one (tenant, key, inference, round, payload) and the
state record it points at is taken atomically: a second reply to the same round finds nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct

from he_models.wire import WireError, pack_frames, unpack_frames  # noqa: F401  (re-exported)

FRAMES_MEDIA_TYPE = "application/vnd.cipherbert.frames"


def frames_digest(frames: list[bytes]) -> str:
    h = hashlib.sha256()
    for frame in frames:
        h.update(struct.pack("<Q", len(frame)))
        h.update(frame)
    return h.hexdigest()


def round_token(key: bytes, tenant: str, key_id: str, inference_id: str, round: int, digest: str) -> str:
    msg = f"cb-round-v1|{tenant}|{key_id}|{inference_id}|{round}|{digest}".encode()
    mac = hmac.new(key, msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def token_matches(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


def pack_envelope(header: dict, frames: list[bytes]) -> bytes:
    return pack_frames([json.dumps(header, separators=(",", ":")).encode()] + list(frames))


def unpack_envelope(data: bytes, max_frames: int = 4096, max_bytes: int = 1 << 31) -> tuple[dict, list[bytes]]:
    frames = unpack_frames(data, max_frames=max_frames, max_bytes=max_bytes)
    if not frames:
        raise WireError("empty envelope")
    try:
        header = json.loads(frames[0].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"envelope header is not JSON: {exc}") from None
    return header, frames[1:]
