"""A cipherbert client written from docs/protocol.md alone: raw TenSEAL sealapi, numpy, tokenizers.

It imports nothing from he_models, clients or service. Layout formulas, frame counts, the per-round
tensor order and the key header's fields are read from the doc's generated tables at run time, so a
wrong table makes this client fail; what it implements by hand is what the doc says in prose (CBF1,
the key upload, the embedding, the client's products per round kind, slot 0 of the logits).
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


# -- the doc's tables ---------------------------------------------------------------------------


def _section(text: str, name: str) -> list[list[str]]:
    match = re.search(rf"<!-- generated:{name} .*?-->\n(.*?)<!-- end generated:{name} -->", text, re.S)
    if match is None:
        raise AssertionError(f"docs/protocol.md has no generated table {name!r}")
    rows = [line.strip().strip("|").split("|") for line in match.group(1).strip().splitlines()]
    return [[c.strip().strip("`") for c in row] for row in rows[2:]]  # drop header and rule


@dataclass
class DocTables:
    quantities: list[tuple[str, str]]
    layouts: dict[str, tuple[str, str]]  # name -> (slot formula, frames formula)
    tensors: list[dict]
    key_required: list[str]
    key_optional: dict[str, str] = field(default_factory=dict)
    version: str = ""

    @classmethod
    def read(cls, path: Path = DOC) -> DocTables:
        text = path.read_text()
        quantities = [(r[0], r[1]) for r in _section(text, "quantities")]
        layouts = {r[0]: (r[4], r[5]) for r in _section(text, "layouts")}
        tensors = [
            {"kind": r[0], "by": r[1], "pos": int(r[2]), "name": r[3], "layout": r[4], "F": r[5]}
            for r in _section(text, "tensors")
        ]
        keys = _section(text, "key_header")
        version = re.search(r"Protocol version \*\*`([^`]+)`\*\*", text).group(1)
        return cls(
            quantities,
            layouts,
            tensors,
            [r[0] for r in keys if r[1] == "required"],
            {r[0]: r[3] for r in keys if r[1] == "optional"},
            version,
        )

    def message(self, kind: str, by: str) -> list[dict]:
        return sorted((t for t in self.tensors if t["kind"] == kind and t["by"] == by), key=lambda t: t["pos"])


def cdiv(a, b):
    return -(-a // b)


def block(n):
    return next(b for b in (32, 64, 128) if n <= b)


def _eval(formula: str, env: dict):
    return eval(formula, {"cdiv": cdiv, "block": block, "max": max, "__builtins__": {}}, env)


# -- layouts from the formulas --------------------------------------------------------------------


class Packing:
    def __init__(self, tables: DocTables, bundle: dict, n: int) -> None:
        self.tables = tables
        env = {
            "n": n,
            "hidden_size": bundle["hidden_size"],
            "num_heads": bundle["num_heads"],
            "intermediate_size": bundle["intermediate_size"],
            "num_labels": bundle["num_labels"],
            "poly_modulus_degree": bundle["ckks"]["poly_modulus_degree"],
        }
        for name, formula in tables.quantities:
            if formula != "input":
                env[name] = _eval(formula, env)
        self.env = env

    def frames(self, layout: str, F: int | None = None) -> int:
        return int(_eval(self.tables.layouts[layout][1], {**self.env, "F": F}))

    def features(self, tensor: dict) -> int | None:
        return None if tensor["F"] == "-" else int(self.env[tensor["F"]])

    def index(self, layout: str, F: int | None = None) -> np.ndarray:
        """Global slots of every logical index: FM [t, f], SL [h, k, i], TM [h, k, d]."""
        e = self.env
        if layout == "FM":
            grid = {"t": np.arange(e["n"])[:, None], "f": np.arange(F)[None, :], "F": F}
        elif layout == "SL":
            grid = {
                "h": np.arange(e["heads"])[:, None, None],
                "k": np.arange(e["n"])[None, :, None],
                "i": np.arange(e["n"])[None, None, :],
            }
        else:
            grid = {
                "h": np.arange(e["heads"])[:, None, None],
                "k": np.arange(e["n"])[None, :, None],
                "d": np.arange(e["dh"])[None, None, :],
            }
        return np.asarray(_eval(self.tables.layouts[layout][0], {**e, **grid}))

    def pack(self, layout: str, values: np.ndarray, F: int | None = None) -> list[np.ndarray]:
        S, count = self.env["S"], self.frames(layout, F)
        flat = np.zeros(count * S)
        idx = self.index(layout, F)
        flat[idx.ravel()] = np.broadcast_to(values, idx.shape).ravel()
        return [flat[c * S : (c + 1) * S] for c in range(count)]

    def unpack(self, layout: str, vectors: list[np.ndarray], F: int | None = None) -> np.ndarray:
        return np.concatenate(vectors)[self.index(layout, F)]

    def heads_view(self, x: np.ndarray) -> np.ndarray:
        """(n, H) -> [h, token, d]: feature f is position f % dh of head f // dh."""
        return x.reshape(self.env["n"], self.env["heads"], self.env["dh"]).transpose(1, 0, 2)


