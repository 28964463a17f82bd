"""A client built from docs/protocol.md alone (tests/support/doc_client.py: raw sealapi, numpy, tokenizers,
httpx; layouts, counts and the key header read from the doc's tables) against a real uvicorn server
with the real engine: it must get the SDK's logits within 2e-3."""

from __future__ import annotations

import hashlib
import json

import httpx
import numpy as np
import pytest
from safetensors.numpy import load

from clients.sdk import Client
from tests.support import doc_client
from tests.support.servers import serving

KEY = "doc-client-key-0001"
TEXTS = [
    "a gripping, beautifully acted film",
    "the plot wanders for an hour before anything happens, and then the ending arrives far too quickly "
    "to make sense of the first two acts, which is a shame given how good the cast is in every scene",  # over 32 word pieces: two feature-major chunks
]


@pytest.fixture(scope="module")
def server(random_model_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("doc-client"), random_model_dir, key=KEY, secret="doc-client-secret-" + "x" * 20) as proc:
        yield proc


def doc_classify(url: str, texts: list[str]) -> list[tuple[int, np.ndarray]]:
    """Everything as docs/protocol.md says, with nothing from he_models, clients or service."""
    tables = doc_client.DocTables.read()
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    model = http.get("/v1/models").json()["models"][0]["model_id"]
    bundle = http.get(f"/v1/models/{model}/bundle").json()
    assert bundle["protocol"] == tables.version
    files = {}
    for f in bundle["files"]:
        data = http.get(f["url"]).content
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
        files[f["name"]] = data
    tables_np = load(files["embeddings.safetensors"])
    crypto = doc_client.Seal(bundle["ckks"])
    try:
        source = {"params": bundle["ckks"], "galois_steps": bundle["galois_steps"]}
        header = {name: source[name] for name in tables.key_required}
        for wrong in ({**header, "comment": "unknown field"}, {"params": bundle["ckks"]}):  # refused: 400
            bad = doc_client.cbf1([json.dumps(wrong).encode(), b"relin", b"galois"])
            r = http.post("/v1/keys", params={"model": model}, content=bad)
            assert r.status_code == 400 and "header" in r.json()["detail"], r.text
        upload = crypto.key_upload(bundle, header)
        r = http.post(
            "/v1/keys", params={"model": model}, content=upload, headers={"Content-Type": "application/octet-stream"}
        )
        assert r.status_code == 201, r.text
        key_id = r.json()["key_id"]
        results = []
        for text in texts:
            emb = doc_client.embed(files["tokenizer.json"].decode(), tables_np, text, bundle["max_tokens"])
            n = emb.shape[0]
            packing = doc_client.Packing(tables, bundle, n)
            (start,) = tables.message("start", "client")
            frames = crypto.encrypt(packing.pack("FM", emb, packing.features(start)))
            r = http.post(
                "/v1/inferences",
                params={"model": model, "key_id": key_id, "n_tokens": n},
                content=doc_client.cbf1(frames),
                headers={"Content-Type": "application/octet-stream"},
            )
            while True:
                assert r.status_code == 200, r.text
                got = doc_client.uncbf1(r.content)
                env = json.loads(got[0])
                if env["done"]:
                    break
                replies = doc_client.answer(tables, packing, crypto, env["kind"], env["meta"], got[1:])
                r = http.post(
                    f"/v1/inferences/{env['inference_id']}/rounds/{env['round']}",
                    content=doc_client.cbf1(replies),
                    headers={
                        "X-Cipherbert-Round-Token": env["round_token"],
                        "Content-Type": "application/octet-stream",
                    },
                )
            assert env["kind"] == "logits" and len(got) - 1 == bundle["num_labels"]
            results.append((n, doc_client.logits(crypto, got[1:])))
        return results
    finally:
        crypto.close()
        http.close()


def test_doc_client_gets_the_sdk_logits(server, tmp_path):
    mine = doc_classify(server.url, TEXTS)
    with Client(server.url, KEY, cache_dir=tmp_path / "sdk") as sdk:
        theirs = [sdk.classify(t) for t in TEXTS]
    assert [n for n, _ in mine] == [r.n_tokens for r in theirs]
    assert mine[1][0] > 32  # the second text spans two chunks
    for (n, logits), result in zip(mine, theirs, strict=True):
        print(f"n={n}: max |doc client - SDK| = {np.abs(logits - np.array(result.logits)).max():.2e}")
        assert np.abs(logits - np.array(result.logits)).max() < 2e-3, (logits, result.logits)
        assert int(np.argmax(logits)) == int(np.argmax(result.logits))
