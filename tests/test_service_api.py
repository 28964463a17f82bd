"""The HTTP API against a real uvicorn server (toy engine: fast, same protocol as the real one).

Bad input of every kind must come back as a 4xx with a JSON error body, never a 5xx.
"""

import sqlite3
import time

import httpx
import numpy as np
import pytest
import tenseal as ts

from cipherbert.launch import start_server
from clients.sdk import CipherbertError, Client
from he_models.wire import pack_frames
from service.protocol import unpack_envelope
from tests.support.toyengine import ClientKeys, Embedder, encrypt_embeddings, make_toy_model, toy_client

ACME, EVIL, LIMITED = "acme-key-0001", "evil-key-0001", "limited-key-01"
KEYS = f"acme:{ACME},evil:{EVIL},limited:{LIMITED}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    models = tmp / "models"
    make_toy_model(models)
    proc = start_server(tmp, api_keys=KEYS, models_dir=models, engine="tests.support.toyengine:ToyEngine", workers=1,
                        env={"CIPHERBERT_RATE_LIMIT": "100/60", "CIPHERBERT_MAX_KEY_BYTES": str(16 << 20),
                             "CIPHERBERT_MAX_FRAMES_BYTES": str(4 << 20), "CIPHERBERT_SECRET": "s" * 32})
    proc.extra["models"] = models
    yield proc
    proc.stop()


def h(key=ACME, **extra):
    return {"Authorization": f"Bearer {key}", **extra}


@pytest.fixture(scope="module")
def registered(server):
    """A toy key pair registered for tenant acme: (keys, key_id, embedder)."""
    bundle = httpx.get(f"{server.url}/v1/models/toy/bundle", headers=h()).json()
    keys = ClientKeys.generate(bundle['ckks'], bundle['galois_steps'])
    r = httpx.post(f"{server.url}/v1/keys", params={"model": "toy"}, content=keys.public_keys_bytes(),
                   headers=h(**{"Content-Type": "application/octet-stream"}))
    assert r.status_code == 201, r.text
    return keys, r.json()["key_id"], Embedder(server.extra["models"] / "toy")


def start(server, keys, key_id, embedder, text="a fine film", key=ACME):
    emb = embedder.embed(text)
    body = pack_frames(encrypt_embeddings(keys, emb))
    return httpx.post(f"{server.url}/v1/inferences", params={"model": "toy", "key_id": key_id, "n_tokens": len(emb)},
                      content=body, headers=h(key, **{"Content-Type": "application/octet-stream"}))


def reply_frames(keys, frames):
    return pack_frames([ts.ckks_vector(keys.ctx, ts.ckks_vector_from(keys.ctx, f).decrypt()).serialize()
                        for f in frames])


