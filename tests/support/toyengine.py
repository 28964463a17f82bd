"""A toy engine with the same API as he_models.engine / he_models.client, for fast service tests.

It is not the product: a real CKKS computation small enough for tests (N=4096) that exercises every
part of the protocol the service and SDK drive: a public-context check, one masked refresh round, then
encrypted logits. Model: logits = W (a * mean_i x_i) + b over a tiny hashed vocabulary.
`make_toy_model(dir)` writes a model directory; `CIPHERBERT_ENGINE=tests.support.toyengine:ToyEngine` loads it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from pathlib import Path

import numpy as np
import tenseal as ts

from he_models.engine import EngineError, StepOutput  # the same contract as the real engine

POLY_N = 4096
COEFF_BITS = [38, 30, 40]
SCALE_BITS = 30


def make_toy_model(directory: str | Path, name: str = "toy", hidden: int = 8, vocab: int = 64,
                   seed: int = 0) -> Path:
    directory = Path(directory) / name
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(directory / "embeddings.npy", rng.normal(0, 1, (vocab, hidden)).astype(np.float64))
    weights = {"a": rng.normal(0, 1, hidden).tolist(), "W": rng.normal(0, 1, (2, hidden)).tolist(),
               "b": rng.normal(0, 0.1, 2).tolist()}
    (directory / "weights.json").write_text(json.dumps(weights))
    (directory / "config.json").write_text(json.dumps({"toy": True, "hidden": hidden, "vocab": vocab,
                                                       "labels": ["negative", "positive"], "max_tokens": 16}))
    return directory


def _tokens(text: str, vocab: int, max_tokens: int) -> list[int]:
    words = re.findall(r"\w+|[^\w\s]", text.lower()) or [""]
    return [int.from_bytes(hashlib.sha256(w.encode()).digest()[:4], "little") % vocab for w in words][:max_tokens]


class ToyEngine:
    def __init__(self, model_dir: Path, server_secret: bytes) -> None:
        self.dir = Path(model_dir)
        self.config = json.loads((self.dir / "config.json").read_text())
        w = json.loads((self.dir / "weights.json").read_text())
        self.a, self.W, self.b = np.array(w["a"]), np.array(w["W"]), np.array(w["b"])
        self.hidden = int(self.config["hidden"])
        self.max_tokens = int(self.config["max_tokens"])
        self.model_id = self.dir.name
        h = hashlib.sha256()
        for name in ("config.json", "weights.json", "embeddings.npy"):
            h.update((self.dir / name).read_bytes())
        self.model_hash = h.hexdigest()
        self.secret = server_secret

    @classmethod
    def load(cls, model_dir, server_secret: bytes, warm=()) -> ToyEngine:
        return cls(Path(model_dir), server_secret)

    def client_bundle(self) -> dict:
        return {"model_id": self.model_id, "model_hash": self.model_hash, "client_module": "tests.support.toyengine",
                "ckks": {"poly_modulus_degree": POLY_N, "coeff_mod_bit_sizes": COEFF_BITS,
                         "scale_bits": SCALE_BITS},
                "galois_steps": [], "hidden_size": self.hidden, "max_tokens": self.max_tokens,
                "num_labels": 2, "labels": self.config["labels"], "vocab": self.config["vocab"],
                "rounds": 1, "round_kinds": ["refresh"]}

    def client_bundle_files(self) -> dict[str, Path]:
        return {"embeddings.npy": self.dir / "embeddings.npy", "config.json": self.dir / "config.json"}

    def load_context(self, public_context: bytes):
        try:
            ctx = ts.context_from(bytes(public_context))
        except Exception as exc:
            raise EngineError(f"not a serialized TenSEAL context: {exc}") from None
        if ctx.has_secret_key() or ctx.is_private():
            raise EngineError("the uploaded context contains a secret key; upload the public context only")
        n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
        if n != POLY_N:
            raise EngineError(f"context has poly_modulus_degree {n}, the model needs {POLY_N}")
        if not ctx.has_galois_keys() or not ctx.has_relin_keys():
            raise EngineError("context lacks Galois or relinearization keys")
        ctx.global_scale = 2 ** SCALE_BITS
        return ctx

    def _mask(self, inference_id: str, round: int) -> np.ndarray:
        seed = hmac.new(self.secret, f"{inference_id}|{round}".encode(), hashlib.sha256).digest()
        return np.random.default_rng(int.from_bytes(seed[:8], "little")).uniform(-20, 20, self.hidden)

    def _vec(self, ctx, data: bytes, what: str):
        try:
            vec = ts.ckks_vector_from(ctx, bytes(data))
        except Exception as exc:
            raise EngineError(f"{what} is not a ciphertext for this context: {exc}") from None
        if vec.size() != self.hidden:
            raise EngineError(f"{what} holds {vec.size()} values, expected {self.hidden}")
        return vec

    def start(self, ctx, inference_id: str, n_tokens: int, inputs: list[bytes]) -> StepOutput:
        if not 1 <= n_tokens <= self.max_tokens:
            raise EngineError(f"n_tokens must be in 1..{self.max_tokens}")
        if len(inputs) != n_tokens:
            raise EngineError(f"expected {n_tokens} ciphertexts (one per token), got {len(inputs)}")
        vecs = [self._vec(ctx, b, f"ciphertext {i}") for i, b in enumerate(inputs)]
        total = vecs[0]
        for v in vecs[1:]:
            total = total + v
        try:
            y = total * (self.a / n_tokens).tolist() + self._mask(inference_id, 1).tolist()
        except Exception as exc:
            raise EngineError(f"ciphertexts cannot be evaluated (wrong level or scale?): {exc}") from None
        state = json.dumps({"inference_id": inference_id, "round": 1, "n_tokens": n_tokens}).encode()
        return StepOutput(inference_id, 1, False, [y.serialize()], state, "refresh", {"size": self.hidden})

    def resume(self, ctx, state: bytes, replies: list[bytes], *, inference_id: str | None = None,
               round_no: int | None = None) -> StepOutput:
        try:
            st = json.loads(state)
        except Exception:
            raise EngineError("corrupt state") from None
        if inference_id is not None and inference_id != st["inference_id"]:
            raise EngineError("reply for another inference")
        if round_no is not None and round_no != st["round"]:
            raise EngineError(f"reply to round {round_no}, state awaits round {st['round']}")
        if len(replies) != 1:
            raise EngineError(f"expected 1 refreshed ciphertext, got {len(replies)}")
        z = self._vec(ctx, replies[0], "refreshed ciphertext")
        # Remove the mask after the linear map (W z - W r): TenSEAL's mm expects a replicated vector.
        offset = self.b - self.W @ self._mask(st["inference_id"], st["round"])
        try:
            logits = [(z.mm(self.W.T.tolist()) + offset.tolist()).serialize()]
        except Exception as exc:
            raise EngineError(f"refreshed ciphertext cannot be evaluated: {exc}") from None
        return StepOutput(st["inference_id"], st["round"] + 1, True, logits, None, "logits",
                          {"num_labels": len(self.b)})

    def plaintext_logits(self, embeddings: np.ndarray) -> np.ndarray:
        return self.W @ (self.a * embeddings.mean(axis=0)) + self.b


# ----------------------------------------------------------------------------------- client half

class ClientKeys:
    def __init__(self, ctx) -> None:
        self.ctx = ctx

    @classmethod
    def generate(cls, params: dict, galois_steps: list[int]) -> ClientKeys:
        ck = params
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, ck["poly_modulus_degree"], coeff_mod_bit_sizes=ck["coeff_mod_bit_sizes"])
        ctx.global_scale = 2 ** ck["scale_bits"]
        ctx.generate_galois_keys()
        return cls(ctx)

    def public_keys_bytes(self) -> bytes:
        return self.ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                  save_relin_keys=True)

    def save(self, path) -> None:
        Path(path).write_bytes(self.ctx.serialize(save_secret_key=True))

    @classmethod
    def load(cls, path) -> ClientKeys:
        ctx = ts.context_from(Path(path).read_bytes())
        ctx.global_scale = 2 ** SCALE_BITS
        return cls(ctx)


def encrypt_embeddings(keys: ClientKeys, embeddings: np.ndarray, geometry=None) -> list[bytes]:
    return [ts.ckks_vector(keys.ctx, row.tolist()).serialize() for row in np.asarray(embeddings)]


def answer_round(keys: ClientKeys, kind: str, meta: dict, to_client: list[bytes], geometry=None) -> list[bytes]:
    return [ts.ckks_vector(keys.ctx, ts.ckks_vector_from(keys.ctx, b).decrypt()).serialize() for b in to_client]


def decrypt_logits(keys: ClientKeys, meta: dict, to_client: list[bytes], num_labels=None) -> np.ndarray:
    return np.array(ts.ckks_vector_from(keys.ctx, to_client[0]).decrypt())


class Embedder:
    def __init__(self, bundle_dir) -> None:
        self.dir = Path(bundle_dir)
        self.table = np.load(self.dir / "embeddings.npy")
        self.config = json.loads((self.dir / "config.json").read_text())

    def embed(self, text: str) -> np.ndarray:
        return self.table[_tokens(text, self.table.shape[0], int(self.config["max_tokens"]))]


class ToyClientHalf:
    """This stand-in's client half, for the SDK: `Client(url, key, client_half=ToyClientHalf())`."""

    module = "tests.support.toyengine"

    def generate_keys(self, ckks: dict, galois_steps: list[int]) -> ClientKeys:
        return ClientKeys.generate(ckks, galois_steps)

    def load_keys(self, path) -> ClientKeys:
        return ClientKeys.load(path)

    def embedder(self, bundle: dict, bundle_dir) -> Embedder:
        return Embedder(bundle_dir)

    def geometry(self, bundle: dict, n_tokens: int) -> None:
        return None

    encrypt_embeddings = staticmethod(encrypt_embeddings)
    answer_round = staticmethod(answer_round)
    decrypt_logits = staticmethod(decrypt_logits)


def toy_client(base_url, api_key: str, **kwargs):
    """An SDK client for a server running this stand-in: the SDK with this module's client half injected."""
    from clients.sdk import Client

    return Client(base_url, api_key, client_half=ToyClientHalf(), **kwargs)
