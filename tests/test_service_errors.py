"""Engine bugs are server errors: an unexpected exception in the engine answers 500, is logged, and
the server keeps serving (the client's own mistakes stay 4xx, see test_service_api.py)."""

import httpx
import pytest

from cipherbert.launch import start_server
from he_models.wire import pack_frames
from service.protocol import unpack_envelope
from tests.support.faultyengine import BUG_MARKER
from tests.support.toyengine import ClientKeys, Embedder, answer_round, encrypt_embeddings, make_toy_model

KEY = "acme-key-0001"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    models = tmp / "models"
    make_toy_model(models)
    proc = start_server(
        tmp,
        api_keys=f"acme:{KEY}",
        models_dir=models,
        engine="tests.support.faultyengine:FaultyToyEngine",
        workers=1,
        env={"CIPHERBERT_RATE_LIMIT": "off"},
    )
    proc.extra["models"] = models
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def session(server):
    bundle = httpx.get(f"{server.url}/v1/models/toy/bundle", headers=H).json()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    r = httpx.post(f"{server.url}/v1/keys", params={"model": "toy"}, content=keys.public_keys_bytes(), headers=H)
    assert r.status_code == 201, r.text
    return keys, r.json()["key_id"], Embedder(server.extra["models"] / "toy")


def start(server, key_id, frames):
    return httpx.post(
        f"{server.url}/v1/inferences",
        params={"model": "toy", "key_id": key_id, "n_tokens": len(frames)},
        content=pack_frames(frames),
        headers=H,
        timeout=60,
    )


def classify(server, keys, key_id, embedder, text="a fine film"):
    """One complete encrypted inference; returns the decrypted logits' length."""
    r = start(server, key_id, encrypt_embeddings(keys, embedder.embed(text)))
    assert r.status_code == 200, r.text
    header, frames = unpack_envelope(r.content)
    while not header["done"]:
        r = httpx.post(
            f"{server.url}/v1/inferences/{header['inference_id']}/rounds/{header['round']}",
            content=pack_frames(answer_round(keys, header["kind"], header["meta"], frames)),
            headers={**H, "X-Cipherbert-Round-Token": header["round_token"]},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        header, frames = unpack_envelope(r.content)
    return header


def test_unexpected_error_in_start_is_500_and_the_server_stays_up(server, session):
    keys, key_id, embedder = session
    r = start(server, key_id, [BUG_MARKER])
    assert r.status_code == 500, r.text
    assert r.json()["error"] == "internal" and "TypeError" in r.json()["detail"]
    assert "planted bug" not in r.text  # the bug's message stays in the server log
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert classify(server, keys, key_id, embedder)["meta"]["num_labels"] == 2
    log = server.log.read_text()
    assert "planted bug in start" in log and "Traceback" in log


def test_unexpected_error_in_resume_is_500_and_the_round_stays_answerable(server, session):
    keys, key_id, embedder = session
    r = start(server, key_id, encrypt_embeddings(keys, embedder.embed("so so")))
    header, frames = unpack_envelope(r.content)
    url = f"{server.url}/v1/inferences/{header['inference_id']}/rounds/1"
    rh = {**H, "X-Cipherbert-Round-Token": header["round_token"]}
    r = httpx.post(url, content=pack_frames([BUG_MARKER]), headers=rh, timeout=60)
    assert r.status_code == 500 and r.json()["error"] == "internal", r.text
    # a server error is not the client's fault: the same round can be answered properly
    r = httpx.post(
        url, content=pack_frames(answer_round(keys, header["kind"], header["meta"], frames)), headers=rh, timeout=60
    )
    assert r.status_code == 200, r.text
    assert unpack_envelope(r.content)[0]["done"]
    assert "planted bug in resume" in server.log.read_text()


def test_client_input_errors_stay_400(server, session):
    keys, key_id, embedder = session
    good = encrypt_embeddings(keys, embedder.embed("two words"))
    r = start(server, key_id, [good[0], b"\x00" * 64])
    assert r.status_code == 400 and r.json()["error"] == "rejected_by_engine", r.text
    assert r.json()["detail"].startswith("EngineError")
