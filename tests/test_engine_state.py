"""The state blob (he_models.state): sealed and opened under one secret, refused when touched."""

from __future__ import annotations

import hashlib
import hmac
import json

import numpy as np
import pytest

from he_models.ckks import CKKSParams, load_ciphertext
from he_models.client import ClientKeys
from he_models.engine import EngineError
from he_models.errors import ClientInputError
from he_models.kernels import Backend
from he_models.state import STATE_FORMAT, RoundHeader, StateSealer
from he_models.wire import pack_frames, unpack_frames

SECRET = b"state-test-secret-0123456789"
PARAMS = CKKSParams()
HEADER = RoundHeader(inference_id="inf-1", round=3, kind="refresh", geometry={"n": 5}, key="fp")


@pytest.fixture(scope="module")
def env():
    backend = Backend(PARAMS)
    keys = ClientKeys.generate(PARAMS, [1])
    cts = [load_ciphertext(backend.context, b) for b in keys.encrypt([np.arange(4.0), -np.arange(4.0)])]
    return backend, keys, cts


def test_round_trip_keeps_header_and_ciphertexts(env):
    backend, keys, cts = env
    sealer = StateSealer(SECRET, "model-hash", backend.context)
    blob = sealer.seal_blob(HEADER, {"x_res": cts[:1], "v": cts[1:]})
    header, saved = StateSealer(SECRET, "model-hash", backend.context).open_blob(blob)  # another replica
    assert header == HEADER
    assert list(saved) == ["x_res", "v"] and [len(v) for v in saved.values()] == [1, 1]
    from he_models.ckks import save_bytes

    got = keys.decrypt([save_bytes(saved["x_res"][0]), save_bytes(saved["v"][0])])
    assert np.abs(got[0][:4] - np.arange(4.0)).max() < 1e-6 and np.abs(got[1][:4] + np.arange(4.0)).max() < 1e-6


def test_blob_layout_is_tag_then_framed_json_header(env):
    backend, _, cts = env
    blob = StateSealer(SECRET, "model-hash", backend.context).seal_blob(HEADER, {"q": cts})
    tag, body = blob[:32], blob[32:]
    assert hmac.compare_digest(tag, hmac.new(SECRET, body, hashlib.sha256).digest())
    frames = unpack_frames(body, max_frames=256)
    fields = json.loads(frames[0])
    assert fields["format"] == STATE_FORMAT and fields["model"] == "model-hash"
    assert fields["tensors"] == {"q": 2} and len(frames) == 3
    assert list(fields) == ["format", "inference_id", "round", "kind", "geometry", "key", "model", "tensors"]


@pytest.mark.parametrize("change", ["flip", "truncate", "other_secret", "other_model", "empty", "not_bytes"])
def test_touched_blobs_are_refused(env, change):
    backend, _, cts = env
    blob = StateSealer(SECRET, "model-hash", backend.context).seal_blob(HEADER, {"q": cts[:1]})
    opener = StateSealer(SECRET, "model-hash", backend.context)
    if change == "flip":
        blob = blob[:50] + bytes([blob[50] ^ 1]) + blob[51:]
    elif change == "truncate":
        blob = blob[:-10]
    elif change == "other_secret":
        opener = StateSealer(b"another-secret-0123456789", "model-hash", backend.context)
    elif change == "other_model":
        opener = StateSealer(SECRET, "another-model", backend.context)
    elif change == "empty":
        blob = b""
    else:
        blob = "a string"  # type: ignore[assignment]
    with pytest.raises(EngineError) as info:
        opener.open_blob(blob)
    assert isinstance(info.value, ClientInputError)


@pytest.mark.parametrize(
    "body",
    [
        b"not framed at all",
        pack_frames([b"{not json"]),
        pack_frames([]),
        pack_frames([b'{"format": "cipherbert-engine-state/1", "model": "model-hash"}']),
        pack_frames(
            [
                json.dumps(
                    {
                        "format": STATE_FORMAT,
                        "model": "model-hash",
                        "inference_id": "i",
                        "round": 1,
                        "kind": "scores",
                        "geometry": {},
                        "key": "k",
                        "tensors": {"q": 2},
                    }
                ).encode(),
                b"junk",
            ]
        ),
    ],
)
def test_authentic_but_malformed_bodies_are_engine_errors(env, body):
    """A blob signed with the right secret but malformed (a server bug) still fails as EngineError."""
    backend, _, _ = env
    blob = hmac.new(SECRET, body, hashlib.sha256).digest() + body
    with pytest.raises(EngineError, match="malformed|another model"):
        StateSealer(SECRET, "model-hash", backend.context).open_blob(blob)
