"""Bounded uploads and per-tenant quotas against real servers on loopback (toy engine: the engine's cost
is irrelevant here). Refusals come before the body is read, from the Content-Length alone."""

import re
import socket
import time

import httpx
import pytest

from cipherbert.launch import have, start_redis, start_server
from he_models.wire import pack_frames
from tests.support.toyengine import ClientKeys, Embedder, encrypt_embeddings, make_toy_model, toy_client

MIB = 1 << 20
ACME, BULK, OTHER, INF = "acme-key-0001", "bulk-key-0001", "other-key-001", "infer-key-001"
KEYS = f"acme:{ACME},bulk:{BULK},other:{OTHER},inf:{INF}"
TOY = "tests.support.toyengine:ToyEngine"
# one toy key is ~6.56 MB: two fit the key-byte quota (20 MB) and the stored-byte quota (15 MB), three do not
LIMITS = {
    "CIPHERBERT_MAX_KEY_BYTES": str(16 * MIB),
    "CIPHERBERT_MAX_FRAMES_BYTES": str(4 * MIB),
    "CIPHERBERT_UPLOAD_BUDGET_BYTES": str(24 * MIB),
    "CIPHERBERT_TENANT_UPLOAD_BYTES": str(20 * MIB),
    "CIPHERBERT_TENANT_MAX_KEYS": "2",
    "CIPHERBERT_TENANT_MAX_KEY_BYTES": str(20_000_000),
    "CIPHERBERT_TENANT_MAX_STORED_BYTES": str(15_000_000),
    "CIPHERBERT_TENANT_MAX_INFERENCES": "2",
    "CIPHERBERT_RATE_LIMIT": "off",
    "CIPHERBERT_SECRET": "s" * 32,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    make_toy_model(models)
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    proc = start_server(
        tmp_path_factory.mktemp("limits"), api_keys=KEYS, models_dir=models, engine=TOY, workers=1, env=LIMITS
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def toy_keys(server):
    bundle = httpx.get(f"{server.url}/v1/models/toy/bundle", headers=h(ACME)).json()
    return ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])


def h(key, **extra):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream", **extra}


def register(server, key, body):
    return httpx.post(f"{server.url}/v1/keys", params={"model": "toy"}, content=body, headers=h(key), timeout=60)


def headers_only(server, key, path, length):
    """A request that declares `length` body bytes and sends none: returns (the open socket, request)."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
    )
    return sock


def answer_of(sock) -> tuple[int, str]:
    """Status and body of the answer on a socket (the server answers before any body byte arrived)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def _length(data: bytes) -> int:
    m = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n", 1)[0], re.I)
    return int(m.group(1)) if m else 0


