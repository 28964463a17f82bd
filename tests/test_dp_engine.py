"""A DP-fine-tuned model is served unchanged by the encrypted engine and agrees with plaintext."""

from __future__ import annotations

import csv
import random

import numpy as np
import torch

from cipherbert.data import load_sms_spam
from dp_training.__main__ import main as dp_main
from he_models.client import ClientKeys, Embedder, answer_round, decrypt_logits, encrypt_embeddings
from he_models.engine import EncryptedEngine
from he_models.model import HEFriendlyBert
from tests.support.dp_fixtures import make_random_base


def test_dp_finetuned_model_runs_encrypted(tmp_path):
    examples = load_sms_spam()
    rng = random.Random(1)
    rows = rng.sample([e for e in examples if e.label == 1], 12) + rng.sample(
        [e for e in examples if e.label == 0], 28)
    base = make_random_base(tmp_path / "base", texts=[e.text for e in examples[:600]], vocab_size=300,
                            hidden_size=32, num_heads=2, intermediate_size=64, max_position=32)
    data = tmp_path / "sms.csv"
    with open(data, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([e.text, e.label] for e in rows)
    out = tmp_path / "dp-model"
    assert dp_main(["--data", str(data), "--base", str(base), "--out", str(out), "--epochs", "1",
                    "--epsilon", "8", "--batch-size", "16", "--physical-batch-size", "8", "--quiet",
                    "--max-length", "24"]) == 0

    engine = EncryptedEngine.load(out, b"dp-engine-test-secret-000")
    bundle = engine.client_bundle()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    ctx = engine.load_context(keys.public_keys_bytes())
    embedder = Embedder.from_model_dir(out)
    model = HEFriendlyBert.from_pretrained(out)
    for i, text in enumerate(["WINNER!! claim your free prize now, call 0800", "see you at lunch tomorrow?"]):
        emb = embedder.embed(text)
        geo = engine.geometry(emb.shape[0])
        step = engine.start(ctx, f"dp-{i}", emb.shape[0], encrypt_embeddings(keys, emb, geo))
        while not step.done:
            replies = answer_round(keys, step.kind, step.meta, step.to_client)
            step = engine.resume(ctx, step.state, replies, round_no=step.round)
        logits = decrypt_logits(keys, step.meta, step.to_client)
        with torch.no_grad():
            plain = model.forward_embedded(torch.tensor(emb, dtype=torch.float32)[None],
                                           torch.ones(1, emb.shape[0])).logits[0].numpy()
        assert np.abs(logits - plain).max() < 1e-2
        assert logits.argmax() == plain.argmax()
