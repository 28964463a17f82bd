"""The round state machine (he_models.rounds): the sequence of rounds, what each one announces, and the
transitions it refuses. Runs the small real engine of tests/support/engine_fixtures.py."""

from __future__ import annotations

import numpy as np
import pytest

from he_models import protocol_spec
from he_models.client import answer_round, decrypt_logits
from he_models.engine import EngineError
from he_models.layout import PROTOCOL
from he_models.plan import simulate
from he_models.rounds import MAX_INFERENCE_ID, ROUNDS_PER_LAYER
from tests.support.engine_fixtures import embeddings, first_step, run_protocol, small_client, small_engine

KINDS = ["scores", "context", "refresh", "refresh"]


@pytest.fixture(scope="module")
def transcript():
    engine = small_engine()
    keys, ctx = small_client()
    emb = embeddings(7, seed=11)
    logits, steps = run_protocol(engine, keys, ctx, emb, "rounds-1")
    return emb, logits, steps


def test_rounds_follow_the_layer_schedule_and_end_in_logits(transcript):
    emb, logits, steps = transcript
    layers = len(small_engine().plan.layers)
    assert [s.kind for s in steps[:-1]] == KINDS * layers
    assert [s.round for s in steps] == list(range(1, ROUNDS_PER_LAYER * layers + 2))
    assert [s.done for s in steps] == [False] * (len(steps) - 1) + [True]
    last = steps[-1]
    assert last.kind == "logits" and last.state is None and len(last.to_client) == last.meta["num_labels"]
    assert np.abs(logits - simulate(small_engine().plan, emb).logits).max() < 1e-2


def test_every_round_announces_its_tensors_geometry_and_protocol(transcript):
    _, _, steps = transcript
    for step in steps[:-1]:
        assert step.meta["protocol"] == PROTOCOL
        assert step.meta["geometry"]["n"] == 7
        assert step.meta["tensors"] == protocol_spec.round_tensors(step.kind, step.meta["geometry"])
        assert step.inference_id == "rounds-1" and step.state
    assert steps[-1].meta["protocol"] == PROTOCOL


def test_each_round_resumes_only_from_its_own_state():
    engine = small_engine()
    keys, ctx = small_client()
    out = first_step(engine, keys, ctx, 5, "rounds-2")
    replies = answer_round(keys, out.kind, out.meta, out.to_client)
    with pytest.raises(EngineError, match="awaits round 1"):
        engine.resume(ctx, out.state, replies, inference_id="rounds-2", round_no=2)
    with pytest.raises(EngineError, match="does not match the stored inference"):
        engine.resume(ctx, out.state, replies, inference_id="another", round_no=1)
    nxt = engine.resume(ctx, out.state, replies, inference_id="rounds-2", round_no=1)
    assert nxt.round == 2 and nxt.kind == "context"
    # the state is immutable: replaying round 1's state gives round 2 again, never round 3
    again = engine.resume(ctx, out.state, replies, inference_id="rounds-2", round_no=1)
    assert again.round == 2


def test_a_reply_with_other_keys_is_refused():
    from he_models.client import ClientKeys

    engine = small_engine()
    keys, ctx = small_client()
    out = first_step(engine, keys, ctx, 5, "rounds-3")
    bundle = engine.client_bundle()
    other = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    other_ctx = engine.load_context(other.public_keys_bytes())
    with pytest.raises(EngineError, match="different evaluation keys"):
        engine.resume(other_ctx, out.state, answer_round(keys, out.kind, out.meta, out.to_client))


@pytest.mark.parametrize("inference_id", ["", "x" * (MAX_INFERENCE_ID + 1)])
def test_inference_ids_are_bounded(inference_id):
    engine = small_engine()
    keys, ctx = small_client()
    with pytest.raises(EngineError, match="inference id"):
        first_step(engine, keys, ctx, 5, inference_id)


def test_two_inferences_interleave_without_mixing():
    engine = small_engine()
    keys, ctx = small_client()
    a_emb, b_emb = embeddings(4, seed=1), embeddings(9, seed=2)
    from he_models.client import encrypt_embeddings

    outs = {
        "a": engine.start(ctx, "a", 4, encrypt_embeddings(keys, a_emb, engine.geometry(4))),
        "b": engine.start(ctx, "b", 9, encrypt_embeddings(keys, b_emb, engine.geometry(9))),
    }
    while not all(o.done for o in outs.values()):
        for name, out in list(outs.items()):
            if not out.done:
                replies = answer_round(keys, out.kind, out.meta, out.to_client)
                outs[name] = engine.resume(ctx, out.state, replies, inference_id=name, round_no=out.round)
    plan = engine.plan
    got_a = decrypt_logits(keys, outs["a"].meta, outs["a"].to_client)
    got_b = decrypt_logits(keys, outs["b"].meta, outs["b"].to_client)
    assert np.abs(got_a - simulate(plan, a_emb).logits).max() < 1e-2
    assert np.abs(got_b - simulate(plan, b_emb).logits).max() < 1e-2
