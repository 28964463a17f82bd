"""Garbage from a client never escapes the engine as anything but a ClientInputError (answered 4xx)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from he_models.ckks import pack_eval_keys
from he_models.engine import EngineError
from he_models.errors import ClientInputError
from he_models.wire import pack_frames
from tests.support.engine_fixtures import first_step, small_client, small_engine


def _flip(data: bytes, pos: int) -> bytes:
    pos %= len(data)
    return data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.integers(0, 10**9).map(lambda p: ("flip", p)),
        st.integers(0, 10**6).map(lambda p: ("cut", p)),
    )
)
def test_garbage_keys_are_refused_as_client_input(case):
    engine = small_engine()
    keys, _ = small_client()
    good = keys.public_keys_bytes()
    if isinstance(case, tuple):
        data = _flip(good, case[1]) if case[0] == "flip" else good[: case[1] % len(good)]
    else:
        data = case
    try:
        engine.load_context(data)
    except ClientInputError:
        pass


@pytest.mark.parametrize(
    "header",
    [
        b'{"params": 1, "galois_steps": "x", "parts": [1, 2]}',
        b"[]",
        b"null",
        b'{"params": {}, "galois_steps": [], "format": 7}',
    ],
)
def test_key_headers_of_the_wrong_shape_are_engine_errors(header):
    with pytest.raises(EngineError):
        small_engine().load_context(pack_frames([header, b"r", b"g"]))


def test_keys_for_other_steps_or_empty_key_frames_are_engine_errors():
    engine = small_engine()
    steps = engine.plan.galois_steps
    with pytest.raises(EngineError):
        engine.load_context(pack_eval_keys(engine.plan.params, steps, b"", b""))
    with pytest.raises(EngineError):
        engine.load_context(pack_eval_keys(engine.plan.params, steps, b"\x00" * 64, b"\x01" * 64))
    with pytest.raises(EngineError):
        engine.load_context("not bytes")  # type: ignore[arg-type]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(pos=st.integers(0, 10**9), cut=st.booleans())
def test_garbage_ciphertexts_in_start_and_resume_are_client_input(pos, cut):
    engine = small_engine()
    keys, ctx = small_client()
    step = first_step(engine, keys, ctx, 5, "fuzz")
    from he_models.client import answer_round

    replies = answer_round(keys, step.kind, step.meta, step.to_client)
    bad = [r[: pos % len(r)] if cut else _flip(r, pos) for r in replies]
    for call in (
        lambda: engine.resume(ctx, step.state, bad, round_no=1),
        lambda: engine.start(ctx, "fuzz", 5, bad[:1]),
        lambda: engine.resume(ctx, _flip(step.state, pos), replies),
    ):
        try:
            call()
        except ClientInputError:
            pass


@pytest.mark.parametrize("args", [("", 5), ("x" * 200, 5), ("ok", 0), ("ok", 10**6), ("ok", "5"), ("ok", True)])
def test_bad_ids_and_token_counts_are_engine_errors(args):
    engine = small_engine()
    _, ctx = small_client()
    with pytest.raises(EngineError):
        engine.start(ctx, args[0], args[1], [])


def test_wrong_counts_and_types_are_engine_errors():
    engine = small_engine()
    keys, ctx = small_client()
    step = first_step(engine, keys, ctx, 5, "counts")
    with pytest.raises(EngineError, match="expected"):
        engine.resume(ctx, step.state, [], round_no=1)
    with pytest.raises(EngineError):
        engine.resume(ctx, step.state, [b"x", 3], round_no=1)  # type: ignore[list-item]
    with pytest.raises(EngineError):
        engine.resume(ctx, step.state, "not a list", round_no=1)  # type: ignore[arg-type]
    with pytest.raises(EngineError):
        engine.resume(ctx, None, [], round_no=1)  # type: ignore[arg-type]
