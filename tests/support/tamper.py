"""A deliberately misbehaving server, as the SDK sees it: an httpx transport that forwards to a real
cipherbert server and alters its answers one way (`mode`), the way a broken or malicious server could.

Modes (each one SDK check must catch):
  weak_params     the bundle asks for a 240-bit modulus at N=8192 (below 128-bit security)
  new_model       the bundle's model hash changes (after the first use pinned it)
  new_tokenizer   the tokenizer file's sha256 changes
  extra_round     after the last round, another scores round instead of the logits
  skip_round      the second round is numbered 3
  wrong_kind      the first round says "context"
  drop_frame      the first round lacks its last ciphertext
  extra_frame     the first round carries one ciphertext twice
  geometry        the first round's meta claims one token more than the client sent
  descriptors     the first round's tensor descriptors are another round's
  headroom        one slot of the third round's first ciphertext is pushed past the headroom
  logits_count    one logit ciphertext is missing
  lost_state      the third round's reply is answered 404 unknown_inference (`times` times)
"""

from __future__ import annotations

import json

import httpx
import numpy as np

from he_models import protocol_spec
from he_models.ckks import CKKSParams, load_ciphertext, save_bytes
from he_models.kernels import Backend
from he_models.wire import pack_frames, unpack_frames

MODES = (
    "weak_params",
    "new_model",
    "new_tokenizer",
    "extra_round",
    "skip_round",
    "wrong_kind",
    "drop_frame",
    "extra_frame",
    "geometry",
    "descriptors",
    "headroom",
    "logits_count",
    "lost_state",
)


class Tamper(httpx.HTTPTransport):
    def __init__(self, mode: str | None = None, times: int = 1) -> None:
        super().__init__()
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.mode, self.times = mode, times
        self.first_envelope: tuple[dict, list[bytes]] | None = None
        self.backend: Backend | None = None
        self.tampered = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if self.mode == "lost_state" and "/rounds/3" in path and self.tampered < self.times:
            self.tampered += 1
            return httpx.Response(404, json={"error": "unknown_inference", "detail": "tampered: state lost"})
        response = super().handle_request(request)
        response.read()
        if path.endswith("/bundle") and response.status_code == 200:
            return self._json(response, self._bundle(response.json()))
        if path.startswith("/v1/inferences") and response.status_code == 200 and request.method == "POST":
            frames = unpack_frames(response.content, max_frames=1 << 16, max_bytes=1 << 34)
            header, payload = json.loads(frames[0]), frames[1:]
            header, payload = self._envelope(header, payload)
            body = pack_frames([json.dumps(header).encode(), *payload])
            return httpx.Response(200, headers={"content-type": response.headers["content-type"]}, content=body)
        return response

    @staticmethod
    def _json(response: httpx.Response, data: dict) -> httpx.Response:
        return httpx.Response(response.status_code, json=data)

    def _bundle(self, bundle: dict) -> dict:
        self.backend = Backend(CKKSParams.from_dict(bundle["ckks"]))
        if self.mode == "weak_params":
            bundle["ckks"] = {
                "poly_modulus_degree": 8192,
                "coeff_mod_bit_sizes": [60, 40, 40, 40, 60],
                "scale_bits": 40,
            }
        elif self.mode == "new_model":
            bundle["model_hash"] = "0" * 64
        elif self.mode == "new_tokenizer":
            for f in bundle["files"]:
                if f["name"] == "tokenizer.json":
                    f["sha256"] = "1" * 64
        return bundle

    def _envelope(self, header: dict, payload: list[bytes]) -> tuple[dict, list[bytes]]:
        mode, rnd = self.mode, header["round"]
        if self.first_envelope is None:
            self.first_envelope = (json.loads(json.dumps(header)), list(payload))
        if mode == "extra_round" and header["done"]:
            first, frames = self.first_envelope
            return {**first, "round": rnd, "round_token": "tampered"}, frames
        if mode == "skip_round" and rnd == 2:
            header["round"] = 3
        elif mode == "wrong_kind" and rnd == 1:
            header["kind"] = "context"
        elif mode == "drop_frame" and rnd == 1:
            payload = payload[:-1]
        elif mode == "extra_frame" and rnd == 1:
            payload = payload + payload[:1]
        elif mode == "geometry" and rnd == 1:
            header["meta"]["geometry"]["n"] += 1
        elif mode == "descriptors" and rnd == 1:
            env = protocol_spec.env_of_geometry(header["meta"]["geometry"])
            header["meta"]["tensors"] = {
                "send": protocol_spec.describe("context", "server", env),
                "reply": protocol_spec.describe("context", "client", env),
            }
        elif mode == "headroom" and rnd == 3:
            payload = [self._inflate(payload[0])] + payload[1:]
        elif mode == "logits_count" and header["done"]:
            payload = payload[:-1]
        return header, payload

    def _inflate(self, data: bytes) -> bytes:
        """No key needed: adding a plaintext to a ciphertext is public."""
        assert self.backend is not None
        ct = load_ciphertext(self.backend.context, data)
        bump = np.zeros(self.backend.context.first_context_data().parms().poly_modulus_degree() // 2)
        bump[5] = 2.0**20
        return save_bytes(self.backend.add_plain(ct, bump))
