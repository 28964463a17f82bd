"""A small real engine for the engine's unit tests: one layer, hidden 32, real TenSEAL at N=8192.

Built once per test process (functools.cache), so every engine test file shares one model, one engine
and one client key set; each loads in well under a second.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

from he_models.client import ClientKeys, answer_round, decrypt_logits, encrypt_embeddings
from he_models.engine import EncryptedEngine, EvalContext, StepOutput

SECRET = b"engine-unit-test-secret-000"
SMALL = {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "max_position": 40, "num_layers": 1}


@functools.cache
def small_model_dir() -> Path:
    from tests.conftest import make_random_model_dir

    return make_random_model_dir(Path(tempfile.mkdtemp(prefix="cipherbert-small-")), seed=3, **SMALL)


@functools.cache
def small_engine() -> EncryptedEngine:
    return EncryptedEngine.load(small_model_dir(), SECRET)


@functools.cache
def small_client() -> tuple[ClientKeys, EvalContext]:
    engine = small_engine()
    bundle = engine.client_bundle()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    return keys, engine.load_context(keys.public_keys_bytes())


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    hidden = SMALL["hidden_size"]
    return np.random.default_rng(seed).normal(size=(n, hidden)) * 0.5


def first_step(engine: EncryptedEngine, keys: ClientKeys, ctx: EvalContext, n: int, inference_id: str) -> StepOutput:
    geo = engine.geometry(n)
    return engine.start(ctx, inference_id, n, encrypt_embeddings(keys, embeddings(n), geo))


def run_protocol(
    engine: EncryptedEngine, keys: ClientKeys, ctx: EvalContext, emb: np.ndarray, inference_id: str
) -> tuple[np.ndarray, list[StepOutput]]:
    """The client loop; returns the logits and every StepOutput on the way."""
    geo = engine.geometry(emb.shape[0])
    out = engine.start(ctx, inference_id, emb.shape[0], encrypt_embeddings(keys, emb, geo))
    steps = [out]
    while not out.done:
        replies = answer_round(keys, out.kind, out.meta, out.to_client)
        out = engine.resume(ctx, out.state, replies, inference_id=inference_id, round_no=out.round)
        steps.append(out)
    return decrypt_logits(keys, out.meta, out.to_client), steps