# -- CBF1 -------------------------------------------------------------------------------------------


def cbf1(frames: list[bytes]) -> bytes:
    out = [b"CBF1", struct.pack("<I", len(frames))]
    for f in frames:
        out += [struct.pack("<Q", len(f)), f]
    return b"".join(out)


def uncbf1(data: bytes) -> list[bytes]:
    assert data[:4] == b"CBF1", "not a CBF1 message"
    (count,) = struct.unpack_from("<I", data, 4)
    pos, frames = 8, []
    for _ in range(count):
        (length,) = struct.unpack_from("<Q", data, pos)
        frames.append(data[pos + 8 : pos + 8 + length])
        pos += 8 + length
    assert pos == len(data), "trailing bytes"
    return frames


# -- SEAL ---------------------------------------------------------------------------------------------


class Seal:
    def __init__(self, ckks: dict) -> None:
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        degree = int(ckks["poly_modulus_degree"])
        parms.set_poly_modulus_degree(degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(degree, list(ckks["coeff_mod_bit_sizes"])))
        self.context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        self.scale = 2.0 ** int(ckks["scale_bits"])
        self.keygen = seal.KeyGenerator(self.context)
        secret = self.keygen.secret_key()
        self.encoder = seal.CKKSEncoder(self.context)
        self.encryptor = seal.Encryptor(self.context, secret)
        self.decryptor = seal.Decryptor(self.context, secret)
        fd, self._path = tempfile.mkstemp(prefix="doc-client-", suffix=".seal")
        os.close(fd)

    def close(self) -> None:
        Path(self._path).unlink(missing_ok=True)

    def _save(self, obj) -> bytes:
        obj.save(self._path)
        return Path(self._path).read_bytes()

    def key_upload(self, bundle: dict, header: dict) -> bytes:
        steps = list(bundle["galois_steps"])
        elements = self.context.key_context_data().galois_tool().get_elts_from_steps(steps)
        relin = self._save(self.keygen.create_relin_keys())
        galois = self._save(self.keygen.create_galois_keys(elements))
        return cbf1([json.dumps(header).encode(), relin, galois])

    def encrypt(self, vectors: list[np.ndarray]) -> list[bytes]:
        out = []
        for v in vectors:
            pt = seal.Plaintext()
            self.encoder.encode(
                np.ascontiguousarray(v, dtype=np.float64), self.context.first_parms_id(), self.scale, pt
            )
            out.append(self._save(self.encryptor.encrypt_symmetric(pt)))
        return out

    def decrypt(self, frames: list[bytes]) -> list[np.ndarray]:
        out = []
        for data in frames:
            Path(self._path).write_bytes(data)
            ct = seal.Ciphertext()
            ct.load(self.context, self._path)
            pt = seal.Plaintext()
            self.decryptor.decrypt(ct, pt)
            out.append(np.asarray(self.encoder.decode_double(pt)))
        return out


