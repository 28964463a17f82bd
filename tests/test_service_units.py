"""Service building blocks without a running server: settings, round tokens, stores, key checks."""

import threading
import time

import pytest
import tenseal as ts

from service.protocol import frames_digest, pack_envelope, round_token, token_matches, unpack_envelope
from service.settings import Settings, SettingsError, parse_api_keys, parse_rate_limit
from service.store import InferenceRecord, KeyRecord, SQLiteStore
from cipherbert.launch import have, start_redis
from tests.support.toyengine import EngineError, ToyEngine, make_toy_model, ClientKeys


def test_api_keys_and_rate_limit_parsing():
    assert parse_api_keys("acme:key-aaaa-1, beta:key-bbbb-2") == {"key-aaaa-1": "acme", "key-bbbb-2": "beta"}
    with pytest.raises(SettingsError, match="tenant:key"):
        parse_api_keys("nocolon")
    with pytest.raises(SettingsError, match="shorter"):
        parse_api_keys("a:short")
    assert parse_rate_limit("120/60") == (120, 60)
    assert parse_rate_limit("off") == (0, 1)
    with pytest.raises(SettingsError):
        parse_rate_limit("lots")


def test_secret_is_created_once_and_shared(tmp_path, monkeypatch):
    monkeypatch.delenv("CIPHERBERT_SECRET", raising=False)
    monkeypatch.setenv("CIPHERBERT_API_KEYS", "t:key-12345678")
    a = Settings(data_dir=tmp_path).resolve()
    b = Settings(data_dir=tmp_path).resolve()
    assert a.secret == b.secret and len(a.secret) == 32
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert a.subkey("round-token") != a.subkey("engine-mask")
    monkeypatch.setenv("CIPHERBERT_SECRET", "x" * 32)
    assert Settings(data_dir=tmp_path).resolve().secret == b"x" * 32


def test_round_token_binds_every_field():
    key = b"k" * 32
    base = dict(tenant="acme", key_id="k1", inference_id="i1", round=1, digest=frames_digest([b"abc"]))
    tok = round_token(key, **base)
    assert token_matches(tok, round_token(key, **base))
    for field, other in (("tenant", "evil"), ("key_id", "k2"), ("inference_id", "i2"), ("round", 2),
                         ("digest", frames_digest([b"abd"]))):
        assert not token_matches(tok, round_token(key, **{**base, field: other}))
    assert not token_matches(tok, round_token(b"j" * 32, **base))
    header, frames = unpack_envelope(pack_envelope({"round": 1}, [b"x", b"yz"]))
    assert header == {"round": 1} and frames == [b"x", b"yz"]


def _exercise_store(store):
    now = time.time()
    rec = KeyRecord("k_1", "acme", "toy", now, now + 60, 3, "ab")
    store.put_key(rec, b"abc")
    assert store.get_key("k_1") == rec and store.get_key_blob("k_1") == b"abc"
    assert [r.key_id for r in store.list_keys("acme")] == ["k_1"] and store.list_keys("evil") == []
    store.put_key(KeyRecord("k_old", "acme", "toy", now, now - 1, 3, "ab"), b"abc")
    assert store.get_key("k_old") is None  # expired keys are gone
    assert store.delete_key("k_1") and store.get_key("k_1") is None and store.get_key_blob("k_1") is None

    inf = InferenceRecord("i_1", "acme", "k_1", "toy", 1, "d1", False, now, now + 60)
    store.put_state(inf, b"S" * 1000)
    assert store.peek_state("i_1") == inf
    assert store.take_state("i_1", 2, "d1") is None  # wrong round
    assert store.take_state("i_1", 1, "dX") is None  # wrong digest
    # concurrent replies to one round: exactly one wins
    store.put_state(inf, b"S" * 1000)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.take_state("i_1", 1, "d1"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r is not None for r in results) == [False] * 7 + [True]
    assert store.peek_state("i_1") is None
    store.put_state(InferenceRecord("i_2", "acme", "k_1", "toy", 2, "d2", True, now, now + 60), None)
    assert store.peek_state("i_2").done and store.take_state("i_2", 2, "d2") is None
    counts = [store.hit("acme", 60)[0] for _ in range(3)]
    assert counts[-1] - counts[0] == 2
    # the previous window's count is reported for the sliding estimate
    cur, prev, now = store.hit("fast", 1)
    time.sleep(1.05 - (now % 1))
    assert store.hit("fast", 1)[1] == cur


def test_sqlite_store(tmp_path):
    store = SQLiteStore(tmp_path)
    _exercise_store(store)
    # keys survive a restart (a new store object on the same directory)
    now = time.time()
    store.put_key(KeyRecord("k_keep", "acme", "toy", now, now + 60, 1, "x"), b"z")
    assert SQLiteStore(tmp_path).get_key_blob("k_keep") == b"z"
    assert (tmp_path / "keys" / "k_keep.ctx").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(not have("redis-server"), reason="redis-server not installed (make system-deps)")
def test_redis_store(tmp_path):
    from service.store import RedisStore

    redis = start_redis(tmp_path)
    try:
        _exercise_store(RedisStore(redis.url))
    finally:
        redis.stop()


def test_context_with_secret_key_is_refused(tmp_path):
    engine = ToyEngine.load(make_toy_model(tmp_path), b"s" * 32)
    keys = ClientKeys.generate(engine.client_bundle()['ckks'], [])
    public = keys.public_keys_bytes()
    assert not ts.context_from(public).has_secret_key()
    engine.load_context(public)
    with pytest.raises(EngineError, match="secret key"):
        engine.load_context(keys.ctx.serialize(save_secret_key=True))
    with pytest.raises(EngineError):
        engine.load_context(public[: len(public) // 2])
