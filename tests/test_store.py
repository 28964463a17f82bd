"""The store contract (service.contracts.Store), method by method, on every implementation.

SQLite always; Redis against a real redis-server when one is installed. Each test states one property
the service relies on: expiry, tenant isolation, take-once rounds, the sliding-window counters.
"""

import threading
import time

import pytest

from cipherbert.launch import free_port, have, start_redis
from service.contracts import Store
from service.store import InferenceRecord, KeyRecord, RedisStore, SQLiteStore, StoreConfig, StoreError, open_store

BACKENDS = [
    "sqlite",
    pytest.param(
        "redis",
        marks=pytest.mark.skipif(not have("redis-server"), reason="redis-server not installed (make system-deps)"),
    ),
]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if not have("redis-server"):
        pytest.skip("redis-server not installed")
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc.url
    proc.stop()


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(StoreConfig(data_dir=tmp_path))
        assert isinstance(s, SQLiteStore)
    else:
        s = open_store(StoreConfig(data_dir=tmp_path, redis_url=request.getfixturevalue("redis_url")))
        assert isinstance(s, RedisStore)
        s.r.flushdb()
    yield s
    s.close()


def key(key_id="k_1", tenant="acme", ttl=60.0):
    now = time.time()
    return KeyRecord(key_id, tenant, "toy", now, now + ttl, 3, "ab")


def inference(inference_id="i_1", round=1, digest="d1", done=False, ttl=60.0):
    now = time.time()
    return InferenceRecord(inference_id, "acme", "k_1", "toy", round, digest, done, now, now + ttl)


COVERED = {
    "put_key",
    "get_key",
    "get_key_blob",
    "list_keys",
    "delete_key",
    "put_state",
    "peek_state",
    "get_state",
    "advance_state",
    "drop_state",
    "delete_state",
    "hit",
    "unhit",
    "ping",
    "close",
}


def test_the_protocol_is_what_these_tests_cover(store):
    assert isinstance(store, Store)
    assert {name for name in vars(Store) if not name.startswith("_")} == COVERED


def test_keys_round_trip_and_stay_with_their_tenant(store):
    rec = key()
    store.put_key(rec, b"abc")
    assert store.get_key("k_1") == rec
    assert store.get_key_blob("k_1") == b"abc"
    store.put_key(key("k_2"), b"def")
    store.put_key(key("k_other", tenant="evil"), b"x")
    assert [r.key_id for r in store.list_keys("acme")] == ["k_1", "k_2"]  # oldest first
    assert [r.key_id for r in store.list_keys("evil")] == ["k_other"]
    assert store.list_keys("nobody") == []
    assert store.get_key("k_missing") is None and store.get_key_blob("k_missing") is None


def test_expired_keys_are_gone(store):
    store.put_key(key("k_old", ttl=-1.0), b"abc")
    assert store.get_key("k_old") is None
    assert store.list_keys("acme") == []


def test_delete_key_removes_record_and_blob(store):
    store.put_key(key(), b"abc")
    assert store.delete_key("k_1") is True
    assert store.get_key("k_1") is None and store.get_key_blob("k_1") is None
    assert store.list_keys("acme") == []
    assert store.delete_key("k_1") is False


def test_state_is_read_only_for_the_right_round_and_digest_and_stays(store):
    rec = inference()
    store.put_state(rec, b"S" * 1000)
    assert store.peek_state("i_1") == rec
    assert store.get_state("i_1", 2, "d1") is None  # wrong round
    assert store.get_state("i_1", 1, "dX") is None  # wrong digest
    assert store.get_state("i_1", 1, "d1") == b"S" * 1000
    assert store.get_state("i_1", 1, "d1") == b"S" * 1000  # kept until its successor is written
    assert store.peek_state("i_1") == rec