# -- embedding (section 10) ---------------------------------------------------------------------------


def embed(tokenizer_json: str, tables: dict[str, np.ndarray], text: str, max_tokens: int) -> np.ndarray:
    """tokenizer_json: the text of the bundle's tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length=max_tokens)
    tok.no_padding()
    ids = np.asarray(tok.encode(text).ids)
    word = tables["embeddings.word.weight"].astype(np.float64)
    pos = tables["embeddings.position.weight"].astype(np.float64)
    x = word[ids] + pos[: len(ids)]
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
    return x * tables["embeddings.norm.weight"].astype(np.float64) + tables["embeddings.norm.bias"].astype(np.float64)


# -- rounds (sections 7 and 11) --------------------------------------------------------------------------


def _products(kind: str, p: Packing, got: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """The client's values per round kind, as the `value` column of the tensors table states them."""
    if kind == "scores":
        q, k = p.heads_view(got["Q~"]), p.heads_view(got["K~"])
        return {"R": float(meta["sigma"]) * np.einsum("hkd,hid->hki", k, q), "K~": k}
    if kind == "context":
        v = p.heads_view(got["V~"])
        out = np.einsum("hki,hke->hie", got["A~"], v).transpose(1, 0, 2).reshape(p.env["n"], p.env["H"])
        return {"P": float(meta["context_scale"]) * out, "A~": got["A~"]}
    if kind == "refresh":
        return {"X~": got["X~"]}
    raise AssertionError(f"unknown round kind {kind!r}")


def answer(tables: DocTables, p: Packing, crypto: Seal, kind: str, meta: dict, frames: list[bytes]) -> list[bytes]:
    sent = tables.message(kind, "server")
    described = {
        side: [
            {
                "tensor": t["name"],
                "layout": t["layout"],
                "features": p.features(t),
                "frames": p.frames(t["layout"], p.features(t)),
            }
            for t in tables.message(kind, by)
        ]
        for side, by in (("send", "server"), ("reply", "client"))
    }
    assert meta.get("tensors") == described, f"{kind}: the round describes {meta.get('tensors')}, the doc {described}"
    expected = sum(p.frames(t["layout"], p.features(t)) for t in sent)
    assert len(frames) == expected, f"{kind}: {len(frames)} frames, the doc says {expected}"
    vectors, got, pos = crypto.decrypt(frames), {}, 0
    for t in sent:
        count = p.frames(t["layout"], p.features(t))
        got[t["name"]] = p.unpack(t["layout"], vectors[pos : pos + count], p.features(t))
        pos += count
    values = _products(kind, p, got, meta)
    reply: list[np.ndarray] = []
    for t in tables.message(kind, "client"):
        reply += p.pack(t["layout"], values[t["name"]], p.features(t))
    return crypto.encrypt(reply)


def logits(crypto: Seal, frames: list[bytes]) -> np.ndarray:
    return np.array([v[0] for v in crypto.decrypt(frames)])


def token_logits(tables: DocTables, p: Packing, crypto: Seal, meta: dict, frames: list[bytes]) -> np.ndarray:
    """A token-classification model's (n, num_labels) logits, read as the doc's token_logits row says."""
    (t,) = tables.message("token_logits", "server")
    F = p.features(t)
    described = {"send": [{"tensor": t["name"], "layout": t["layout"], "features": F,
                           "frames": p.frames(t["layout"], F)}], "reply": []}
    assert meta.get("tensors") == described, f"token_logits: the server describes {meta.get('tensors')}"
    assert len(frames) == p.frames(t["layout"], F)
    return p.unpack(t["layout"], crypto.decrypt(frames), F)
