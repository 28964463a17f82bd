"""The real encrypted engine through the real server: SDK -> uvicorn -> process pool -> he_models.

Normal run: one short sentence end to end on one server, compared with the plaintext model.
Slow run (`make test-slow`): two replicas sharing redis behind nginx, rounds crossing replicas.
"""

from pathlib import Path

import numpy as np
import pytest

from cipherbert.launch import have, start_nginx, start_redis, start_server
from clients.sdk import Client

KEY = "acme-key-0001"
SENTENCE = "a gripping, beautifully acted film"


@pytest.fixture(scope="module")
def models_dir(random_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-models")
    (root / "rand").symlink_to(random_model_dir, target_is_directory=True)
    return root


def plaintext_logits(model_dir: Path, text: str) -> np.ndarray:
    import torch

    from he_models.client import Embedder
    from he_models.model import HEFriendlyBert

    emb = Embedder.from_model_dir(model_dir).embed(text)
    model = HEFriendlyBert.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.forward_embedded(torch.tensor(emb, dtype=torch.float32)[None], torch.ones(1, emb.shape[0]))
    return out.logits[0].numpy()


def test_encrypted_inference_through_the_server(models_dir, random_model_dir, tmp_path):
    uploads = []
    import httpx

    class Recorder(httpx.HTTPTransport):
        def handle_request(self, request):
            if request.method == "POST" and request.url.path == "/v1/keys":
                uploads.append(request.read())
            return super().handle_request(request)

    server = start_server(tmp_path / "srv", api_keys=f"acme:{KEY}", models_dir=models_dir, workers=1,
                          env={"CIPHERBERT_SECRET": "e2e-secret-" + "z" * 24})
    try:
        with Client(server.url, KEY, cache_dir=tmp_path / "client", transport=Recorder()) as client:
            result = client.classify(SENTENCE)
            key_id = client.register_keys()
            keys = client._session().keys
        bad_input_is_4xx(server.url, key_id, keys)
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    reference = plaintext_logits(random_model_dir, SENTENCE)
    assert result.rounds == 8
    assert np.abs(np.array(result.logits) - reference).max() < 2e-2, (result.logits, reference)
    assert result.label == ["negative", "positive"][int(np.argmax(reference))]
    assert result.upload_bytes < 4 << 20 and result.download_bytes > 0
    # the secret key never went on the wire: the upload is (header, relin, galois) and holds no secret
    from he_models.ckks import unpack_eval_keys
    from he_models.wire import unpack_frames

    assert len(uploads) == 1
    header, _, _ = unpack_eval_keys(uploads[0])
    assert all("secret" not in p.lower() for p in header.parts)
    keystore = next((tmp_path / "client" / "keys").rglob("*.secret"))
    assert keystore.stat().st_mode & 0o777 == 0o600
    secret_bytes = unpack_frames(keystore.read_bytes(), max_frames=4)[1]
    assert secret_bytes[64:4096] not in uploads[0]
    assert 'cipherbert_rounds_total{kind="scores",model="rand"}' in metrics


def bad_input_is_4xx(url, key_id, keys):
    """The real engine's rejections map to 4xx with a JSON reason, and the server stays ready."""
    import httpx
    import tenseal as ts

    from he_models.client import answer_round, encrypt_embeddings
    from he_models.layout import Geometry
    from he_models.wire import pack_frames
    from service.protocol import unpack_envelope

    h = {"Authorization": f"Bearer {KEY}"}
    q = {"model": "rand", "key_id": key_id, "n_tokens": 5}
    geo = Geometry.for_tokens(5, 128, 2, 512, 4096)
    good = encrypt_embeddings(keys, np.random.default_rng(0).normal(0, 1, (5, 128)), geo)
    bodies = {"garbage": b"garbage", "truncated": pack_frames(good)[:-7], "too few": pack_frames(good[:0] + [b"x"]),
              "random bytes": pack_frames([bytes(len(g)) for g in good]), "too many": pack_frames(good * 3)}
    for name, body in bodies.items():
        r = httpx.post(f"{url}/v1/inferences", params=q, content=body, headers=h, timeout=60)
        assert 400 <= r.status_code < 500 and r.json()["detail"], (name, r.status_code, r.text)
    r = httpx.post(f"{url}/v1/inferences", params={**q, "n_tokens": 200}, content=pack_frames(good), headers=h)
    assert r.status_code == 422
    # corrupted ciphertexts (bit flips, header damage, truncation): refused or, for flips inside the
    # coefficient data that SEAL cannot detect, computed on garbage; never a 5xx, never a dead worker
    rng = np.random.default_rng(1)
    for i in range(8):
        frames = [bytearray(f) for f in good]
        f = frames[i % len(frames)]
        if i % 3 == 0:
            f[int(rng.integers(0, 120))] ^= 0xFF
        elif i % 3 == 1:
            del f[int(rng.integers(1, len(f))):]
        else:
            for pos in rng.integers(0, len(f), 4):
                f[int(pos)] ^= 0x10
        r = httpx.post(f"{url}/v1/inferences", params=q, content=pack_frames([bytes(x) for x in frames]),
                       headers=h, timeout=60)
        assert r.status_code in (200, 400), (i, r.status_code, r.text)
    # a reply with the wrong number of ciphertexts, then garbage: 4xx, and the round is consumed
    r = httpx.post(f"{url}/v1/inferences", params=q, content=pack_frames(good), headers=h, timeout=60)
    assert r.status_code == 200, r.text
    header, frames = unpack_envelope(r.content)
    rh = {**h, "X-Cipherbert-Round-Token": header["round_token"]}
    rurl = f"{url}/v1/inferences/{header['inference_id']}/rounds/1"
    replies = answer_round(keys, header["kind"], header["meta"], frames)
    r = httpx.post(rurl, content=pack_frames(replies[:1]), headers=rh, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    r = httpx.post(rurl, content=pack_frames(replies), headers=rh, timeout=60)
    assert r.status_code in (404, 409), r.text  # no second try on the same masked state
    # a TenSEAL context with a secret key, and keys for other parameters
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    r = httpx.post(f"{url}/v1/keys", params={"model": "rand"}, content=ctx.serialize(save_secret_key=True), headers=h)
    assert r.status_code == 400 and "secret key" in r.json()["detail"], r.text
    assert httpx.get(f"{url}/readyz").status_code == 200


@pytest.mark.slow
@pytest.mark.skipif(not (have("redis-server") and have("nginx")), reason="redis-server/nginx not installed "
                    "(make system-deps)")
def test_real_engine_replicas_behind_nginx(models_dir, random_model_dir, tmp_path):
    procs = []
    try:
        redis = start_redis(tmp_path)
        procs.append(redis)
        env = {"CIPHERBERT_REDIS_URL": redis.url, "CIPHERBERT_SECRET": "shared-" + "q" * 30}
        for name in ("a", "b"):
            procs.append(start_server(tmp_path, api_keys=f"acme:{KEY}", models_dir=models_dir, workers=1,
                                      replica_id=name, env=env))
        nginx = start_nginx(tmp_path, [p.url for p in procs[1:3]])
        procs.append(nginx)
        texts = [SENTENCE, "dull and far too long"]
        with Client(nginx.url, KEY, cache_dir=tmp_path / "client") as client:
            results = client.classify_batch(texts)
        with Client([procs[1].url, procs[2].url], KEY, cache_dir=tmp_path / "client") as client:
            rr = client.classify(texts[1])
    finally:
        for p in reversed(procs):
            p.stop()
    for text, r in zip(texts, results, strict=True):
        ref = plaintext_logits(random_model_dir, text)
        assert np.abs(np.array(r.logits) - ref).max() < 2e-2
        assert len(set(r.replicas)) == 2  # nginx round robin spread the rounds over both replicas
    assert rr.replicas[::2] == [rr.replicas[0]] * 5 and rr.replicas[1] != rr.replicas[0]
