"""Service building blocks without a running server: settings, round tokens, stores, key checks."""

import os
import threading
import time

import pytest
import tenseal as ts

from cipherbert.launch import have, start_redis
from service.protocol import frames_digest, pack_envelope, round_token, token_matches, unpack_envelope
from service.settings import Settings, SettingsError, parse_api_keys, parse_rate_limit
from service.store import InferenceRecord, KeyRecord, SQLiteStore
from tests.support.toyengine import ClientKeys, EngineError, ToyEngine, make_toy_model


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
    assert store.get_state("i_1", 2, "d1") is None  # wrong round
    assert store.get_state("i_1", 1, "dX") is None  # wrong digest
    # concurrent replies to one round: exactly one advances it
    results = []
    nxt = InferenceRecord("i_1", "acme", "k_1", "toy", 2, "d2", False, now, now + 60)
    threads = [threading.Thread(target=lambda: results.append(store.advance_state(nxt, b"T", 1, "d1")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert store.peek_state("i_1").round == 2
    store.put_state(InferenceRecord("i_2", "acme", "k_1", "toy", 2, "d2", True, now, now + 60), None)
    assert store.peek_state("i_2").done and store.get_state("i_2", 2, "d2") is None
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


# settings ---------------------------------------------------------------------------------------

# Every variable the service has ever read (the names operators already use must keep working).
KNOWN_VARIABLES = {
    "CIPHERBERT_DATA_DIR", "CIPHERBERT_MODELS_DIR", "CIPHERBERT_API_KEYS", "CIPHERBERT_API_KEYS_FILE",
    "CIPHERBERT_SECRET", "CIPHERBERT_REDIS_URL", "CIPHERBERT_WORKERS", "CIPHERBERT_MAX_INFLIGHT",
    "CIPHERBERT_TENANT_INFLIGHT", "CIPHERBERT_RATE_LIMIT", "CIPHERBERT_KEY_TTL_S", "CIPHERBERT_INFERENCE_TTL_S",
    "CIPHERBERT_MAX_KEY_BYTES", "CIPHERBERT_MAX_FRAMES_BYTES", "CIPHERBERT_MAX_FRAMES", "CIPHERBERT_CTX_CACHE",
    "CIPHERBERT_ENGINE_WORKERS", "CIPHERBERT_WARM_TOKENS", "CIPHERBERT_ENGINE", "CIPHERBERT_MODELS",
    "CIPHERBERT_REPLICA_ID",
}


def test_settings_table_in_the_docs_is_generated_from_the_model():
    from pathlib import Path

    from service.settings import embed_settings_table, settings_table

    doc = (Path(__file__).resolve().parent.parent / "docs" / "service.md").read_text()
    assert embed_settings_table(doc) == doc, "run: python -m service.settings --write docs/service.md"
    table = settings_table()
    assert all(f"`{name}`" in table for name in KNOWN_VARIABLES)


def test_every_variable_is_declared_once_and_read_from_the_environment(tmp_path, monkeypatch):
    from service.settings import Settings, env_name

    assert {env_name(f) for f in Settings.model_fields} == KNOWN_VARIABLES
    env = {"DATA_DIR": str(tmp_path), "MODELS_DIR": "/m", "MODELS": "a, b", "API_KEYS": "t:key-12345678",
           "API_KEYS_FILE": "/k", "SECRET": "s" * 20, "REDIS_URL": "redis://h:1/0", "WORKERS": "3",
           "ENGINE_WORKERS": "2", "WARM_TOKENS": "32,64", "MAX_INFLIGHT": "9", "TENANT_INFLIGHT": "4",
           "RATE_LIMIT": "10/5", "KEY_TTL_S": "7", "INFERENCE_TTL_S": "8", "MAX_KEY_BYTES": "100",
           "MAX_FRAMES_BYTES": "200", "MAX_FRAMES": "3", "CTX_CACHE": "5", "ENGINE": "m:C", "REPLICA_ID": "r1"}
    for name, value in env.items():
        monkeypatch.setenv("CIPHERBERT_" + name, value)
    s = Settings()
    assert (s.data_dir, str(s.models_dir), s.models, s.api_keys, str(s.api_keys_file)) == (
        tmp_path, "/m", ["a", "b"], {"key-12345678": "t"}, "/k")
    assert (s.secret, s.redis_url, s.workers, s.engine_workers, s.warm_tokens) == (
        b"s" * 20, "redis://h:1/0", 3, 2, [32, 64])
    assert (s.max_inflight, s.tenant_inflight, s.rate_limit, s.key_ttl_s, s.inference_ttl_s) == (9, 4, (10, 5), 7, 8)
    assert (s.max_key_bytes, s.max_frames_bytes, s.max_frames, s.ctx_cache, s.engine, s.replica_id) == (
        100, 200, 3, 5, "m:C", "r1")
    assert Settings(workers=1).workers == 1  # keyword arguments (the CLI) win over the environment
    monkeypatch.setenv("CIPHERBERT_WORKERS", "")  # empty means unset, as before
    assert Settings().workers == 2


@pytest.mark.parametrize("name,value,expected", [
    ("WORKERS", "0", "CIPHERBERT_WORKERS (--workers): Input should be greater than or equal to 1"),
    ("WORKERS", "two", "CIPHERBERT_WORKERS (--workers): Input should be a valid integer"),
    ("RATE_LIMIT", "lots", "CIPHERBERT_RATE_LIMIT (--rate-limit): rate limit must look like N/SECONDS"),
    ("MAX_FRAMES", "-1", "CIPHERBERT_MAX_FRAMES: Input should be greater than 0"),
    ("WARM_TOKENS", "32,x", "CIPHERBERT_WARM_TOKENS: Input should be a valid integer"),
    ("API_KEYS", "nocolon", "CIPHERBERT_API_KEYS: expected tenant:key pairs"),
    ("SECRET", "too-short", "CIPHERBERT_SECRET: the server secret must be at least 16 bytes"),
])
def test_bad_values_fail_at_start_naming_the_variable(monkeypatch, name, value, expected):
    monkeypatch.setenv("CIPHERBERT_" + name, value)
    with pytest.raises(SettingsError) as info:
        Settings()
    assert str(info.value).startswith(expected), str(info.value)
    if name == "SECRET":
        assert value not in str(info.value)  # a secret is never echoed


def test_resolve_fills_in_limits_keys_and_secret_without_mutating(tmp_path, monkeypatch):
    monkeypatch.delenv("CIPHERBERT_API_KEYS", raising=False)
    monkeypatch.delenv("CIPHERBERT_SECRET", raising=False)
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"beta": ["key-bbbb-2"]}')
    base = Settings(data_dir=tmp_path / "d", workers=3, api_keys="acme:key-aaaa-1", api_keys_file=keys_file)
    resolved = base.resolve()
    assert (base.max_inflight, base.secret) == (0, None)  # the declared settings stay as given
    assert (resolved.max_inflight, resolved.tenant_inflight) == (12, 12)
    assert resolved.api_keys == {"key-aaaa-1": "acme", "key-bbbb-2": "beta"}
    assert resolved.secret == (tmp_path / "d" / "secret").read_bytes() and resolved.generated_keys_file is None
    dev = Settings(data_dir=tmp_path / "dev").resolve()  # nothing configured: one development key, kept
    assert dev.generated_keys_file == tmp_path / "dev" / "api_keys"
    assert list(dev.api_keys.values()) == ["default"] and Settings(data_dir=tmp_path / "dev").resolve().api_keys == dev.api_keys
    with pytest.raises(Exception, match="frozen"):
        resolved.workers = 1


def test_serve_flags_override_the_environment(tmp_path, monkeypatch):
    from cipherbert.cli import SERVE_FLAGS, build_parser, serve_settings

    parser = build_parser()
    serve = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("serve"))
    flags = {opt for action in serve._actions for opt in action.option_strings}
    for name, info in Settings.model_fields.items():
        cli = (info.json_schema_extra or {}).get("cli")
        assert cli is None or cli in flags, (name, cli)
    assert set(SERVE_FLAGS.values()) <= set(Settings.model_fields)
    monkeypatch.setenv("CIPHERBERT_WORKERS", "3")
    monkeypatch.setenv("CIPHERBERT_API_KEYS", "env:key-eeee-1")
    keys = tmp_path / "keys"
    keys.write_text("file:key-ffff-1\n")
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path), "--workers", "1", "--api-keys", str(keys),
                              "--rate-limit", "5/10", "--model", "a", "--model", "b"])
    s = serve_settings(args)
    assert (s.workers, s.rate_limit, s.models, s.api_keys) == (1, (5, 10), ["a", "b"], {"key-ffff-1": "file"})
    assert serve_settings(parser.parse_args(["serve", "--data-dir", str(tmp_path)])).workers == 3


