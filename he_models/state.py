"""The HMAC-authenticated state blob that carries an inference from one round to the next.

The engine keeps nothing between calls: the ciphertexts a later round still needs travel in this blob,
which the service stores. Layout: a 32-byte HMAC-SHA256 tag over the body, then the body, a framed
message (he_models.wire) whose first frame is a JSON header and whose other frames are the saved
ciphertexts, tensor by tensor in header order. Any replica holding the same secret can open it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

import tenseal.sealapi as seal

from he_models.ckks import CKKSError, load_ciphertext, save_bytes
from he_models.contracts import EngineError
from he_models.wire import WireError, pack_frames, unpack_frames

STATE_FORMAT = "cipherbert-engine-state/1"
TAG_BYTES = 32
MAX_STATE_FRAMES = 256
MAX_STATE_BYTES = 1 << 31


@dataclass(frozen=True)
class RoundHeader:
    """What the state says about the inference it belongs to."""

    inference_id: str
    round: int
    kind: str
    geometry: dict
    key: str  # fingerprint of the evaluation keys the inference started with


class StateSealer:
    """Seals and opens state blobs for one model under one server secret."""

    def __init__(self, secret: bytes, model_hash: str, context: seal.SEALContext) -> None:
        self._secret = secret
        self._model_hash = model_hash
        self._context = context

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()

    def seal_blob(self, header: RoundHeader, keep: dict[str, list[seal.Ciphertext]]) -> bytes:
        """Tag + framed (JSON header, ciphertexts of `keep` in order)."""
        fields = {
            "format": STATE_FORMAT,
            "inference_id": header.inference_id,
            "round": header.round,
            "kind": header.kind,
            "geometry": header.geometry,
            "key": header.key,
            "model": self._model_hash,
            "tensors": {name: len(cts) for name, cts in keep.items()},
        }
        frames = [json.dumps(fields).encode()]
        for name in keep:
            frames.extend(save_bytes(ct) for ct in keep[name])
        body = pack_frames(frames)
        return self._tag(body) + body

    def open_blob(self, state: bytes) -> tuple[RoundHeader, dict[str, list[seal.Ciphertext]]]:
        """Verify the tag, then parse; any refusal is an EngineError (the blob came back from a client)."""
        if not isinstance(state, bytes | bytearray) or len(state) < TAG_BYTES + 8:
            raise EngineError("engine state is missing or truncated")
        tag, body = state[:TAG_BYTES], bytes(state[TAG_BYTES:])
        if not hmac.compare_digest(tag, self._tag(body)):
            raise EngineError("engine state failed authentication (forged, corrupted or from another server)")
        try:
            frames = unpack_frames(body, max_frames=MAX_STATE_FRAMES, max_bytes=MAX_STATE_BYTES)
            fields = json.loads(frames[0])
        except (WireError, ValueError, IndexError):
            raise EngineError("engine state is malformed") from None
        if (
            not isinstance(fields, dict)
            or fields.get("format") != STATE_FORMAT
            or (fields.get("model") != self._model_hash)
        ):
            raise EngineError("engine state belongs to another model or format")
        try:
            header = RoundHeader(
                inference_id=fields["inference_id"],
                round=int(fields["round"]),
                kind=fields["kind"],
                geometry=fields["geometry"],
                key=fields["key"],
            )
            return header, self._load_tensors(fields["tensors"], frames[1:])
        except (KeyError, TypeError, ValueError, IndexError, CKKSError):
            raise EngineError("engine state is malformed") from None

    def _load_tensors(self, counts: dict[str, int], frames: list[bytes]) -> dict[str, list[seal.Ciphertext]]:
        if sum(counts.values()) != len(frames):
            raise ValueError("tensor counts do not match the frames")
        saved: dict[str, list[seal.Ciphertext]] = {}
        pos = 0
        for name, count in counts.items():
            saved[name] = [load_ciphertext(self._context, frames[pos + j]) for j in range(count)]
            pos += count
        return saved
