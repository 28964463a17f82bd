"""The protocol spec (he_models/protocol_spec.py) against the doc that renders it and the engine that obeys it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from he_models import protocol_spec as spec
from he_models.engine import EncryptedEngine
from he_models.layout import PROTOCOL, Geometry
from he_models.plan import simulate
from tests.support import doc_client

SECRET = b"protocol-spec-secret-0123456789"
DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
LENGTHS = [5, 32, 33, 70]


def test_doc_tables_are_the_spec_rendered():
    text = DOC.read_text()
    assert spec.render_doc(text) == text, "docs/protocol.md is stale: run python -m he_models.protocol_spec --write"
    assert f"Protocol version **`{PROTOCOL}`**" in text


def test_doc_tables_parse_back_to_the_spec():
    """What an independent client reads from the doc is the spec, formula for formula."""
    tables = doc_client.DocTables.read(DOC)
    assert tables.quantities == [(n, f) for n, f, _ in spec.QUANTITIES]
    assert tables.layouts == {k: (v.slot, v.frames) for k, v in spec.LAYOUTS.items()}
    assert [(t["kind"], t["by"], t["pos"], t["name"], t["layout"], t["F"]) for t in tables.tensors] == [
        (t.kind, t.direction, t.position, t.name, t.layout, t.features) for t in spec.TENSORS
    ]
    assert tables.key_required == ["params", "galois_steps"]
    assert tables.version == PROTOCOL


@pytest.mark.parametrize("dims", [(128, 2, 512, 8192), (64, 2, 128, 8192), (128, 4, 256, 16384)])
def test_layout_formulas_equal_the_engine_geometry(dims):
    hidden, heads, inter, degree = dims
    for n in range(1, 129):
        env = spec.quantities(n, hidden, heads, inter, degree)
        geo = Geometry.for_tokens(n, hidden, heads, inter, degree // 2)
        assert (env["n_p"], env["B"], env["C"]) == (geo.n_p, geo.block, geo.chunks)
        for features in (hidden, inter):
            t, f = np.arange(n)[:, None], np.arange(features)[None, :]
            assert np.array_equal(
                spec.evaluate(spec.LAYOUTS["FM"].slot, env, t=t, f=f, F=features), geo.fm_slot(t, f, features)
            )
            assert spec.frames("FM", env, features) == geo.fm_cts(features)
        h = np.arange(heads)[:, None, None]
        k = np.arange(n)[None, :, None]
        i = np.arange(n)[None, None, :]
        d = np.arange(hidden // heads)[None, None, :]
        assert np.array_equal(spec.evaluate(spec.LAYOUTS["SL"].slot, env, h=h, k=k, i=i), geo.sl_index())
        assert np.array_equal(spec.evaluate(spec.LAYOUTS["TM"].slot, env, h=h, k=k, d=d), geo.tm_index())
        assert spec.frames("SL", env) == spec.frames("TM", env) == geo.sl_cts


def test_slot_maps_are_injective_and_fit_their_frames():
    """No two logical entries share a slot, and none falls outside the frames the layout declares."""
    for n in (1, 5, 31, 32, 33, 64, 65, 70, 128):
        env = spec.quantities(n, 128, 2, 512, 8192)
        grids = {
            "FM": dict(t=np.arange(n)[:, None], f=np.arange(512)[None, :], F=512),
            "SL": dict(h=np.arange(2)[:, None, None], k=np.arange(n)[None, :, None], i=np.arange(n)[None, None, :]),
            "TM": dict(h=np.arange(2)[:, None, None], k=np.arange(n)[None, :, None], d=np.arange(64)[None, None, :]),
        }
        for name, grid in grids.items():
            slots = np.asarray(spec.evaluate(spec.LAYOUTS[name].slot, env, **grid)).ravel()
            assert len(np.unique(slots)) == slots.size
            assert slots.max() < spec.frames(name, env, grid.get("F")) * env["S"]


@pytest.fixture(scope="module")
def engine(random_model_dir):
    return EncryptedEngine.load(random_model_dir, SECRET)


@pytest.fixture(scope="module")
def doc_keys(engine):
    """Keys made the doc's way (raw sealapi), registered with the real engine."""
    bundle = engine.client_bundle()
    crypto = doc_client.Seal(bundle["ckks"])
    tables = doc_client.DocTables.read(DOC)
    header = {"params": bundle["ckks"], "galois_steps": bundle["galois_steps"]}
    assert sorted(header) == sorted(tables.key_required)
    ctx = engine.load_context(crypto.key_upload(bundle, header))
    yield bundle, crypto, tables, ctx
    crypto.close()


