"""Packed short sentences: block-diagonal attention and per-sentence logits, against plaintext and against
running each sentence alone (small engine, real TenSEAL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from he_models.client import answer_round, decrypt_segment_logits, encrypt_embeddings
from he_models.engine import EngineError
from he_models.model import HEFriendlyBert
from he_models.packing import score_weights
from tests.support.engine_fixtures import embeddings, run_protocol, small_client, small_engine, small_model_dir


def packed_logits(lengths: list[int], inference_id: str) -> tuple[np.ndarray, list[np.ndarray]]:
    engine = small_engine()
    keys, ctx = small_client()
    parts = [embeddings(n, seed=10 + i) for i, n in enumerate(lengths)]
    emb = np.concatenate(parts)
    geo = engine.geometry(emb.shape[0])
    out = engine.start(ctx, inference_id, emb.shape[0], encrypt_embeddings(keys, emb, geo), segments=lengths)
    while not out.done:
        replies = answer_round(keys, out.kind, out.meta, out.to_client)
        out = engine.resume(ctx, out.state, replies, inference_id=inference_id, round_no=out.round)
    assert out.meta["segments"] == lengths
    return decrypt_segment_logits(keys, out.meta, out.to_client, len(lengths)), parts


def plaintext_logits(emb: np.ndarray) -> np.ndarray:
    model = HEFriendlyBert.from_pretrained(small_model_dir())
    with torch.no_grad():
        x = torch.tensor(emb, dtype=torch.float32)[None]
        return model.forward_embedded(x, torch.ones(1, emb.shape[0])).logits[0].numpy()


def test_packed_sentences_match_plaintext_and_single_runs():
    logits, parts = packed_logits([5, 7, 4], "packed-3")
    engine = small_engine()
    keys, ctx = small_client()
    tolerance = 2e-4  # the small random model's logits are ~1e-2: a tight bound tells sentences apart
    mixed = plaintext_logits(np.concatenate(parts))  # one 16-token sentence: attention across all of it
    assert max(np.abs(plaintext_logits(p) - mixed).max() for p in parts) > 10 * tolerance
    for s, emb in enumerate(parts):
        alone, _ = run_protocol(engine, keys, ctx, emb, f"alone-{s}")
        assert np.abs(logits[s] - plaintext_logits(emb)).max() < tolerance
        assert np.abs(logits[s] - alone).max() < tolerance


def test_segments_must_cover_the_tokens():
    engine = small_engine()
    keys, ctx = small_client()
    geo = engine.geometry(9)
    inputs = encrypt_embeddings(keys, embeddings(9), geo)
    for bad in ([4, 4], [9, 0], [3, 7]):
        with pytest.raises(EngineError):
            engine.start(ctx, "bad-segments", 9, inputs, segments=bad)


def test_score_weights_are_block_diagonal_with_each_sentence_scale():
    w = score_weights((2, 3))
    assert w.shape == (5, 5)
    assert w[0, 1] == pytest.approx(np.sqrt(5 / 2)) and w[3, 4] == pytest.approx(np.sqrt(5 / 3))
    assert w[1, 2] == 0 and w[4, 0] == 0


def test_packed_sentences_split_with_the_assistant_process():
    from he_models.assistant import Assistant

    engine = small_engine()
    alone, _ = packed_logits([6, 3], "packed-split")
    engine.splitter.assistant = Assistant(engine.parts, engine.load_context)
    try:
        split, _ = packed_logits([6, 3], "packed-split")
    finally:
        engine.close()
    assert np.abs(split - alone).max() < 2e-4


def test_attention_masks_are_narrow_between_sentences_only():
    from he_models.packing import CROSS_MASK_FACTOR, attention_mask_factor

    f = attention_mask_factor((2, 1))
    assert f[0, 1] == 1.0 and f[2, 2] == 1.0
    assert f[0, 2] == CROSS_MASK_FACTOR and f[2, 1] == CROSS_MASK_FACTOR