# contracts ----------------------------------------------------------------------------------------


def test_worker_jobs_return_step_outputs_across_a_real_pool(tmp_path):
    """The worker answers with StepResult(StepOutput) objects that survive the process boundary."""
    import concurrent.futures
    import multiprocessing
    import pickle

    from he_models.engine import StepOutput
    from service import worker
    from service.contracts import Engine, StepResult
    from service.store import StoreConfig

    models = tmp_path / "models"
    engine = ToyEngine.load(make_toy_model(models), b"s" * 32)
    assert isinstance(engine, Engine)  # the stand-in satisfies the engine contract
    config = worker.WorkerConfig(models_dir=models, engine="tests.support.toyengine:ToyEngine",
                                 engine_secret=b"s" * 32, store=StoreConfig(data_dir=tmp_path / "data"))
    keys = ClientKeys.generate(engine.client_bundle()["ckks"], [])
    frames = [ts.ckks_vector(keys.ctx, [0.5] * engine.hidden).serialize() for _ in range(2)]
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=worker.init, initargs=(config,)) as pool:
        info = pool.submit(worker.describe).result()
        assert info.models["toy"].max_tokens == engine.max_tokens and not info.errors
        assert {f.name for f in info.models["toy"].files} == set(engine.client_bundle_files())
        assert pool.submit(worker.validate_key, "toy", "k_1", keys.public_keys_bytes()).result() >= 0
        result = pool.submit(worker.start, "toy", "k_1", "i_1", 2, frames).result()
    assert isinstance(result, StepResult) and isinstance(result.step, StepOutput)
    assert (result.step.inference_id, result.step.round, result.step.done, result.step.kind) == ("i_1", 1, False, "refresh")
    assert result.pid != os.getpid() and result.seconds > 0 and not result.context_loaded  # cached by validate_key
    assert pickle.loads(pickle.dumps(result)) == result