@pytest.mark.parametrize("n", LENGTHS)
def test_engine_follows_the_spec_at_several_lengths(engine, doc_keys, n):
    """Every round's kind, meta and frame count are the spec's, and a client packing with the spec's
    formulas (not he_models.layout) gets the plaintext model's logits."""
    bundle, crypto, tables, ctx = doc_keys
    packing = doc_client.Packing(tables, bundle, n)
    env = spec.quantities(
        n,
        bundle["hidden_size"],
        bundle["num_heads"],
        bundle["intermediate_size"],
        bundle["ckks"]["poly_modulus_degree"],
    )
    emb = np.random.default_rng(n).normal(size=(n, bundle["hidden_size"]))
    upload = crypto.encrypt(packing.pack("FM", emb, bundle["hidden_size"]))
    assert len(upload) == spec.message_frames("start", "client", env)
    out = engine.start(ctx, f"spec-{n}", n, upload)
    layers = bundle["rounds"] // 4
    geometry = {
        "n": n,
        "n_p": env["n_p"],
        "hidden": env["H"],
        "heads": env["heads"],
        "intermediate": env["I"],
        "slots": env["S"],
    }
    while not out.done:
        assert out.kind == spec.round_kind(out.round, layers)
        assert out.meta["protocol"] == PROTOCOL and out.meta["geometry"] == geometry
        assert len(out.to_client) == spec.message_frames(out.kind, "server", env)
        replies = doc_client.answer(tables, packing, crypto, out.kind, out.meta, out.to_client)
        assert len(replies) == spec.message_frames(out.kind, "client", env)
        out = engine.resume(ctx, out.state, replies, inference_id=f"spec-{n}", round_no=out.round)
    assert out.round == bundle["rounds"] + 1 and spec.round_kind(out.round, layers) == out.kind == "logits"
    assert len(out.to_client) == spec.message_frames("logits", "server", env, bundle["num_labels"])
    logits = doc_client.logits(crypto, out.to_client)
    assert np.abs(logits - simulate(engine.plan, emb).logits).max() < 1e-2


@pytest.mark.parametrize("n", [5, 33])
def test_token_model_final_envelope_follows_the_spec(tmp_path_factory, n):
    """A token-classification model: same rounds, then `token_logits` (FM with F = L) that a client reading
    only the doc unpacks into the plaintext model's per-token logits."""
    from tests.support.token_fixtures import make_token_model

    directory = make_token_model(tmp_path_factory.mktemp("spec-ner") / "tiny-ner")
    engine = EncryptedEngine.load(directory, SECRET)
    bundle = engine.client_bundle()
    assert bundle["task"] == "token-classification"
    tables = doc_client.DocTables.read(DOC)
    crypto = doc_client.Seal(bundle["ckks"])
    try:
        ctx = engine.load_context(crypto.key_upload(bundle, {"params": bundle["ckks"], "galois_steps": bundle["galois_steps"]}))
        packing = doc_client.Packing(tables, bundle, n)
        emb = np.random.default_rng(n).normal(size=(n, bundle["hidden_size"]))
        out = engine.start(ctx, f"ner-{n}", n, crypto.encrypt(packing.pack("FM", emb, bundle["hidden_size"])))
        while not out.done:
            replies = doc_client.answer(tables, packing, crypto, out.kind, out.meta, out.to_client)
            out = engine.resume(ctx, out.state, replies, round_no=out.round)
        layers = bundle["rounds"] // 4
        assert out.kind == spec.round_kind(out.round, layers, bundle["task"]) == "token_logits"
        logits = doc_client.token_logits(tables, packing, crypto, out.meta, out.to_client)
    finally:
        crypto.close()
    assert logits.shape == (n, bundle["num_labels"])
    ref = simulate(engine.plan, emb).logits
    assert np.abs(logits - ref).max() < 1e-2  # as for the text model: CKKS at 2^36 with 2^10-wide masks


def test_key_header_schema_is_the_one_the_server_enforces():
    from he_models.ckks import KEY_HEADER_FIELDS

    assert {name: presence == "required" for name, presence, _, _ in spec.KEY_HEADER} == KEY_HEADER_FIELDS


@pytest.mark.parametrize(
    "header, ok",
    [
        ({}, True),
        ({"format": "cipherbert-eval-keys/1", "parts": ["relin_keys", "galois_keys"]}, True),
        ({"comment": "hello"}, False),  # an unknown field
        (
            {
                "params": {
                    "poly_modulus_degree": 8192,
                    "coeff_mod_bit_sizes": [55, 36, 36, 36, 55],
                    "scale_bits": 36,
                    "security": 128,
                }
            },
            False,
        ),  # an unknown parameter
        ({"galois_steps": [1, 1]}, False),
        ({"galois_steps": ["1"]}, False),
        ({"parts": ["relin_keys", "galois_keys", "secret_key"]}, False),
    ],
)
def test_key_headers_with_unknown_or_malformed_fields_are_refused(header, ok):
    import json

    from he_models.ckks import CKKSError, unpack_eval_keys
    from he_models.wire import pack_frames

    base = {
        "params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [55, 36, 36, 36, 55], "scale_bits": 36},
        "galois_steps": [1, 2],
    }
    upload = pack_frames([json.dumps({**base, **header}).encode(), b"relin", b"galois"])
    if ok:
        assert unpack_eval_keys(upload)[0].galois_steps == [1, 2]
    else:
        with pytest.raises(CKKSError):
            unpack_eval_keys(upload)
