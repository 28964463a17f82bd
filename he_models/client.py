"""The client half of encrypted inference: keys, embedding, encryption, refresh rounds, decryption.

Depends only on TenSEAL (sealapi), numpy, `tokenizers` and safetensors' numpy loader — never on torch
or the server — so the SDK can reuse it as is. The secret key never leaves `ClientKeys`; what goes on
the wire is `public_keys_bytes()` (relinearization + Galois keys for the plan's steps) and ciphertexts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from he_models import protocol_spec
from he_models.ckks import CKKSError, CKKSParams, encode_vector, load_ciphertext, load_into, pack_eval_keys, save_bytes
from he_models.layout import PROTOCOL, Geometry, client_context, client_scores
from he_models.wire import pack_frames, unpack_frames

EMBEDDING_TENSORS = (
    "embeddings.word.weight",
    "embeddings.position.weight",
    "embeddings.norm.weight",
    "embeddings.norm.bias",
)


class ClientError(ValueError):
    pass


class ClientKeys:
    """A CKKS key set owned by the client. `save` writes the secret key: keep that file private."""

    def __init__(
        self,
        params: CKKSParams,
        galois_steps: list[int],
        secret_key: seal.SecretKey,
        context: seal.SEALContext | None = None,
    ) -> None:
        self.params = params
        self.galois_steps = sorted(int(s) for s in galois_steps)
        self.context = context or params.seal_context()
        self._secret = secret_key
        self.encoder = seal.CKKSEncoder(self.context)
        self.encryptor = seal.Encryptor(self.context, secret_key)
        self.decryptor = seal.Decryptor(self.context, secret_key)
        self._public: bytes | None = None

    @classmethod
    def generate(cls, params: CKKSParams | dict, galois_steps: list[int]) -> ClientKeys:
        if isinstance(params, dict):
            params = CKKSParams.from_dict(params)
        context = params.seal_context()
        keygen = seal.KeyGenerator(context)
        return cls(params, galois_steps, keygen.secret_key(), context)

    def public_keys_bytes(self) -> bytes:
        """Relinearization and Galois keys (seeded, so about half size); never the secret key."""
        if self._public is None:
            keygen = seal.KeyGenerator(self.context, self._secret)
            relin = save_bytes(keygen.create_relin_keys())
            # Pass Galois elements (positive), never raw steps: pybind picks the element overload
            # for lists of non-negative ints, so steps like [1, 2] would be misread as elements.
            tool = self.context.key_context_data().galois_tool()
            elts = tool.get_elts_from_steps(self.galois_steps)
            galois = save_bytes(keygen.create_galois_keys(elts))  # Serializable: seeded, half size
            self._public = pack_eval_keys(self.params, self.galois_steps, relin, galois)
        return self._public

    def save(self, path: str | Path) -> None:
        """Write params, steps and the secret key to a file readable by the owner only (0600)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"params": self.params.to_dict(), "galois_steps": self.galois_steps}).encode()
        payload = pack_frames([header, save_bytes(self._secret)])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: str | Path) -> ClientKeys:
        frames = unpack_frames(Path(path).read_bytes(), max_frames=4)
        header = json.loads(frames[0])
        params = CKKSParams.from_dict(header["params"])
        context = params.seal_context()
        secret = load_into(seal.SecretKey(), context, frames[1], "secret key")
        return cls(params, header["galois_steps"], secret, context)

    # -- encryption -----------------------------------------------------------------------
    def encrypt(self, vectors: list[np.ndarray]) -> list[bytes]:
        """Fresh, seeded symmetric encryptions at the top level (half the bytes of a public-key one)."""
        parms_id = self.context.first_parms_id()
        out = []
        for v in vectors:
            pt = encode_vector(self.encoder, v, parms_id, self.params.scale)
            out.append(save_bytes(self.encryptor.encrypt_symmetric(pt)))
        return out

    def max_ciphertext_bytes(self) -> int:
        """The most an uncompressed two-polynomial ciphertext of these parameters can take, plus headers."""
        return 2 * self.params.poly_modulus_degree * len(self.params.coeff_mod_bit_sizes) * 8 + 4096

    def decrypt(self, payloads: list[bytes]) -> list[np.ndarray]:
        out = []
        limit = self.max_ciphertext_bytes()
        for i, data in enumerate(payloads):
            if len(data) > limit:
                raise ProtocolViolation(
                    f"server ciphertext {i} has {len(data)} bytes; no ciphertext of these parameters exceeds {limit}"
                )
            ct = load_ciphertext(self.context, data, f"server ciphertext {i}")
            pt = seal.Plaintext()
            self.decryptor.decrypt(ct, pt)
            out.append(np.asarray(self.encoder.decode_double(pt)))
        return out


def encrypt_embeddings(keys: ClientKeys, embeddings: np.ndarray, geometry: Geometry) -> list[bytes]:
    return keys.encrypt(geometry.pack_fm(np.asarray(embeddings, dtype=np.float64)))