def assert_error(r, status, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["detail"] and body["error"]
    if code:
        assert body["error"] == code, body


def test_health_ready_metrics_docs(server):
    assert httpx.get(f"{server.url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/keys" in schema["paths"] and "/v1/inferences" in schema["paths"]
    assert "cipherbert_http_requests_total" in httpx.get(f"{server.url}/metrics").text


def test_auth_required(server):
    assert_error(httpx.get(f"{server.url}/v1/models"), 401, "unauthorized")
    assert_error(httpx.get(f"{server.url}/v1/models", headers=h("nope-nope-nope")), 401, "unauthorized")
    models = httpx.get(f"{server.url}/v1/models", headers=h()).json()["models"]
    assert [m["model_id"] for m in models] == ["toy"]
    assert_error(httpx.get(f"{server.url}/v1/models/nope/bundle", headers=h()), 404, "unknown_model")
    assert_error(httpx.get(f"{server.url}/v1/models/toy/bundle/files/..%2Fweights.json", headers=h()), 404)


def test_full_round_trip_over_http(server, registered):
    keys, key_id, embedder = registered
    r = start(server, keys, key_id, embedder)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/vnd.cipherbert.frames")
    header, frames = unpack_envelope(r.content)
    assert header["done"] is False and header["round"] == 1 and header["round_token"]
    assert r.headers["X-Cipherbert-Round-Token"] == header["round_token"]
    url = f"{server.url}/v1/inferences/{header['inference_id']}/rounds/1"
    tok = {"X-Cipherbert-Round-Token": header["round_token"]}
    body = reply_frames(keys, frames)
    # forged token -> 403, round stays answerable
    forged = header["round_token"][:-2] + ("AA" if not header["round_token"].endswith("AA") else "BB")
    assert_error(httpx.post(url, content=body, headers=h(**{"X-Cipherbert-Round-Token": forged})), 403,
                 "bad_round_token")
    assert_error(httpx.post(url, content=body, headers=h()), 400, "missing_round_token")
    # another tenant cannot answer it
    assert_error(httpx.post(url, content=body, headers=h(EVIL, **tok)), 404, "unknown_inference")
    # wrong round number
    assert_error(httpx.post(url.replace("/rounds/1", "/rounds/2"), content=body, headers=h(**tok)), 409)
    # truncated reply: 400, and the round is still open
    assert_error(httpx.post(url, content=body[:-10], headers=h(**tok)), 400, "bad_frames")
    r2 = httpx.post(url, content=body, headers=h(**tok))
    assert r2.status_code == 200, r2.text
    final, logits = unpack_envelope(r2.content)
    assert final["done"] is True and final["round_token"] is None
    got = np.array(ts.ckks_vector_from(keys.ctx, logits[0]).decrypt())
    assert got.shape == (2,)
    # replaying the same round token -> 409
    assert_error(httpx.post(url, content=body, headers=h(**tok)), 409, "inference_finished")


def test_replay_mid_inference_and_abort(server, registered):
    keys, key_id, embedder = registered
    header, frames = unpack_envelope(start(server, keys, key_id, embedder, "so so").content)
    url = f"{server.url}/v1/inferences/{header['inference_id']}"
    assert_error(httpx.delete(url, headers=h(EVIL)), 404)
    assert httpx.delete(url, headers=h()).status_code == 204
    r = httpx.post(f"{url}/rounds/1", content=reply_frames(keys, frames),
                   headers=h(**{"X-Cipherbert-Round-Token": header["round_token"]}))
    assert_error(r, 404, "unknown_inference")


def test_bad_ciphertexts_are_4xx(server, registered):
    keys, key_id, embedder = registered
    q = {"model": "toy", "key_id": key_id, "n_tokens": 2}
    url = f"{server.url}/v1/inferences"
    good = encrypt_embeddings(keys, embedder.embed("two words"))
    cases = {
        "garbage": b"hello world",
        "truncated": pack_frames(good)[:-100],
        "not a ciphertext": pack_frames([b"\x00" * 64, b"\x01" * 64]),
        "wrong count": pack_frames(good[:1]),
        "empty": pack_frames([]),
    }
    for name, body in cases.items():
        r = httpx.post(url, params=q, content=body, headers=h())
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert r.json()["detail"], name
    # a ciphertext made under different parameters (N=8192)
    other = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    other.global_scale = 2 ** 40
    bad = [ts.ckks_vector(other, [1.0] * 8).serialize() for _ in range(2)]
    assert_error(httpx.post(url, params=q, content=pack_frames(bad), headers=h()), 400)
    assert_error(httpx.post(url, params={**q, "n_tokens": 0}, content=pack_frames(good), headers=h()), 422)
    assert_error(httpx.post(url, params={**q, "n_tokens": 999}, content=pack_frames(good), headers=h()), 422)
    assert_error(httpx.post(url, params={**q, "model": "nope"}, content=pack_frames(good), headers=h()), 404)
    assert_error(httpx.post(url, params={"model": "toy", "n_tokens": 2}, content=pack_frames(good), headers=h()), 422)
    # oversized upload (limit 4 MiB)
    assert_error(httpx.post(url, params=q, content=b"\0" * (5 << 20), headers=h()), 413, "too_large")
    assert_error(httpx.post(url, params=q, content=pack_frames(good), headers=h(**{"Content-Type": "text/plain"})),
                 415)
    # multipart works too
    emb = embedder.embed("two words")
    r = httpx.post(url, data={"model": "toy", "key_id": key_id, "n_tokens": str(len(emb))},
                   files={"frames": ("frames.bin", pack_frames(encrypt_embeddings(keys, emb)))}, headers=h())
    assert r.status_code == 200, r.text
    # the server is still healthy
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_key_registry_checks(server, registered):
    keys, key_id, embedder = registered
    url = f"{server.url}/v1/keys"
    secret = keys.ctx.serialize(save_secret_key=True)
    assert_error(httpx.post(url, params={"model": "toy"}, content=secret, headers=h()), 400)
    assert "secret key" in httpx.post(url, params={"model": "toy"}, content=secret, headers=h()).json()["detail"]
    assert_error(httpx.post(url, params={"model": "toy"}, content=b"not a context", headers=h()), 400)
    assert_error(httpx.post(url, params={"model": "toy"}, content=b"", headers=h()), 400, "empty_context")
    assert_error(httpx.post(url, params={"model": "nope"}, content=b"x", headers=h()), 404)
    assert_error(httpx.post(url, content=b"x", headers=h()), 422, "missing_parameter")
    assert_error(httpx.post(url, params={"model": "toy"}, content=b"\0" * (17 << 20), headers=h()), 413)
    other = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    assert_error(httpx.post(url, params={"model": "toy"}, content=other.serialize(save_secret_key=False),
                            headers=h()), 400)
    # multipart upload of the public context
    r = httpx.post(url, data={"model": "toy"}, files={"context": ("ctx", keys.public_keys_bytes())}, headers=h())
    assert r.status_code == 201, r.text
    extra = r.json()["key_id"]
    # tenant isolation: evil cannot see, use or delete acme's key
    assert extra not in [k["key_id"] for k in httpx.get(url, headers=h(EVIL)).json()["keys"]]
    assert extra in [k["key_id"] for k in httpx.get(url, headers=h()).json()["keys"]]
    assert_error(httpx.get(f"{url}/{extra}", headers=h(EVIL)), 404, "unknown_key")
    assert_error(httpx.delete(f"{url}/{extra}", headers=h(EVIL)), 404, "unknown_key")
    assert_error(start(server, keys, extra, embedder, key=EVIL), 404, "unknown_key")
    assert httpx.delete(f"{url}/{extra}", headers=h()).status_code == 204
    assert_error(start(server, keys, extra, embedder), 404, "unknown_key")


def test_expired_key_is_refused(server, registered):
    keys, _, embedder = registered
    r = httpx.post(f"{server.url}/v1/keys", params={"model": "toy"}, content=keys.public_keys_bytes(), headers=h())
    key_id = r.json()["key_id"]
    db = sqlite3.connect(server.extra["data_dir"] / "store.sqlite3")
    db.execute("UPDATE keys SET expires_at = ? WHERE key_id = ?", (time.time() - 1, key_id))
    db.commit()
    db.close()
    assert_error(start(server, keys, key_id, embedder), 404, "unknown_key")


def test_rate_limit_answers_429_with_retry_after(server):
    codes = [httpx.post(f"{server.url}/v1/keys", params={"model": "toy"}, content=b"",
                        headers=h(LIMITED)).status_code for _ in range(103)]
    # 100 allowed per 60 s; the sliding estimate may let one more through if a window boundary passes
    assert 429 in codes and 100 <= codes.index(429) <= 101 and set(codes[:codes.index(429)]) == {400}
    assert codes[-1] == 429  # refusals do not count, but the allowance is still used up
    r = httpx.post(f"{server.url}/v1/keys", params={"model": "toy"}, content=b"", headers=h(LIMITED))
    assert_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) >= 1


def test_sdk_keeps_secret_local(server, tmp_path):
    uploads = []

    class Recorder(httpx.HTTPTransport):
        def handle_request(self, request):
            if request.url.path == "/v1/keys" and request.method == "POST":
                uploads.append(request.read())
            for_body = request.content if request.method == "POST" else b""
            request.extensions.setdefault("sent", len(for_body))
            return super().handle_request(request)

    with toy_client(server.url, ACME, cache_dir=tmp_path, transport=Recorder()) as client:
        result = client.classify("what a terrible waste of time")
        again = client.classify_batch(["a fine movie", "bad"])
        texts = ["a fine movie", "bad", "so so", "the best", "awful"]
        parallel = client.classify_batch(texts, concurrency=3)
        sequential = client.classify_batch(texts)
        assert [r.label for r in parallel] == [r.label for r in sequential]
        assert np.allclose([r.logits for r in parallel], [r.logits for r in sequential], atol=0.05)
    assert result.label in ("negative", "positive") and result.rounds == 1
    assert abs(sum(result.probabilities) - 1) < 1e-9 and result.upload_bytes > 0 and result.download_bytes > 0
    assert len(again) == 2
    # the uploaded context deserializes without a secret key
    assert len(uploads) == 1
    assert not ts.context_from(uploads[0]).has_secret_key()
    secrets = list((tmp_path / "keys").rglob("*.secret"))
    assert len(secrets) == 1 and secrets[0].stat().st_mode & 0o777 == 0o600
    assert secrets[0].parent.stat().st_mode & 0o777 == 0o700
    assert ts.context_from(secrets[0].read_bytes()).has_secret_key()
    # plaintext agreement of the toy model
    from tests.support.toyengine import ToyEngine

    engine = ToyEngine.load(server.extra["models"] / "toy", b"s" * 32)
    emb = Embedder(server.extra["models"] / "toy").embed("what a terrible waste of time")
    assert np.allclose(result.logits, engine.plaintext_logits(emb), atol=0.05)
    # a second client reuses the keystore and the registered key (no new upload)
    with toy_client(server.url, ACME, cache_dir=tmp_path, transport=Recorder()) as client:
        key_id = client.register_keys()
        client.classify("fine")
        assert len(uploads) == 1
        # the key is deleted behind the session's back: the SDK registers again and carries on
        httpx.delete(f"{server.url}/v1/keys/{key_id}", headers=h())
        assert client.classify("fine again").label in ("negative", "positive")
        assert len(uploads) == 2 and client.register_keys() != key_id


def test_sdk_refuses_a_bundle_for_another_client_half(server, tmp_path):
    """The default SDK (he_models' client half) meets the stand-in's bundle: a clear error, no key made."""
    with Client(server.url, ACME, cache_dir=tmp_path) as client:
        with pytest.raises(CipherbertError, match="needs the client half 'tests.support.toyengine'.*client_half="):
            client.register_keys()
        assert client.bundle()[0]["client_module"] == "tests.support.toyengine"
    assert not list((tmp_path / "keys").rglob("*.secret"))  # refused before any key was made


def test_saturation_answers_429_with_retry_after(server, tmp_path, monkeypatch):
    """In-process app with every engine slot taken: 429 + Retry-After, nothing consumed."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    monkeypatch.setenv("CIPHERBERT_API_KEYS", f"acme:{ACME}")
    app = create_app(Settings(data_dir=tmp_path, models_dir=server.extra["models"],
                              engine="tests.support.toyengine:ToyEngine", workers=1))
    svc = app.state.service
    with TestClient(app) as tc:
        deadline = time.time() + 60
        while not svc.ready and time.time() < deadline:
            time.sleep(0.1)
        assert svc.ready
        svc.inflight = svc.settings.max_inflight
        r = tc.post("/v1/keys", params={"model": "toy"}, content=b"x", headers=h())
        assert r.status_code == 429 and r.headers["Retry-After"] and r.json()["error"] == "busy"
        svc.inflight = 0
        assert tc.get("/readyz").status_code == 200


def test_keys_survive_a_restart(tmp_path):
    """Embedded store: a key registered before a restart still works after it (same data dir)."""
    models = tmp_path / "models"
    make_toy_model(models)
    data = tmp_path / "data"
    from cipherbert.launch import free_port

    opts = dict(api_keys=f"acme:{ACME}", models_dir=models, engine="tests.support.toyengine:ToyEngine", workers=1,
                data_dir=data, port=free_port())  # same URL: the SDK's keystore is per server URL
    first = start_server(tmp_path, **opts)
    try:
        with toy_client(first.url, ACME, cache_dir=tmp_path / "c") as client:
            key_id = client.register_keys()
            before = client.classify("a fine film").logits
    finally:
        first.stop()
    second = start_server(tmp_path, **opts)
    try:
        with toy_client(second.url, ACME, cache_dir=tmp_path / "c") as client:
            assert client.register_keys() == key_id  # found alive, not re-registered
            after = client.classify("a fine film").logits
    finally:
        second.stop()
    assert np.allclose(before, after, atol=0.05)


def test_engine_worker_crash_is_survived(tmp_path):
    """A killed engine process gives a 503 + Retry-After at most; the pool restarts and serves again."""
    import os
    import signal
    from pathlib import Path

    models = tmp_path / "models"
    make_toy_model(models)
    server = start_server(tmp_path, api_keys=f"acme:{ACME}", models_dir=models,
                          engine="tests.support.toyengine:ToyEngine", workers=1)
    try:
        with toy_client(server.url, ACME, cache_dir=tmp_path / "c", retries=0) as client:
            client.classify("warm up")
            pid = server.popen.pid
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            workers = [int(c) for c in children
                       if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
                       and b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
            assert workers
            for w in workers:
                os.kill(w, signal.SIGKILL)
            time.sleep(0.5)
            try:
                client.classify("after the crash")
            except Exception as exc:  # the first request may meet the broken pool: 503, never a hang
                assert getattr(exc, "status", None) == 503, exc
        deadline = time.time() + 60
        while httpx.get(f"{server.url}/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.2)
        with toy_client(server.url, ACME, cache_dir=tmp_path / "c") as client:
            assert client.classify("recovered").label in ("negative", "positive")
        assert server.popen.poll() is None
        assert "engine pool broke" in server.tail(20000)
    finally:
        server.stop()


def _engine_children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            out.append(int(c))
    return out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_engine_workers_never_outlive_the_server(tmp_path, how):
    import os
    import signal

    models = tmp_path / "models"
    make_toy_model(models)
    server = start_server(tmp_path, api_keys=f"acme:{ACME}", models_dir=models,
                          engine="tests.support.toyengine:ToyEngine", workers=2)
    try:
        workers = _engine_children(server.popen.pid)
        assert len(workers) == 2
        server.popen.send_signal(getattr(signal, how))  # only the API process, not its group
        server.popen.wait(30)
        deadline = time.time() + 10
        while any(os.path.exists(f"/proc/{w}") for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if os.path.exists(f"/proc/{w}")]
    finally:
        server.stop()