def test_advance_is_a_compare_and_swap(store):
    store.put_state(inference(), b"round one")
    assert not store.advance_state(inference(round=2, digest="d2"), b"round two", 1, "dX")  # stale digest
    assert not store.advance_state(inference(round=2, digest="d2"), b"round two", 2, "d1")  # stale round
    assert store.get_state("i_1", 1, "d1") == b"round one"
    assert store.advance_state(inference(round=2, digest="d2"), b"round two", 1, "d1")
    assert store.peek_state("i_1").round == 2 and store.get_state("i_1", 2, "d2") == b"round two"
    assert store.get_state("i_1", 1, "d1") is None
    assert not store.advance_state(inference(round=2, digest="d2"), b"again", 1, "d1")  # a replay loses
    assert store.advance_state(inference(round=3, digest="d3", done=True), None, 2, "d2")
    assert store.peek_state("i_1").done and store.get_state("i_1", 3, "d3") is None  # a tombstone
    assert not store.advance_state(inference(round=4, digest="d4"), b"x", 3, "d3")  # nothing after done


def test_concurrent_replies_to_one_round_have_one_winner(store):
    store.put_state(inference(), b"S" * 1000)
    results = []

    def answer(i):
        results.append(store.advance_state(inference(round=2, digest=f"next{i}"), b"T" * 1000, 1, "d1"))

    threads = [threading.Thread(target=answer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    winner = store.peek_state("i_1")
    assert winner.round == 2 and store.get_state("i_1", 2, winner.digest) == b"T" * 1000


def test_drop_ends_the_inference_only_at_its_round(store):
    store.put_state(inference(), b"S")
    assert not store.drop_state("i_1", 2, "d1")
    assert store.drop_state("i_1", 1, "d1")
    assert store.peek_state("i_1") is None and not store.drop_state("i_1", 1, "d1")


def test_put_state_replaces_the_round_and_a_finished_inference_is_a_tombstone(store):
    store.put_state(inference(), b"round one")
    store.put_state(inference(round=2, digest="d2"), b"round two")
    assert store.peek_state("i_1").round == 2
    assert store.get_state("i_1", 1, "d1") is None
    store.put_state(inference(round=3, digest="d3", done=True), None)
    assert store.peek_state("i_1").done
    assert store.get_state("i_1", 3, "d3") is None  # nothing to resume once done


def test_expired_and_deleted_state_is_gone(store):
    store.put_state(inference("i_old", ttl=-1.0), b"S")
    assert store.peek_state("i_old") is None and store.get_state("i_old", 1, "d1") is None
    assert not store.advance_state(inference("i_old", round=2, digest="d2"), b"T", 1, "d1")
    store.put_state(inference("i_2"), b"S")
    assert store.delete_state("i_2") is True
    assert store.peek_state("i_2") is None and store.delete_state("i_2") is False


def test_hit_counts_per_bucket_and_unhit_takes_back(store):
    if time.time() % 60 > 58:  # stay inside one 60 s window
        time.sleep(60.05 - time.time() % 60)
    counts = [store.hit("acme", 60)[0] for _ in range(3)]
    assert counts[1] - counts[0] == 1 and counts[2] - counts[0] == 2
    assert store.hit("beta", 60)[0] == 1  # buckets are independent
    cur, _, now = store.hit("acme", 60)
    store.unhit("acme", 60, now)
    assert store.hit("acme", 60)[0] == cur  # the refused request no longer counts


def test_hit_reports_the_previous_window(store):
    cur, prev, now = store.hit("fast", 1)
    time.sleep(1.05 - (now % 1))
    this, previous, _ = store.hit("fast", 1)
    assert this == 1 and previous == cur


def test_ping(store):
    assert store.ping() is True


def test_sqlite_keys_survive_a_new_store_object(tmp_path):
    SQLiteStore(tmp_path).put_key(key("k_keep"), b"z")
    again = SQLiteStore(tmp_path)
    assert again.get_key_blob("k_keep") == b"z" and again.get_key("k_keep").tenant == "acme"
    assert (tmp_path / "keys" / "k_keep.ctx").stat().st_mode & 0o777 == 0o600


def test_unreachable_redis_is_a_store_error():
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreError):
        store.ping()
    with pytest.raises(StoreError):
        store.get_key("k_1")
