"""The SDK protects its user against a misbehaving server: each check driven by tests/support/tamper.py
(a transport that alters a real server's answers) in front of a real uvicorn server and the real engine.
Every test here fails when its check is removed from the SDK or the client half."""

from __future__ import annotations

import numpy as np
import pytest

from clients.sdk import CipherbertError, Client
from tests.support.servers import serving
from tests.support.tamper import Tamper

KEY = "sdk-protect-key-0001"
TEXT = "a gripping, beautifully acted film"


@pytest.fixture(scope="module")
def server(random_model_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("sdk-protect"), random_model_dir, key=KEY, secret="sdk-protect-secret-" + "y" * 20) as proc:
        yield proc


@pytest.fixture(scope="module")
def keystore(tmp_path_factory):
    return tmp_path_factory.mktemp("sdk-keys")  # one key set for every test (keygen takes seconds)


@pytest.fixture(scope="module")
def honest(server, keystore, tmp_path_factory):
    """An honest run: the reference logits, and the bundle pinned in its cache."""
    cache = tmp_path_factory.mktemp("sdk-honest")
    with Client(server.url, KEY, cache_dir=cache, keystore_dir=keystore, transport=Tamper(None)) as client:
        return client.classify(TEXT), cache


def classify(server, keystore, cache, mode, **kw):
    with Client(server.url, KEY, cache_dir=cache, keystore_dir=keystore, transport=Tamper(mode, **kw)) as client:
        return client.classify(TEXT)


def test_an_honest_server_passes_every_check(honest):
    result, _ = honest
    assert result.rounds == 8 and result.restarts == 0


@pytest.mark.parametrize(
    "mode, code",
    [
        ("extra_round", "too_many_rounds"),
        ("skip_round", "round_order"),
        ("wrong_kind", "round_kind"),
        ("drop_frame", "protocol_violation"),
        ("extra_frame", "protocol_violation"),
        ("geometry", "protocol_violation"),
        ("descriptors", "protocol_violation"),
        ("headroom", "headroom"),
        ("logits_count", "frame_count"),
    ],
)
def test_a_misbehaving_round_raises_instead_of_returning_a_label(server, keystore, tmp_path, mode, code):
    with pytest.raises(CipherbertError) as err:
        classify(server, keystore, tmp_path, mode)
    assert err.value.code == code, str(err.value)


def test_weak_parameters_are_refused_before_any_key_is_made(server, tmp_path):
    keys = tmp_path / "keys"
    with pytest.raises(CipherbertError) as err:
        with Client(server.url, KEY, cache_dir=tmp_path, keystore_dir=keys, transport=Tamper("weak_params")) as c:
            c.classify(TEXT)
    assert err.value.code == "weak_parameters"
    assert not any(keys.rglob("*.secret")) if keys.exists() else True


@pytest.mark.parametrize("mode", ["new_model", "new_tokenizer"])
def test_a_changed_bundle_fails_loudly(server, keystore, honest, mode):
    _, cache = honest  # pinned by the honest run
    with pytest.raises(CipherbertError) as err:
        classify(server, keystore, cache, mode)
    assert err.value.code == "bundle_changed"
    assert "pinned" in str(err.value)


def test_a_lost_inference_is_restarted_once(server, keystore, tmp_path, honest):
    result = classify(server, keystore, tmp_path, "lost_state", times=1)
    assert result.restarts == 1 and result.label == honest[0].label
    assert np.abs(np.array(result.logits) - np.array(honest[0].logits)).max() < 2e-3
    with pytest.raises(CipherbertError) as err:
        classify(server, keystore, tmp_path, "lost_state", times=2)
    assert err.value.code == "unknown_inference"
