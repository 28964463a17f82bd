"""A round's state survives what is not the client's fault, and one round is answered once.

- Six concurrent identical replies to one round: one 200, five 409 wrong_round (one replica, the real
  engine), and the same race across two replicas sharing Redis (the compare-and-swap decides).
- The real redis-server (append-only, fsync always) is killed with SIGKILL while a round is in the
  engine and comes back seconds later: the round answers 503 store_unavailable meanwhile, the SDK's
  retry of the same round then succeeds, and the logits equal an undisturbed run's.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from cipherbert.launch import have, kill_redis, restart_redis, start_redis, start_server
from clients.sdk import Client
from he_models.client import ClientKeys, Embedder, answer_round, encrypt_embeddings
from he_models.layout import Geometry
from he_models.wire import pack_frames
from service.protocol import unpack_envelope
from tests.support.servers import models_dir_with

KEY = "durable-key-0001"
TEXT = "a gripping, beautifully acted film"
needs_redis = pytest.mark.skipif(not have("redis-server"), reason="redis-server not installed (make system-deps)")


def _first_round(url: str, model_dir) -> tuple[dict, list[bytes]]:
    """Start an inference with the client half and compute the reply to round 1 (not sent yet)."""
    h = {"Authorization": f"Bearer {KEY}"}
    bundle = httpx.get(f"{url}/v1/models/rand/bundle", headers=h).json()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    kid = httpx.post(
        f"{url}/v1/keys", params={"model": "rand"}, content=keys.public_keys_bytes(), headers=h, timeout=120
    ).json()["key_id"]
    emb = Embedder.from_model_dir(model_dir).embed(TEXT)
    geo = Geometry.for_tokens(
        len(emb),
        bundle["hidden_size"],
        bundle["num_heads"],
        bundle["intermediate_size"],
        bundle["ckks"]["poly_modulus_degree"] // 2,
    )
    r = httpx.post(
        f"{url}/v1/inferences",
        params={"model": "rand", "key_id": kid, "n_tokens": len(emb)},
        content=pack_frames(encrypt_embeddings(keys, emb, geo)),
        headers=h,
        timeout=120,
    )
    header, frames = unpack_envelope(r.content)
    return header, answer_round(keys, header["kind"], header["meta"], frames, geometry=geo)


def _race(urls: list[str], header: dict, reply: list[bytes], n: int = 6) -> list[httpx.Response]:
    body = pack_frames(reply)
    path = f"/v1/inferences/{header['inference_id']}/rounds/{header['round']}"
    h = {"Authorization": f"Bearer {KEY}", "X-Cipherbert-Round-Token": header["round_token"]}
    barrier = threading.Barrier(n)

    def send(i):
        barrier.wait()
        return httpx.post(urls[i % len(urls)] + path, content=body, headers=h, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, range(n)))


def test_concurrent_identical_replies_get_one_200_and_409s(random_model_dir, tmp_path):
    server = start_server(
        tmp_path / "srv",
        api_keys=f"acme:{KEY}",
        models_dir=models_dir_with(tmp_path, random_model_dir),
        workers=1,
        env={"CIPHERBERT_SECRET": "durable-secret-" + "q" * 20},
    )
    try:
        header, reply = _first_round(server.url, random_model_dir)
        answers = _race([server.url], header, reply)
    finally:
        server.stop()
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [409] * 5, [(r.status_code, r.text[:120]) for r in answers]
    assert all(r.json()["error"] == "wrong_round" for r in answers if r.status_code == 409)


@needs_redis
def test_concurrent_replies_across_replicas_have_one_winner(random_model_dir, tmp_path):
    redis = start_redis(tmp_path / "redis")
    env = {"CIPHERBERT_REDIS_URL": redis.url, "CIPHERBERT_SECRET": "durable-secret-" + "q" * 20}
    models = models_dir_with(tmp_path, random_model_dir)
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(
                start_server(
                    tmp_path / name, api_keys=f"acme:{KEY}", models_dir=models, workers=1, replica_id=name, env=env
                )
            )
        header, reply = _first_round(servers[0].url, random_model_dir)
        answers = _race([s.url for s in servers], header, reply, n=4)
    finally:
        for s in servers:
            s.stop()
        redis.stop()
    assert sorted(r.status_code for r in answers) == [200, 409, 409, 409], [r.text[:120] for r in answers]
    assert all(r.json()["error"] == "wrong_round" for r in answers if r.status_code == 409)


class KillRedisDuringRound(httpx.HTTPTransport):
    """Kills redis-server while the server computes round `round`, restarts it `down_s` later."""

    def __init__(self, redis, round: int = 3, delay_s: float = 0.1, down_s: float = 4.0) -> None:
        super().__init__()
        self.redis, self.round, self.delay_s, self.down_s = redis, round, delay_s, down_s
        self.done = threading.Event()
        self.killed_at: float | None = None

    def handle_request(self, request):
        if request.url.path.endswith(f"/rounds/{self.round}") and self.killed_at is None:
            self.killed_at = time.time()
            threading.Thread(target=self._outage, daemon=True).start()
        return super().handle_request(request)

    def _outage(self):
        time.sleep(self.delay_s)
        kill_redis(self.redis)
        time.sleep(self.down_s)
        self.redis = restart_redis(self.redis)
        self.done.set()


@needs_redis
def test_a_round_survives_redis_killed_mid_round(random_model_dir, tmp_path):
    redis = start_redis(tmp_path / "redis", durable=True)
    server = start_server(
        tmp_path / "srv",
        api_keys=f"acme:{KEY}",
        models_dir=models_dir_with(tmp_path, random_model_dir),
        workers=1,
        env={"CIPHERBERT_REDIS_URL": redis.url, "CIPHERBERT_SECRET": "durable-secret-" + "q" * 20},
    )
    outage = KillRedisDuringRound(redis)
    try:
        with Client(server.url, KEY, cache_dir=tmp_path / "c") as client:
            reference = client.classify(TEXT)  # undisturbed, and the keys are registered
        with Client(server.url, KEY, cache_dir=tmp_path / "c", transport=outage) as client:
            result = client.classify(TEXT)
        assert outage.done.wait(30)
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
        outage.redis.stop()
    assert 'cipherbert_errors_total{code="store_unavailable"}' in metrics  # the outage was seen mid-round
    assert result.rounds == reference.rounds == 8 and result.label == reference.label
    assert np.abs(np.array(result.logits) - np.array(reference.logits)).max() < 2e-3