def upload_gauge(server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return float(re.search(r"^cipherbert_upload_bytes (\S+)$", text, re.M).group(1))


def assert_error(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"] == code and r.json()["detail"], r.text


def test_oversized_uploads_are_refused_from_the_content_length(server):
    for path, limit in (("/v1/keys?model=toy", 16 * MIB), ("/v1/inferences?model=toy&key_id=k&n_tokens=1", 4 * MIB)):
        sock = headers_only(server, ACME, path, limit + 1)
        status, body = answer_of(sock)  # no body byte was sent: the refusal did not wait for one
        sock.close()
        assert status == 413 and '"too_large"' in body, body


def test_the_upload_budget_is_shared_and_released(server):
    stalled = headers_only(server, BULK, "/v1/keys?model=toy", 12 * MIB)  # holds 12 MiB of the 24 MiB budget
    stalled.sendall(b"x" * MIB)
    deadline = time.time() + 10
    while upload_gauge(server) < 12 * MIB and time.time() < deadline:
        time.sleep(0.05)
    assert upload_gauge(server) >= 12 * MIB
    over = headers_only(server, OTHER, "/v1/keys?model=toy", 13 * MIB)  # 12 + 13 > 24: the replica's budget
    status, body = answer_of(over)
    over.close()
    assert status == 429 and '"upload_budget"' in body and "CIPHERBERT_UPLOAD_BUDGET_BYTES" in body, body
    share = headers_only(server, BULK, "/v1/keys?model=toy", 9 * MIB)  # 12 + 9 > 20: the tenant's share
    status, body = answer_of(share)
    share.close()
    assert status == 429 and '"tenant_upload_budget"' in body, body
    stalled.close()  # the client goes away mid-body: its reservation and spool file go back
    deadline = time.time() + 10
    while upload_gauge(server) > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert upload_gauge(server) == 0
    assert_error(register(server, OTHER, b"\0" * (3 * MIB)), 400, "rejected_by_engine")  # spooled, refused
    assert not list((server.extra["data_dir"] / "spool").iterdir())


def test_key_quotas_count_keys_and_bytes(server, toy_keys):
    public = toy_keys.public_keys_bytes()
    first, second = register(server, ACME, public), register(server, ACME, public)
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    third = register(server, ACME, public)
    assert_error(third, 403, "key_quota")
    assert "CIPHERBERT_TENANT_MAX_KEYS=2" in third.json()["detail"]
    assert register(server, BULK, public).status_code == 201  # another tenant's quota is its own
    assert httpx.delete(f"{server.url}/v1/keys/{second.json()['key_id']}", headers=h(ACME)).status_code == 204
    sock = headers_only(server, ACME, "/v1/keys?model=toy", 14_000_000)  # 6.56 + 14 MB > 20 MB of keys
    status, body = answer_of(sock)
    sock.close()
    assert status == 403 and '"key_bytes_quota"' in body, body
    sock = headers_only(server, ACME, "/v1/keys?model=toy", 9_000_000)  # keys fit (15.6 MB), keys + rounds not
    status, body = answer_of(sock)
    sock.close()
    assert status == 403 and '"stored_bytes_quota"' in body and "CIPHERBERT_TENANT_MAX_STORED_BYTES" in body, body
    assert register(server, ACME, public).status_code == 201  # back under every quota


def start(server, keys, key_id, embedder, text="a fine film"):
    emb = embedder.embed(text)
    return httpx.post(
        f"{server.url}/v1/inferences",
        params={"model": "toy", "key_id": key_id, "n_tokens": len(emb)},
        content=pack_frames(encrypt_embeddings(keys, emb)),
        headers=h(INF),
    )


def test_pending_inferences_have_a_quota(server, toy_keys, models):
    key_id = register(server, INF, toy_keys.public_keys_bytes()).json()["key_id"]
    embedder = Embedder(models / "toy")
    started = [start(server, toy_keys, key_id, embedder) for _ in range(2)]
    assert all(r.status_code == 200 for r in started), [r.text for r in started]
    third = start(server, toy_keys, key_id, embedder)
    assert_error(third, 429, "inference_quota")
    assert third.headers["Retry-After"] and "CIPHERBERT_TENANT_MAX_INFERENCES=2" in third.json()["detail"]
    iid = started[0].headers["X-Cipherbert-Inference"]
    assert httpx.delete(f"{server.url}/v1/inferences/{iid}", headers=h(INF)).status_code == 204
    assert start(server, toy_keys, key_id, embedder).status_code == 200  # an aborted one frees its place


@pytest.mark.skipif(not have("redis-server"), reason="redis-server not installed (make system-deps)")
def test_replicas_share_the_quotas_through_redis(tmp_path, models, toy_keys):
    redis = start_redis(tmp_path)
    env = {**LIMITS, "CIPHERBERT_REDIS_URL": redis.url, "CIPHERBERT_TENANT_MAX_KEYS": "1"}
    replicas = []
    try:
        for i in range(2):
            replicas.append(
                start_server(
                    tmp_path, api_keys=KEYS, models_dir=models, engine=TOY, workers=1, env=env, replica_id=f"r{i}"
                )
            )
        public = toy_keys.public_keys_bytes()
        assert register(replicas[0], ACME, public).status_code == 201
        assert_error(register(replicas[1], ACME, public), 403, "key_quota")  # the other replica counts it too
        assert register(replicas[1], BULK, public).status_code == 201
    finally:
        for proc in replicas + [redis]:
            proc.stop()


def test_the_sdk_renews_its_key_before_it_expires(tmp_path, models):
    """Keys live 3 s: the SDK registers a new one whenever less than an inference's worth of time remains,
    so no request ever meets an expired key (no 404) and every inference succeeds."""
    srv = start_server(
        tmp_path,
        api_keys=KEYS,
        models_dir=models,
        engine=TOY,
        workers=1,
        env={"CIPHERBERT_KEY_TTL_S": "3", "CIPHERBERT_RATE_LIMIT": "off", "CIPHERBERT_SECRET": "s" * 32},
    )
    statuses, posted_keys = [], []

    class Recorder(httpx.HTTPTransport):
        def handle_request(self, request):
            resp = super().handle_request(request)
            statuses.append(resp.status_code)
            if request.url.path == "/v1/keys" and request.method == "POST":
                posted_keys.append(resp.status_code)
            return resp

    try:
        with toy_client(srv.url, ACME, cache_dir=tmp_path / "sdk", transport=Recorder()) as client:
            results, t_end = [], time.time() + 8
            while time.time() < t_end or len(results) < 6:  # 8 s of inferences, however slow the machine
                results.append(client.classify("a fine film"))
                time.sleep(0.2)
            margin = client.renew_margin()
    finally:
        srv.stop()
    assert all(r.label in ("negative", "positive") for r in results)
    assert all(r.restarts == 0 for r in results)
    assert 404 not in statuses and max(statuses) < 400, sorted(set(statuses))
    assert len(posted_keys) >= 3  # 8 s of keys that live 3 s: renewed, never run out
    assert margin > 1.0  # twice the slowest inference + a registration + 1 s
