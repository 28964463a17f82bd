"""The client's own protections, each driven by a deliberately misbehaving server: real engine outputs
tampered the way a malicious or broken server could (counts, geometry, descriptors, overflow, order)."""

from __future__ import annotations

import copy
import stat

import numpy as np
import pytest

from clients.trust import BundlePins, RoundGuard, TrustError, check_security
from he_models import protocol_spec
from he_models.ckks import load_ciphertext, save_bytes
from he_models.client import ClientKeys, ProtocolViolation, answer_round, decrypt_logits, encrypt_embeddings
from he_models.engine import EncryptedEngine

SECRET = b"client-trust-secret-0123456789"
N = 6


# -- parameters and pins -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ckks, ok",
    [
        ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [55, 36, 36, 36, 55], "scale_bits": 36}, True),
        ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 40, 60], "scale_bits": 40}, False),
        ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 40, 60], "scale_bits": 40}, False),
        ({"poly_modulus_degree": 6000, "coeff_mod_bit_sizes": [30, 20, 30], "scale_bits": 20}, False),
        ({"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": "55,36", "scale_bits": 36}, False),
    ],
)
def test_parameters_below_128_bit_security_are_refused(ckks, ok):
    if ok:
        check_security(ckks)
    else:
        with pytest.raises(TrustError) as err:
            check_security(ckks)
        assert err.value.code == "weak_parameters"


def _bundle(**changes) -> dict:
    bundle = {
        "model_id": "m",
        "model_hash": "a" * 64,
        "protocol": "cipherbert-rounds/3",
        "ckks": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [55, 36, 36, 36, 55], "scale_bits": 36},
        "files": [
            {"name": "tokenizer.json", "sha256": "b" * 64},
            {"name": "embeddings.safetensors", "sha256": "c" * 64},
        ],
    }
    bundle.update(changes)
    return bundle


@pytest.mark.parametrize(
    "change",
    [
        {"model_hash": "d" * 64},
        {
            "files": [
                {"name": "tokenizer.json", "sha256": "e" * 64},
                {"name": "embeddings.safetensors", "sha256": "c" * 64},
            ]
        },
        {"ckks": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [55, 36, 36, 55], "scale_bits": 36}},
    ],
)
def test_a_changed_bundle_fails_loudly_until_forgotten(tmp_path, change):
    pins = BundlePins(tmp_path / "pins.json")
    assert pins.check("http://s", _bundle()) is True  # first use pins
    assert stat.S_IMODE((tmp_path / "pins.json").stat().st_mode) == 0o600
    assert pins.check("http://s", _bundle()) is False  # unchanged
    with pytest.raises(TrustError) as err:
        pins.check("http://s", _bundle(**change))
    assert err.value.code == "bundle_changed"
    assert pins.check("http://other", _bundle(**change)) is True  # pins are per server
    pins.forget("http://s", "m")
    assert pins.check("http://s", _bundle(**change)) is True


# -- the round sequence ----------------------------------------------------------------------------


