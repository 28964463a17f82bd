"""The encrypted engine with real TenSEAL ciphertexts: kernels, the round protocol, and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from he_models.ckks import CKKSParams, load_ciphertext, save_bytes, unpack_eval_keys
from he_models.client import ClientKeys, Embedder, answer_round, decrypt_logits, encrypt_embeddings
from he_models.engine import EncryptedEngine, EngineError
from he_models.kernels import Backend, apply_map, build_map, encode_map
from he_models.layout import Geometry
from he_models.model import HEFriendlyBert
from he_models.plan import simulate
from he_models.wire import pack_frames

SECRET = b"test-server-secret-0123456789"
PARAMS = CKKSParams()
STEPS = [1, 8, -8, 32, 256, -256, 64, 512, -512]


@pytest.fixture(scope="module")
def kernel_env():
    backend = Backend(PARAMS)
    keys = ClientKeys.generate(PARAMS, STEPS)
    _, _, galois_bytes = unpack_eval_keys(keys.public_keys_bytes())
    galois = seal.GaloisKeys()
    from he_models.ckks import load_into

    load_into(galois, backend.context, galois_bytes, "galois")
    return backend, keys, galois


def _run_map(env, dmap, vectors, level=3):
    backend, keys, galois = env
    emap = encode_map(backend, dmap, level, PARAMS.scale, PARAMS.scale)
    cts = [load_ciphertext(backend.context, b) for b in keys.encrypt(vectors)]
    out = apply_map(backend, emap, cts, galois)
    return keys.decrypt([save_bytes(c) for c in out])


@settings(max_examples=4, deadline=None, derandomize=True)
@given(n=st.integers(1, 64), fin=st.sampled_from([64, 128]), fout=st.sampled_from([64, 128, 256]),
       seed=st.integers(0, 2**16))
def test_linear_kernel_matches_numpy(kernel_env, n, fin, fout, seed):
    rng = np.random.default_rng(seed)
    geo = Geometry.for_tokens(n, 128, 2, 512, PARAMS.slots)
    x = rng.normal(size=(n, fin))
    w = rng.normal(size=(fin, fout)) * 0.1
    t = np.arange(geo.chunks * 32)[:, None, None]
    i = np.arange(fin)[None, :, None]
    j = np.arange(fout)[None, None, :]
    shape = (geo.chunks * 32, fin, fout)
    dmap = build_map(np.broadcast_to(geo.fm_slot(t, j, fout), shape), np.broadcast_to(geo.fm_slot(t, i, fin), shape),
                     np.broadcast_to(w[None], shape), geo.fm_cts(fin), geo.fm_cts(fout), PARAMS.slots, 32, 8)
    got = geo.unpack_fm(_run_map(kernel_env, dmap, geo.pack_fm(x)), fout)
    assert np.abs(got - x @ w).max() < 1e-3


@settings(max_examples=4, deadline=None, derandomize=True)
@given(n=st.integers(1, 32), seed=st.integers(0, 2**16))
def test_token_mixing_kernel_matches_numpy(kernel_env, n, seed):
    """A within-block map (the rA.V mask correction): out[i, f] = sum_k M[i, k] x[k, f]."""
    rng = np.random.default_rng(seed)
    geo = Geometry.for_tokens(n, 128, 2, 512, PARAMS.slots)
    x = rng.normal(size=(n, 128))
    mix = rng.normal(size=(n, n))
    f = np.arange(128)[:, None, None]
    i = np.arange(n)[None, :, None]
    k = np.arange(n)[None, None, :]
    shape = (128, n, n)
    dmap = build_map(np.broadcast_to(geo.fm_slot(i, f, 128), shape), np.broadcast_to(geo.fm_slot(k, f, 128), shape),
                     np.broadcast_to(mix[i, k], shape), 1, 1, PARAMS.slots, 1, 8)
    got = geo.unpack_fm(_run_map(kernel_env, dmap, geo.pack_fm(x)), 128)
    assert np.abs(got - mix @ x).max() < 1e-3


def test_square_and_level_bookkeeping(kernel_env):
    backend, keys, _ = kernel_env
    relin = seal.RelinKeys()
    from he_models.ckks import load_into

    _, relin_bytes, _ = unpack_eval_keys(keys.public_keys_bytes())
    load_into(relin, backend.context, relin_bytes, "relin")
    v = np.linspace(-3, 3, PARAMS.slots)
    ct = load_ciphertext(backend.context, keys.encrypt([v])[0])
    sq = backend.square(backend.add_plain(ct, np.full(PARAMS.slots, 0.5)), relin)
    assert backend.level(sq) == backend.top - 1
    got = keys.decrypt([save_bytes(sq)])[0]
    assert np.abs(got - (v + 0.5) ** 2).max() < 1e-4


# -- the whole protocol ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(random_model_dir):
    return EncryptedEngine.load(random_model_dir, SECRET)


@pytest.fixture(scope="module")
def client(engine):
    bundle = engine.client_bundle()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    return keys, engine.load_context(keys.public_keys_bytes())


def run_encrypted(engine, keys, ctx, embeddings, inference_id="inf"):
    geo = engine.geometry(embeddings.shape[0])
    out = engine.start(ctx, inference_id, embeddings.shape[0], encrypt_embeddings(keys, embeddings, geo))
    rounds = 0
    while not out.done:
        replies = answer_round(keys, out.kind, out.meta, out.to_client)
        out = engine.resume(ctx, out.state, replies, inference_id=inference_id, round_no=out.round)
        rounds += 1
    return decrypt_logits(keys, out.meta, out.to_client), rounds


def test_encrypted_inference_matches_plaintext(engine, client, random_model_dir):
    keys, ctx = client
    embedder = Embedder.from_model_dir(random_model_dir)
    emb = embedder.embed("an encrypted sentence, short enough for one ciphertext")
    logits, rounds = run_encrypted(engine, keys, ctx, emb)
    assert rounds == engine.plan.rounds == 8
    model = HEFriendlyBert.from_pretrained(random_model_dir)
    with torch.no_grad():
        reference = model.forward_embedded(torch.tensor(emb, dtype=torch.float32)[None],
                                           torch.ones(1, emb.shape[0])).logits[0].numpy()
    simulated = simulate(engine.plan, emb).logits
    assert np.abs(simulated - reference).max() < 1e-4  # folding is exact up to float32
    assert np.abs(logits - simulated).max() < 1e-2
    assert np.argmax(logits) == np.argmax(reference)


def test_masks_differ_per_round_and_inference(engine):
    a = engine.masks.draw("inf-a", 1, "0.q", 1)[0]
    b = engine.masks.draw("inf-a", 2, "0.q", 1)[0]
    c = engine.masks.draw("inf-b", 1, "0.q", 1)[0]
    again = engine.masks.draw("inf-a", 1, "0.q", 1)[0]
    assert np.array_equal(a, again)  # any replica derives the same mask
    assert not np.allclose(a, b) and not np.allclose(a, c)
    width, bits = engine.mask_limits["0.q"]
    assert np.abs(a).max() <= width and bits >= 8
    assert np.abs(a).max() > 0.5 * width


def test_replayed_and_mixed_rounds_are_refused(engine, client, random_model_dir):
    keys, ctx = client
    emb = Embedder.from_model_dir(random_model_dir).embed("replay me")
    geo = engine.geometry(emb.shape[0])
    first = engine.start(ctx, "inf-replay", emb.shape[0], encrypt_embeddings(keys, emb, geo))
    replies = answer_round(keys, first.kind, first.meta, first.to_client)
    second = engine.resume(ctx, first.state, replies, inference_id="inf-replay", round_no=1)
    with pytest.raises(EngineError, match="awaits round 2"):
        engine.resume(ctx, second.state, replies, inference_id="inf-replay", round_no=1)
    with pytest.raises(EngineError, match="does not match"):
        engine.resume(ctx, second.state, replies, inference_id="other", round_no=2)
    forged = second.state[:40] + bytes([second.state[40] ^ 1]) + second.state[41:]
    with pytest.raises(EngineError, match="authentication"):
        engine.resume(ctx, forged, replies, round_no=2)


def test_server_context_has_no_secret_key(engine, client):
    keys, ctx = client
    upload = keys.public_keys_bytes()
    assert not hasattr(ctx, "secret_key")
    # The secret key's serialization never appears inside the upload.
    secret = save_bytes(keys._secret)
    assert secret[64:256] not in upload
    # A TenSEAL context carrying a secret key is refused, as is a bundle declaring one.
    tcontext = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[55, 36, 36, 36, 55])
    with pytest.raises(EngineError, match="secret key"):
        engine.load_context(tcontext.serialize(save_secret_key=True))
    header = b'{"params": {}, "galois_steps": [], "format": "cipherbert-eval-keys/1", "parts": ["secret_key"]}'
    with pytest.raises(EngineError, match="secret key"):
        engine.load_context(pack_frames([header, secret]))


def test_wrong_keys_are_refused(engine):
    other = CKKSParams(8192, (60, 40, 40, 60), 40)
    keys = ClientKeys.generate(other, [1])
    with pytest.raises(EngineError, match="parameters"):
        engine.load_context(keys.public_keys_bytes())
    few = ClientKeys.generate(engine.plan.params, [1, 2])
    with pytest.raises(EngineError, match="lack Galois keys"):
        engine.load_context(few.public_keys_bytes())
    with pytest.raises(EngineError):
        engine.load_context(b"garbage")


def test_bad_ciphertexts_are_refused(engine, client):
    keys, ctx = client
    geo = engine.geometry(5)
    good = encrypt_embeddings(keys, np.zeros((5, 128)), geo)
    with pytest.raises(EngineError, match="expected 1 ciphertexts"):
        engine.start(ctx, "x", 5, good + good)
    with pytest.raises(EngineError, match="not valid"):
        engine.start(ctx, "x", 5, [good[0][: len(good[0]) // 2]])
    with pytest.raises(EngineError, match="not valid|empty"):
        engine.start(ctx, "x", 5, [b"\x00" * 100])
    backend = engine.backend
    lower = backend.mod_to(load_ciphertext(backend.context, good[0]), 1)
    with pytest.raises(EngineError, match="level 1"):
        engine.start(ctx, "x", 5, [save_bytes(lower)])
    foreign = ClientKeys.generate(CKKSParams(8192, (60, 40, 40, 60), 40), [1])
    with pytest.raises(EngineError, match="not valid"):
        engine.start(ctx, "x", 5, foreign.encrypt([np.zeros(4096)]))
    with pytest.raises(EngineError, match="exceed"):
        engine.geometry(engine.max_tokens + 1)


def test_plan_reports_depth_keys_and_security(engine):
    summary = engine.plan.summary()
    assert sum(summary["ckks"]["coeff_mod_bit_sizes"]) <= 218
    assert len(summary["galois_steps"]) <= 20
    assert summary["rounds"] == 8
    assert all(math.isfinite(v) and v > 0 for v in summary["ranges"].values())


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_is_refused_by_the_embedder(random_model_dir, text):
    from he_models.client import ClientError

    with pytest.raises(ClientError, match="empty"):
        Embedder.from_model_dir(random_model_dir).embed(text)


def test_single_token_and_full_block(engine, client, random_model_dir):
    """Padding: a 1-token input and a 32-token input (a full block) both match plaintext."""
    keys, ctx = client
    embedder = Embedder.from_model_dir(random_model_dir)
    for ids in ([101], embedder.token_ids("word " * 40)[:32]):
        emb = embedder.embed_ids(ids)
        logits, _ = run_encrypted(engine, keys, ctx, emb, inference_id=f"len-{len(ids)}")
        assert np.abs(logits - simulate(engine.plan, emb).logits).max() < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("n", [33, 64, 70, 100, 128])
def test_multi_ciphertext_lengths(engine, client, random_model_dir, n):
    """Sentences beyond 32 tokens span several ciphertexts per tensor."""
    keys, ctx = client
    embedder = Embedder.from_model_dir(random_model_dir)
    ids = embedder.token_ids("several words of text " * 40)[:n]
    emb = embedder.embed_ids(ids)
    logits, _ = run_encrypted(engine, keys, ctx, emb, inference_id=f"len-{n}")
    assert np.abs(logits - simulate(engine.plan, emb).logits).max() < 1e-2


def test_assistant_process_gives_the_same_result(random_model_dir):
    """workers=2 splits each round with a forked process; the result must not change."""
    engine = EncryptedEngine.load(random_model_dir, SECRET, workers=2)
    try:
        bundle = engine.client_bundle()
        keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
        ctx = engine.load_context(keys.public_keys_bytes())
        emb = Embedder.from_model_dir(random_model_dir).embed("two processes, one answer")
        logits, _ = run_encrypted(engine, keys, ctx, emb, inference_id="parallel")
        assert engine.has_assistant  # it did not die on the way
        assert np.abs(logits - simulate(engine.plan, emb).logits).max() < 1e-2
    finally:
        engine.close()


def test_client_refuses_another_protocol_version(engine, client):
    from he_models.client import ClientError

    keys, ctx = client
    geo = engine.geometry(3)
    out = engine.start(ctx, "proto", 3, encrypt_embeddings(keys, np.zeros((3, 128)), geo))
    assert out.meta["protocol"] == engine.client_bundle()["protocol"]
    with pytest.raises(ClientError, match="protocol"):
        answer_round(keys, out.kind, {**out.meta, "protocol": "cipherbert-rounds/1"}, out.to_client)
