"""Named labels and token classification through a real uvicorn server, the real engine and the SDK.

One server holds a tiny token model and a tiny six-class model with named labels; the SDK tags and
classifies encrypted, and the results must be the plaintext model's (the same grouping code run on the
PyTorch logits), with the label names from config.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cipherbert.launch import REPO, start_server
from clients import tagging
from clients.sdk import CipherbertError, Client
from he_models.client import Embedder
from tests.support.token_fixtures import (
    NER_LABELS,
    TREC_LABELS,
    make_named_text_model,
    make_token_model,
    plaintext_logits,
)

KEY = "ner-key-0001"
TEXTS = ["John Smith flew from Paris to New York with Acme Corp.", "Unbelievable: Zürich's café-owners strike!"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ner")
    models = tmp / "models"
    make_token_model(models / "tiny-ner")
    make_named_text_model(models / "tiny-trec")
    proc = start_server(tmp, api_keys=f"acme:{KEY}", models_dir=models, workers=1, env={"CIPHERBERT_RATE_LIMIT": "off"})
    proc.extra["models"] = models
    yield proc
    proc.stop()


def plaintext_tag(model_dir, text: str, strategy: str) -> tuple[list[dict], np.ndarray]:
    embedder = Embedder.from_model_dir(model_dir)
    enc = embedder.encode(text)
    logits = plaintext_logits(model_dir, embedder.embed_ids(enc.ids))
    pieces = tagging.pieces_of(enc)
    return tagging.aggregate(pieces, logits, NER_LABELS, text, strategy, join=embedder.tokenizer.decoder.decode), logits


def test_tag_matches_plaintext_entities(server, tmp_path):
    model_dir = server.extra["models"] / "tiny-ner"
    with Client(server.url, KEY, model="tiny-ner", cache_dir=tmp_path) as client:
        assert client.task() == "token-classification"
        for text, strategy in zip(TEXTS, ("simple", "first"), strict=True):
            result = client.tag(text, aggregation_strategy=strategy)
            want, ref = plaintext_tag(model_dir, text, strategy)
            assert np.abs(np.array(result.logits) - ref).max() < 1e-3 * np.abs(ref).max()
            assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in result.entities] == [
                (e["entity_group"], e["start"], e["end"], e["word"]) for e in want
            ]
            assert all(abs(a["score"] - b["score"]) < 1e-3 for a, b in zip(result.entities, want, strict=True))
            assert result.entities, "the random model should find some entities"
            assert result.labels == NER_LABELS and result.rounds == 4
            assert len(result.tokens) == result.n_tokens - 2  # every piece but [CLS] and [SEP]
            assert {w["entity"] for w in result.words} <= set(NER_LABELS)
            first_word = result.words[0]
            assert text[first_word["start"] : first_word["end"]] == re.match(r"\w+", text).group()
        with pytest.raises(CipherbertError, match="does token-classification") as err:
            client.classify(TEXTS[0])
        assert err.value.code == "wrong_task"


def test_named_multiclass_labels_come_back_from_classify(server, tmp_path):
    model_dir = server.extra["models"] / "tiny-trec"
    with Client(server.url, KEY, model="tiny-trec", cache_dir=tmp_path) as client:
        bundle, _ = client.bundle()
        assert bundle["labels"] == TREC_LABELS and bundle["task"] == "text-classification"
        for text in ("How far is it from Denver to Aspen?", "Who wrote Hamlet?"):
            result = client.classify(text)
            ref = plaintext_logits(model_dir, Embedder.from_model_dir(model_dir).embed(text))
            assert result.label == TREC_LABELS[int(np.argmax(ref))]
            assert np.abs(np.array(result.logits) - ref).max() < max(1e-2, 1e-3 * np.abs(ref).max())
        with pytest.raises(CipherbertError, match="Client.classify"):
            client.tag("Who wrote Hamlet?")
    models = {m["model_id"]: m for m in Client(server.url, KEY, cache_dir=tmp_path).models()}
    assert models["tiny-trec"]["labels"] == TREC_LABELS and models["tiny-ner"]["labels"] == NER_LABELS


def test_cli_tag_and_classify_choose_by_task(server, tmp_path):
    base = ["--url", server.url, "--api-key", KEY, "--cache-dir", str(tmp_path), "--model", "tiny-ner", "-q"]
    run = subprocess.run(
        [sys.executable, "-m", "cipherbert.cli", "tag", *base, "--json", TEXTS[0]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),
    )
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert row["text"] == TEXTS[0] and row["entities"] and row["aggregation_strategy"] == "simple"
    assert set(row["entities"][0]) == {"entity_group", "word", "start", "end", "score"}
    run = subprocess.run(
        [sys.executable, "-m", "cipherbert.cli", "classify", *base, TEXTS[0]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ),
    )
    assert run.returncode == 0, run.stderr
    first = row["entities"][0]
    assert f"[{first['start']}:{first['end']}]" in run.stdout


@pytest.mark.slow
def test_shipped_conll_model_tags_encrypted_as_in_plaintext(tmp_path):
    """models/he-bert-tiny-conll served for real: entities of the encrypted run equal the plaintext model's."""
    model_dir = REPO / "models" / "he-bert-tiny-conll"
    if not (model_dir / "model.safetensors").exists():
        pytest.skip("models/he-bert-tiny-conll is not in this checkout")
    proc = start_server(tmp_path, api_keys=f"acme:{KEY}", models=[str(model_dir)], workers=1,
                        env={"CIPHERBERT_RATE_LIMIT": "off"})
    text = "Angela Merkel met Emmanuel Macron in Paris to talk about Airbus and the European Union."
    try:
        with Client(proc.url, KEY, model="he-bert-tiny-conll", cache_dir=tmp_path / "c") as client:
            bundle, _ = client.bundle()
            labels = bundle["labels"]
            result = client.tag(text)
    finally:
        proc.stop()
    assert bundle["task"] == "token-classification" and "B-PER" in labels and labels[0] == "O"
    embedder = Embedder.from_model_dir(model_dir)
    enc = embedder.encode(text)
    ref = plaintext_logits(model_dir, embedder.embed_ids(enc.ids))
    want = tagging.aggregate(tagging.pieces_of(enc), ref, labels, text, "simple", join=embedder.tokenizer.decoder.decode)
    assert [(e["entity_group"], e["start"], e["end"]) for e in result.entities] == [
        (e["entity_group"], e["start"], e["end"]) for e in want
    ]
    assert {"PER", "LOC"} <= {e["entity_group"] for e in result.entities}