def _rounds(n_rounds=8, labels=2):
    headers = [
        {
            "inference_id": "i",
            "round": r,
            "done": False,
            "round_token": "t",
            "kind": protocol_spec.round_kind(r, n_rounds // 4),
        }
        for r in range(1, n_rounds + 1)
    ]
    return headers + [{"inference_id": "i", "round": n_rounds + 1, "done": True, "kind": "logits", "round_token": None}]


def _drive(headers, bundle, frames=2):
    guard = RoundGuard(bundle)
    for h in headers:
        guard.step(h, frames)
    return guard


BUNDLE = {"protocol": "cipherbert-rounds/3", "rounds": 8, "num_labels": 2}


def test_an_honest_sequence_passes():
    assert _drive(_rounds(), BUNDLE).finished


@pytest.mark.parametrize(
    "tamper, code",
    [
        (lambda hs: hs[:3] + hs[4:], "round_order"),  # a round skipped
        (lambda hs: hs[:3] + [hs[2]] + hs[3:], "round_order"),  # a round repeated
        (lambda hs: hs[:8] + [{**hs[7], "round": 9}] + [{**hs[8], "round": 10}], "too_many_rounds"),  # extra
        (lambda hs: hs[:5] + [{**hs[8], "round": 6}], "round_order"),  # logits early
        (lambda hs: [{**hs[0], "kind": "refresh"}] + hs[1:], "round_kind"),  # wrong kind
        (lambda hs: hs[:2] + [{**hs[2], "inference_id": "j"}] + hs[3:], "round_order"),  # mixed inferences
        (lambda hs: hs + [hs[-1]], "round_order"),  # talking after the logits
        (lambda hs: hs[:-1] + [{**hs[-1], "kind": "refresh"}], "round_kind"),
    ],
)
def test_rounds_out_of_order_or_beyond_the_bundle_are_refused(tamper, code):
    with pytest.raises(TrustError) as err:
        _drive(tamper(_rounds()), BUNDLE)
    assert err.value.code == code


def test_the_logits_count_must_match_the_labels():
    with pytest.raises(TrustError) as err:
        _drive(_rounds(), BUNDLE, frames=3)
    assert err.value.code == "frame_count"


# -- the client half against a tampering server -------------------------------------------------------


@pytest.fixture(scope="module")
def engine(random_model_dir):
    return EncryptedEngine.load(random_model_dir, SECRET)


@pytest.fixture(scope="module")
def session(engine):
    bundle = engine.client_bundle()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    return keys, engine.load_context(keys.public_keys_bytes())


@pytest.fixture(scope="module")
def first_round(engine, session):
    keys, ctx = session
    geo = engine.geometry(N)
    emb = np.random.default_rng(0).normal(size=(N, engine.cfg.hidden_size))
    return geo, engine.start(ctx, "trust", N, encrypt_embeddings(keys, emb, geo))


def test_an_honest_round_is_answered(session, first_round):
    keys, _ = session
    geo, out = first_round
    assert len(answer_round(keys, out.kind, out.meta, out.to_client, geometry=geo)) == 2 * geo.sl_cts


@pytest.mark.parametrize("what", ["dropped", "extra", "geometry", "kind", "sigma", "descriptors"])
def test_a_malformed_round_is_refused(session, first_round, engine, what):
    keys, _ = session
    geo, out = first_round
    kind, meta, frames = out.kind, copy.deepcopy(out.meta), list(out.to_client)
    if what == "dropped":
        frames = frames[:-1]
    elif what == "extra":
        frames = frames + frames[:1]
    elif what == "geometry":  # the server claims another length than the client's sentence
        meta["geometry"] = engine.geometry(N + 1).to_dict()
    elif what == "kind":
        kind = "transpose"
    elif what == "sigma":
        meta.pop("sigma")
    else:
        env = protocol_spec.env_of_geometry(geo.to_dict())
        meta["tensors"] = {
            "send": protocol_spec.describe("scores", "server", env),
            "reply": protocol_spec.describe("refresh", "client", env),
        }
    with pytest.raises(ProtocolViolation):
        answer_round(keys, kind, meta, frames, geometry=geo)


def _inflate(engine, payload: bytes, slot: int, value: float) -> bytes:
    """What a broken server would send: one slot pushed past the headroom (no key needed)."""
    be = engine.backend
    ct = load_ciphertext(be.context, payload)
    bump = np.zeros(engine.slots)
    bump[slot] = value
    return save_bytes(be.add_plain(ct, bump))


def test_a_value_past_the_headroom_stops_the_inference(session, first_round, engine):
    keys, _ = session
    geo, out = first_round
    limit = 2.0 ** protocol_spec.headroom_bits(
        list(engine.plan.params.coeff_mod_bit_sizes), engine.plan.params.scale_bits
    )
    frames = [_inflate(engine, out.to_client[0], 7, 1.5 * limit)] + list(out.to_client[1:])
    with pytest.raises(ProtocolViolation, match="headroom") as err:
        answer_round(keys, out.kind, out.meta, frames, geometry=geo)
    assert not any(ch.isdigit() for ch in str(err.value).replace("2^18", "").replace("ciphertext 0", ""))  # no values


def test_logits_are_checked_for_count_and_headroom(session, engine):
    keys, ctx = session
    geo = engine.geometry(2)
    out = engine.start(ctx, "logits", 2, encrypt_embeddings(keys, np.zeros((2, engine.cfg.hidden_size)), geo))
    while not out.done:
        replies = answer_round(keys, out.kind, out.meta, out.to_client, geometry=geo)
        out = engine.resume(ctx, out.state, replies, inference_id="logits", round_no=out.round)
    assert len(decrypt_logits(keys, out.meta, out.to_client, num_labels=2)) == 2
    with pytest.raises(ProtocolViolation):
        decrypt_logits(keys, out.meta, out.to_client[:1], num_labels=2)
    with pytest.raises(ProtocolViolation, match="headroom"):
        decrypt_logits(keys, out.meta, [_inflate(engine, out.to_client[0], 3, 1e6), out.to_client[1]], num_labels=2)


def test_headroom_violations_carry_their_own_code(session, first_round, engine):
    keys, _ = session
    geo, out = first_round
    frames = [_inflate(engine, out.to_client[0], 2, 2.0**20)] + list(out.to_client[1:])
    with pytest.raises(ProtocolViolation) as err:
        answer_round(keys, out.kind, out.meta, frames, geometry=geo)
    assert err.value.code == "headroom"


def test_an_oversized_ciphertext_is_refused_before_parsing(session, first_round):
    keys, _ = session
    geo, out = first_round
    huge = out.to_client[0] + b"\0" * keys.max_ciphertext_bytes()
    with pytest.raises(ProtocolViolation, match="bytes"):
        answer_round(keys, out.kind, out.meta, [huge] + list(out.to_client[1:]), geometry=geo)