class ProtocolViolation(ClientError):
    """The server sent what the protocol does not allow (wrong counts, geometry, order, overflow).

    Messages never carry decrypted values: they are the client's secrets even when masked."""

    def __init__(self, message: str, code: str = "protocol_violation") -> None:
        super().__init__(message)
        self.code = code


def answer_round(
    keys: ClientKeys, kind: str, meta: dict, payloads: list[bytes], *, geometry: Geometry | None = None
) -> list[bytes]:
    """Decrypt the server's masked values, compute what the round asks, re-encrypt fresh.

    scores:  (Q+rQ), (K+rK)        -> sigma (Q+rQ)(K+rK)^T per head, and (K+rK) token-major
    context: (A+rA), (V+rV)        -> (A+rA)(V+rV), and (A+rA) re-encrypted
    refresh: x + r                 -> x + r re-encrypted at the top level, padded slots zeroed
    The client only ever sees masked values. `geometry` is the client's own packing for its sentence:
    the server's meta must agree with it. Frame counts, the meta's tensor descriptors and the headroom
    of every decrypted value are checked (docs/protocol.md, section 12).
    """
    geo = check_round_meta(kind, meta, geometry)
    expect = protocol_spec.message_frames(kind, "server", protocol_spec.env_of_geometry(geo.to_dict()))
    if len(payloads) != expect:
        raise ProtocolViolation(
            f"{kind} round: the server sent {len(payloads)} ciphertexts; the protocol says {expect} for {geo.n} tokens"
        )
    values = keys.decrypt(payloads)
    check_headroom(keys.params, values, f"{kind} round")
    hidden = geo.hidden
    if kind == "scores":
        n_fm = geo.fm_cts(hidden)
        q = geo.unpack_fm(values[:n_fm], hidden)
        k = geo.unpack_fm(values[n_fm:], hidden)
        s = client_scores(geo, q, k, _number(meta, "sigma"))
        return keys.encrypt(geo.pack_sl(s) + geo.pack_tm(k))
    if kind == "context":
        n_sl = geo.sl_cts
        a = geo.unpack_sl(values[:n_sl])
        v = geo.unpack_fm(values[n_sl:], hidden)
        product = client_context(geo, a, v) * _number(meta, "context_scale")
        return keys.encrypt(geo.pack_fm(product) + geo.pack_sl(a))
    x = geo.unpack_fm(values, hidden)
    return keys.encrypt(geo.pack_fm(x))


