"""Replicas on loopback: two API servers sharing a real redis-server, behind nginx (deploy/ settings).

One inference's rounds deliberately cross replicas (client-side round robin puts round 1 on the other
server), and through nginx the round-robin upstream does the same. Toy engine: cheap enough for every
run; the real model through the same topology is in test_service_e2e.py (slow).
"""

import httpx
import pytest

from cipherbert.launch import have, start_nginx, start_redis, start_server
from he_models.wire import pack_frames
from service.protocol import unpack_envelope
from tests.support.toyengine import ClientKeys, Embedder, encrypt_embeddings, make_toy_model, toy_client

KEY = "acme-key-0001"
pytestmark = pytest.mark.skipif(not have("redis-server"), reason="redis-server not installed (make system-deps)")


@pytest.fixture(scope="module")
def topology(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    models = tmp / "models"
    make_toy_model(models)
    procs = []
    try:
        redis = start_redis(tmp)
        procs.append(redis)
        env = {"CIPHERBERT_REDIS_URL": redis.url, "CIPHERBERT_SECRET": "shared-secret-" + "x" * 20,
               "CIPHERBERT_RATE_LIMIT": "30/60"}
        for name in ("replica-a", "replica-b"):
            procs.append(start_server(tmp, api_keys=f"acme:{KEY},evil:evil-key-0001,limited:limited-key-01",
                                      models_dir=models,
                                      engine="tests.support.toyengine:ToyEngine", workers=1, replica_id=name, env=env))
        nginx = None
        if have("nginx"):
            nginx = start_nginx(tmp, [procs[1].url, procs[2].url])
            procs.append(nginx)
        yield {"a": procs[1], "b": procs[2], "nginx": nginx, "models": models, "redis": redis}
    finally:
        for p in reversed(procs):
            p.stop()


def test_rounds_cross_replicas_with_client_round_robin(topology, tmp_path):
    a, b = topology["a"], topology["b"]
    with toy_client([a.url, b.url], KEY, cache_dir=tmp_path) as client:
        results = client.classify_batch(["a fine film", "dreadful", "so so", "the best"])
    for r in results:
        assert r.rounds == 1 and len(set(r.replicas)) == 2, r.replicas
    assert {"replica-a", "replica-b"} == {x for r in results for x in r.replicas}


def test_replay_on_the_other_replica_is_refused(topology):
    a, b = topology["a"], topology["b"]
    h = {"Authorization": f"Bearer {KEY}"}
    bundle = httpx.get(f"{a.url}/v1/models/toy/bundle", headers=h).json()
    keys = ClientKeys.generate(bundle['ckks'], bundle['galois_steps'])
    key_id = httpx.post(f"{a.url}/v1/keys", params={"model": "toy"}, content=keys.public_keys_bytes(),
                        headers=h).json()["key_id"]
    assert httpx.get(f"{b.url}/v1/keys/{key_id}", headers=h).status_code == 200  # shared registry
    assert httpx.get(f"{b.url}/v1/keys/{key_id}", headers={"Authorization": "Bearer evil-key-0001"}).status_code == 404
    emb = Embedder(topology["models"] / "toy").embed("fine")
    r = httpx.post(f"{b.url}/v1/inferences", params={"model": "toy", "key_id": key_id, "n_tokens": len(emb)},
                   content=pack_frames(encrypt_embeddings(keys, emb)), headers=h)
    header, frames = unpack_envelope(r.content)
    import tenseal as ts

    reply = pack_frames([ts.ckks_vector(keys.ctx, ts.ckks_vector_from(keys.ctx, f).decrypt()).serialize()
                         for f in frames])
    path = f"/v1/inferences/{header['inference_id']}/rounds/1"
    th = {**h, "X-Cipherbert-Round-Token": header["round_token"]}
    first = httpx.post(a.url + path, content=reply, headers=th)
    assert first.status_code == 200 and first.headers["X-Cipherbert-Replica"] == "replica-a"
    again = httpx.post(b.url + path, content=reply, headers=th)
    assert again.status_code == 409 and again.json()["error"] == "inference_finished"


def test_rate_limit_is_shared_by_replicas(topology):
    a, b = topology["a"], topology["b"]
    h = {"Authorization": "Bearer limited-key-01"}
    codes = [httpx.post(f"{(a, b)[i % 2].url}/v1/keys", params={"model": "toy"}, content=b"", headers=h).status_code
             for i in range(32)]
    # 15 + 15 counted in one Redis window (one more may pass if a window boundary falls in between)
    assert 429 in codes and 30 <= codes.index(429) <= 31 and set(codes[:codes.index(429)]) == {400}


@pytest.mark.skipif(not have("nginx"), reason="nginx not installed (make system-deps)")
def test_through_nginx_load_balancer(topology, tmp_path):
    nginx = topology["nginx"]
    with toy_client(nginx.url, KEY, cache_dir=tmp_path) as client:
        results = client.classify_batch([f"sentence number {i}" for i in range(6)])
    seen = {x for r in results for x in r.replicas}
    assert seen == {"replica-a", "replica-b"}
    assert any(len(set(r.replicas)) == 2 for r in results)  # some inference crossed replicas via nginx
    # a large body passes nginx (client_max_body_size) and gets the service's own 413/400, not nginx's
    r = httpx.post(f"{nginx.url}/v1/keys", params={"model": "toy"}, content=b"\0" * (8 << 20),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]


@pytest.mark.skipif(not have("nginx"), reason="nginx not installed (make system-deps)")
def test_deploy_nginx_conf_passes_nginx_t(tmp_path):
    """deploy/nginx.conf as docker-compose mounts it, with the compose host names pointed at loopback."""
    import os
    import shutil
    import subprocess

    from cipherbert.launch import REPO

    conf = (REPO / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("api1:8000", "127.0.0.1:8001").replace("api2:8000", "127.0.0.1:8002")
    conf = conf.replace("/etc/nginx/cipherbert/", f"{REPO / 'deploy'}/")
    conf = conf.replace("events {", f"pid {tmp_path}/nginx.pid;\nevents {{")
    if os.geteuid() == 0:
        conf = "user root;\n" + conf
    (tmp_path / "nginx.conf").write_text(conf)
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    r = subprocess.run([exe, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                        "-g", f"error_log {tmp_path}/error.log;"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "client_max_body_size 512m" in (REPO / "deploy" / "nginx-http.conf").read_text()


def test_compose_topology():
    yaml = pytest.importorskip("yaml")
    from cipherbert.launch import REPO

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    apis = [s for s in services if s.startswith("api")]
    assert len(apis) >= 2 and "redis" in services and "nginx" in services
    for name in apis:
        env = services[name]["environment"]
        assert env["CIPHERBERT_REDIS_URL"].startswith("redis://redis")
        assert "CIPHERBERT_SECRET" in env and env["CIPHERBERT_REPLICA_ID"] == name
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "python:3.11-slim" in dockerfile and "download.pytorch.org/whl/cpu torch==2.13.0" in dockerfile
