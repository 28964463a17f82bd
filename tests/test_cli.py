"""The `cipherbert` CLI: serve (via the fixture), keys, classify --json, readable errors, delegation.

The server runs the real encrypted engine on a tiny random model (hidden 32, one layer), so the CLI
drives the SDK's default client half (he_models.client) end to end, as a user's would.
"""

import json
import os
import subprocess
import sys

import pytest

from cipherbert.launch import REPO, start_server
from tests.conftest import make_random_model_dir

KEY = "acme-key-0001"


def cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "cipherbert.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    models = tmp / "models"
    make_random_model_dir(models / "tiny", hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1,
                          name="tiny")
    proc = start_server(tmp, api_keys=f"acme:{KEY}", models_dir=models, workers=1,
                        env={"CIPHERBERT_RATE_LIMIT": "off"})
    yield proc
    proc.stop()


def test_help_and_usage_errors():
    r = cli("--help")
    assert r.returncode == 0 and "classify" in r.stdout and "serve" in r.stdout
    r = cli("classify", "--url", "http://127.0.0.1:9", "text", env={"CIPHERBERT_API_KEY": ""})
    assert r.returncode == 2 and "no API key" in r.stderr and "Traceback" not in r.stderr


def test_classify_json_keys_and_errors(server, tmp_path):
    base = ["--url", server.url, "--api-key", KEY, "--cache-dir", str(tmp_path)]
    r = cli("keys", "create", *base)
    assert r.returncode == 0, r.stderr
    key_id = r.stdout.strip()
    assert key_id.startswith("k_") and "generating CKKS keys" in r.stderr
    r = cli("classify", *base, "--json", "a fine film", "dreadful")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        for field in ("label", "probabilities", "latency_s", "upload_bytes", "download_bytes"):
            assert field in row
    assert "round 1" in r.stderr
    r = cli("keys", "list", *base)
    assert key_id in r.stdout
    r = cli("keys", "delete", *base, key_id)
    assert r.returncode == 0 and key_id in r.stdout
    r = cli("keys", "delete", *base, key_id)
    assert r.returncode == 1 and "404" in r.stderr and "Traceback" not in r.stderr
    # the SDK notices the deleted key and registers a new one
    r = cli("classify", *base, "-q", "fine again")
    assert r.returncode == 0, r.stderr
    r = cli("classify", *base, "   ")
    assert r.returncode == 1 and "empty" in r.stderr and "Traceback" not in r.stderr
    r = cli("classify", "--url", server.url, "--api-key", "wrong-key-000", "--cache-dir", str(tmp_path), "x")
    assert r.returncode == 1 and "401" in r.stderr and "Traceback" not in r.stderr
    r = cli("classify", "--url", "http://127.0.0.1:9", "--api-key", KEY, "--cache-dir", str(tmp_path), "x")
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_bad_settings(tmp_path):
    r = cli("serve", "--data-dir", str(tmp_path), "--port", "9", env={"CIPHERBERT_API_KEYS": "bad"})
    assert r.returncode == 2 and "tenant:key" in r.stderr and "Traceback" not in r.stderr


def test_training_commands_delegate(monkeypatch):
    import types

    from cipherbert import cli as cli_mod

    seen = {}
    for module, name in (("distill.__main__", "distill"), ("dp_training.__main__", "dp-finetune")):
        fake = types.ModuleType(module)
        fake.main = lambda argv, _n=name: seen.setdefault(_n, argv) and 0
        monkeypatch.setitem(sys.modules, module, fake)
        assert cli_mod.main([name, "--foo", "1"]) == 0
    assert seen == {"distill": ["--foo", "1"], "dp-finetune": ["--foo", "1"]}