def check_round_meta(kind: str, meta: dict, geometry: Geometry | None = None) -> Geometry:
    """The round's meta against the protocol: version, kind, geometry and its tensor descriptors."""
    check_protocol(meta)
    if kind not in ("scores", "context", "refresh"):
        raise ProtocolViolation(f"unknown round kind {kind!r}")
    try:
        geo = Geometry.from_dict(meta["geometry"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolViolation(f"{kind} round: meta lacks a valid geometry") from None
    if geometry is not None and geo != geometry:
        raise ProtocolViolation(
            f"{kind} round: the server packs for {geo.to_dict()}, this sentence is {geometry.to_dict()}"
        )
    want = protocol_spec.round_tensors(kind, geo.to_dict())
    if meta.get("tensors") != want:  # protocol /4: every round describes itself
        raise ProtocolViolation(
            f"{kind} round: the server describes its tensors as {meta.get('tensors')}; the protocol says {want}"
        )
    return geo


def _number(meta: dict, name: str) -> float:
    value = meta.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
        raise ProtocolViolation(f"round meta lacks the number {name!r}")
    return float(value)


def check_headroom(params: CKKSParams, values: list[np.ndarray], what: str) -> None:
    """A decrypted value at or past the last level's headroom means the computation overflowed."""
    bits = protocol_spec.headroom_bits(list(params.coeff_mod_bit_sizes), params.scale_bits)
    for i, v in enumerate(values):
        peak = float(np.max(np.abs(v))) if len(v) else 0.0
        if not np.isfinite(peak) or peak >= 2.0**bits:
            raise ProtocolViolation(
                f"{what}: ciphertext {i} decrypts to values at or past the headroom of 2^{bits}: the "
                f"server's computation overflowed (or the server is misbehaving); the result would be "
                f"wrong, so this inference is stopped",
                "headroom",
            )


def check_protocol(meta: dict) -> None:
    """Client and server must pack alike; a mismatch would decrypt to garbage, so say it instead."""
    theirs = meta.get("protocol")
    if theirs != PROTOCOL:
        raise ClientError(
            f"server speaks protocol {theirs!r}; this client speaks {PROTOCOL!r} — upgrade the client (or the server)"
        )


def decrypt_logits(keys: ClientKeys, meta: dict, payloads: list[bytes], *, num_labels: int | None = None) -> np.ndarray:
    """Logit c is slot 0 of ciphertext c; `num_labels` (the bundle's) must match the count."""
    check_protocol(meta)
    expect = num_labels if num_labels is not None else meta.get("num_labels")
    if expect is not None and len(payloads) != int(expect):
        raise ProtocolViolation(f"the server sent {len(payloads)} logit ciphertexts for {expect} labels")
    values = keys.decrypt(payloads)
    check_headroom(keys.params, values, "logits")
    return np.array([v[0] for v in values])


def decrypt_segment_logits(keys: ClientKeys, meta: dict, payloads: list[bytes], segments: int) -> np.ndarray:
    """(segments, labels): packed sentences' logits, sentence s in slot s of each label's ciphertext."""
    check_protocol(meta)
    if meta.get("segments") is not None and len(meta["segments"]) != segments:
        raise ProtocolViolation(f"the server pooled {len(meta['segments'])} sentences, this batch has {segments}")
    values = keys.decrypt(payloads)
    check_headroom(keys.params, values, "logits")
    return np.array([v[:segments] for v in values]).T


def decrypt_token_logits(
    keys: ClientKeys, meta: dict, payloads: list[bytes], *, num_labels: int, geometry: Geometry | None = None
) -> np.ndarray:
    """(n, num_labels) logits of a token-classification model: the FM layout with F = num_labels.

    The meta must describe this sentence's geometry and the frames the protocol gives for it."""
    check_protocol(meta)
    try:
        geo = Geometry.from_dict(meta["geometry"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolViolation("token_logits: meta lacks a valid geometry") from None
    if geometry is not None and geo != geometry:
        raise ProtocolViolation(
            f"token_logits: the server packs for {geo.to_dict()}, this sentence is {geometry.to_dict()}"
        )
    want = protocol_spec.round_tensors("token_logits", geo.to_dict(), num_labels)
    if meta.get("tensors") != want:
        raise ProtocolViolation(f"token_logits: the server describes {meta.get('tensors')}; the protocol says {want}")
    expect = sum(t["frames"] for t in want["send"])
    if len(payloads) != expect:
        raise ProtocolViolation(f"the server sent {len(payloads)} token-logit ciphertexts; the protocol says {expect}")
    values = keys.decrypt(payloads)
    check_headroom(keys.params, values, "token logits")
    return geo.unpack_fm(values, num_labels)


@dataclass
class Embedder:
    """Tokenizer + embedding tables; the client embeds in plaintext before encrypting."""

    tokenizer: Any  # tokenizers.Tokenizer
    word: np.ndarray
    position: np.ndarray
    norm_weight: np.ndarray
    norm_bias: np.ndarray
    max_tokens: int
    eps: float = protocol_spec.EMBEDDING_LAYERNORM_EPS

    @classmethod
    def from_files(cls, tokenizer_json: str | Path, tables: dict[str, np.ndarray], max_tokens: int) -> Embedder:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json))
        tok.enable_truncation(max_length=max_tokens)
        tok.no_padding()
        missing = [k for k in EMBEDDING_TENSORS if k not in tables]
        if missing:
            raise ClientError(f"embedding tables missing {missing}")
        word, position, weight, bias = (tables[k].astype(np.float64) for k in EMBEDDING_TENSORS)
        return cls(tok, word, position, weight, bias, max_tokens=max_tokens)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, max_tokens: int | None = None) -> Embedder:
        from safetensors.numpy import load_file

        model_dir = Path(model_dir)
        tables = load_file(str(model_dir / "model.safetensors"))
        config = json.loads((model_dir / "config.json").read_text())
        limit = max_tokens or int(config.get("max_position", 128))
        return cls.from_files(model_dir / "tokenizer.json", {k: tables[k] for k in EMBEDDING_TENSORS}, limit)

    def encode(self, text: str) -> Any:
        """The tokenizers.Encoding of the text (truncated to max_tokens): ids, pieces, character offsets."""
        if not text or not text.strip():
            raise ClientError("text is empty")
        return self.tokenizer.encode(text)

    def token_ids(self, text: str) -> list[int]:
        return self.encode(text).ids

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        index = np.asarray(ids[: self.max_tokens])
        if index.max(initial=0) >= self.word.shape[0]:
            raise ClientError("token id outside the vocabulary")
        x = self.word[index] + self.position[: len(index)]
        mean = x.mean(-1, keepdims=True)
        var = x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.norm_weight + self.norm_bias

    def embed(self, text: str) -> np.ndarray:
        """(n_tokens, hidden); sentences beyond max_tokens word pieces are truncated."""
        return self.embed_ids(self.token_ids(text))


__all__ = [
    "ClientKeys",
    "ClientError",
    "CKKSError",
    "Embedder",
    "ProtocolViolation",
    "encrypt_embeddings",
    "answer_round",
    "check_round_meta",
    "check_headroom",
    "decrypt_logits",
    "decrypt_segment_logits",
    "decrypt_token_logits",
]
