"""Token classification in the engine: per-token logits under CKKS, the plan's task check, the label map.

Real TenSEAL on a tiny random token model (tests/support/token_fixtures.py); the encrypted logits are
compared with the PyTorch model's on the same client-side embeddings.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from he_models import protocol_spec
from he_models.client import (
    ClientKeys,
    Embedder,
    ProtocolViolation,
    answer_round,
    decrypt_token_logits,
    encrypt_embeddings,
)
from he_models.config import HEConfig
from he_models.engine import EncryptedEngine, EngineError
from he_models.plan import PlanError, compile_plan, simulate
from tests.support.token_fixtures import NER_LABELS, make_legacy_labels_model, make_token_model, plaintext_logits

SECRET = b"token-engine-test-secret-0001"


@functools.cache
def token_setup() -> tuple[Path, EncryptedEngine, ClientKeys]:
    directory = make_token_model(Path(tempfile.mkdtemp(prefix="cipherbert-ner-")) / "tiny-ner")
    engine = EncryptedEngine.load(directory, SECRET)
    bundle = engine.client_bundle()
    return directory, engine, ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])


def encrypted_token_logits(n_text: str) -> tuple[np.ndarray, np.ndarray, object]:
    directory, engine, keys = token_setup()
    ctx = engine.load_context(keys.public_keys_bytes())
    emb = Embedder.from_model_dir(directory).embed(n_text)
    geo = engine.geometry(emb.shape[0])
    out = engine.start(ctx, "t1", emb.shape[0], encrypt_embeddings(keys, emb, geo))
    while not out.done:
        out = engine.resume(ctx, out.state, answer_round(keys, out.kind, out.meta, out.to_client), round_no=out.round)
    logits = decrypt_token_logits(keys, out.meta, out.to_client, num_labels=len(NER_LABELS), geometry=geo)
    return logits, emb, out


@pytest.mark.parametrize("text", ["John Smith lives in Paris .", " ".join(["Berlin"] * 36)])
def test_token_logits_match_plaintext_per_token(text):
    """n x labels logits, no pooling; 36 words give two 32-token chunks."""
    directory, engine, _ = token_setup()
    logits, emb, out = encrypted_token_logits(text)
    ref = plaintext_logits(directory, emb)
    assert logits.shape == ref.shape == (emb.shape[0], len(NER_LABELS))
    assert np.abs(logits - ref).max() < 1e-3 * np.abs(ref).max()  # CKKS: ~1e-4 relative, seen up to 3e-4
    assert (logits.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(simulate(engine.plan, emb).logits - ref).max() < 1e-4
    assert out.kind == "token_logits" and out.meta["labels"] == NER_LABELS
    env = protocol_spec.env_of_geometry(out.meta["geometry"], len(NER_LABELS))
    assert len(out.to_client) == protocol_spec.message_frames("token_logits", "server", env) == env["C"]


def test_token_bundle_announces_task_and_names():
    directory, engine, _ = token_setup()
    bundle = engine.client_bundle()
    assert bundle["task"] == "token-classification"
    assert bundle["labels"] == NER_LABELS
    assert bundle["id2label"] == {str(i): name for i, name in enumerate(NER_LABELS)}
    assert bundle["round_kinds"] == ["scores", "context", "refresh", "refresh"]
    saved = json.loads((directory / "config.json").read_text())
    assert saved["task"] == "token-classification" and saved["id2label"]["1"] == "B-PER"
    assert HEConfig.load(directory).label2id["I-ORG"] == 6
    assert engine.plan.summary()["task"] == "token-classification"


def test_client_refuses_token_logits_that_do_not_describe_the_sentence():
    _, engine, keys = token_setup()
    logits, emb, out = encrypted_token_logits("Anna met Bob")
    wrong = engine.geometry(emb.shape[0] + 1)
    with pytest.raises(ProtocolViolation, match="packs for"):
        decrypt_token_logits(keys, out.meta, out.to_client, num_labels=len(NER_LABELS), geometry=wrong)
    with pytest.raises(ProtocolViolation, match="describes"):
        decrypt_token_logits(keys, out.meta, out.to_client, num_labels=len(NER_LABELS) + 1)
    with pytest.raises(ProtocolViolation, match="ciphertexts"):
        decrypt_token_logits(keys, out.meta, out.to_client * 2, num_labels=len(NER_LABELS))


def test_plan_checks_the_head_against_the_task(tmp_path):
    directory = make_token_model(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config.update(num_labels=3, id2label={"0": "O", "1": "B-X", "2": "I-X"}, label2id={})
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match="classifier weight has shape"):
        compile_plan(directory, calibration=[np.zeros((3, 32))])
    with pytest.raises(EngineError, match="cannot serve"):
        EncryptedEngine.load(directory, SECRET)


def test_old_models_keep_their_labels_json(tmp_path):
    """config.json without id2label (written before names existed): labels.json still names the labels."""
    directory = make_legacy_labels_model(tmp_path / "old", ["spam", "ham", "eggs"])
    engine = EncryptedEngine.load(directory, SECRET)
    bundle = engine.client_bundle()
    assert bundle["labels"] == ["spam", "ham", "eggs"] and bundle["task"] == "text-classification"
    (directory / "labels.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(PlanError, match="names 2 labels"):
        engine.client_bundle()
