"""The assistant process (he_models.assistant): same results as running here, and survives its death."""

from __future__ import annotations

import numpy as np

from he_models.assistant import Assistant, Splitter, from_wire, to_wire
from he_models.ckks import load_ciphertext, save_bytes
from tests.support.engine_fixtures import SECRET, embeddings, run_protocol, small_client, small_engine, small_model_dir


def _inputs(engine, keys, n):
    geo = engine.geometry(n)
    raw = [load_ciphertext(engine.backend.context, b) for b in keys.encrypt(geo.pack_fm(embeddings(n)))]
    return geo, raw


def test_part_arguments_cross_the_pipe_unchanged():
    engine = small_engine()
    keys, _ = small_client()
    geo, raw = _inputs(engine, keys, 5)
    back = from_wire(engine.backend.context, to_wire({"geo": geo, "layer": 0, "raw": raw, "which": "v"}))
    assert back["geo"] == geo and back["layer"] == 0 and back["which"] == "v"
    assert [save_bytes(c) for c in back["raw"]] == [save_bytes(c) for c in raw]


def test_assistant_runs_a_part_exactly_as_this_process_does():
    engine = small_engine()
    keys, ctx = small_client()
    geo, raw = _inputs(engine, keys, 9)
    kwargs = {"geo": geo, "layer": 0, "raw": raw, "which": "v"}
    assistant = Assistant(engine.parts, engine.load_context)
    try:
        remote = assistant.submit(ctx, "qkv", kwargs)()
        again = assistant.submit(ctx, "qkv", kwargs)()  # keys were sent once and cached there
    finally:
        assistant.close()
    local = engine.parts.run(ctx, "qkv", kwargs)
    assert [save_bytes(c) for c in remote] == [save_bytes(c) for c in local] == [save_bytes(c) for c in again]


def test_splitter_prefers_the_whole_computation_without_an_assistant():
    engine = small_engine()
    _, ctx = small_client()
    calls = []
    splitter = Splitter(engine.parts)
    result = splitter.split(ctx, ("qkv", {}), lambda: calls.append("local"), lambda: ("whole", None))
    assert result == ("whole", None) and calls == []


def test_engine_carries_on_when_the_assistant_dies():
    from he_models.engine import EncryptedEngine

    engine = EncryptedEngine.load(small_model_dir(), SECRET, workers=2)
    try:
        keys, _ = small_client()
        ctx = engine.load_context(keys.public_keys_bytes())
        emb = embeddings(6, seed=4)
        before, _ = run_protocol(engine, keys, ctx, emb, "alive")
        assert engine.has_assistant
        assistant = engine.splitter.assistant
        assert assistant is not None
        assistant._proc.kill()
        assistant._proc.join()
        after, _ = run_protocol(engine, keys, ctx, emb, "dead")
        assert not engine.has_assistant  # noticed, and finished alone
        single, _ = run_protocol(small_engine(), keys, small_client()[1], emb, "single")
        assert np.abs(before - single).max() < 1e-3 and np.abs(after - single).max() < 1e-3
    finally:
        engine.close()
