"""The load test against a real server (real engine, random model): report shape and zero failures."""

import json

from bench import loadtest
from cipherbert.launch import start_server
from tests.support.servers import models_dir_with

KEY = "load-key-0001"


def test_loadtest_reports_every_field(random_model_dir, tmp_path):
    server = start_server(tmp_path, api_keys=f"load:{KEY}", models_dir=models_dir_with(tmp_path, random_model_dir), workers=1,
                          env={"CIPHERBERT_RATE_LIMIT": "off"})
    out = tmp_path / "load.json"
    try:
        rc = loadtest.main(["--clients", "2", "--duration", "3", "--url", server.url, "--api-key", KEY,
                            "--model-dir", str(random_model_dir), "--sentences", "4", "--out", str(out),
                            "--cache-dir", str(tmp_path / "cache")])
    finally:
        server.stop()
    report = json.loads(out.read_text())
    for key in ("clients", "duration_s", "completed", "errors", "lost", "crossed", "status_5xx",
                "throughput_rps", "p50_s", "p95_s", "machine"):
        assert key in report
    assert rc == 0 and report["completed"] >= 1
    assert report["errors"] == report["lost"] == report["crossed"] == report["status_5xx"] == 0
    assert report["label_agreement"] == 1.0
