"""Schemathesis against the served OpenAPI schema: random valid and invalid requests, zero 5xx.

Bounded (a few examples per operation and mode) so it stays well under a minute on two cores.
"""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from cipherbert.launch import start_server
from tests.support.toyengine import make_toy_model

KEY = "acme-key-0001"
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    models = tmp / "models"
    make_toy_model(models)
    proc = start_server(tmp, api_keys=f"acme:{KEY}", models_dir=models, engine="tests.support.toyengine:ToyEngine",
                        workers=1, env={"CIPHERBERT_RATE_LIMIT": "off"})
    yield proc
    proc.stop()


def test_no_server_errors_on_generated_requests(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures, calls, seen = [], 0, []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for auth in ({"Authorization": f"Bearer {KEY}"}, {}):
                try:
                    strategy = op.as_strategy(generation_mode=mode)
                except Exception:  # an operation with nothing to make negative
                    continue

                @given(case=strategy)
                @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                def run(case):
                    nonlocal calls
                    calls += 1
                    headers = dict(case.headers or {})
                    headers.pop("Authorization", None)
                    headers.update(auth)  # noqa: B023 (run() is called inside this iteration)
                    case.headers = headers
                    try:
                        resp = case.call(base_url=server.url, timeout=30)
                    except Exception as exc:  # a request the client library cannot even send
                        if "Invalid" in type(exc).__name__ or isinstance(exc, (ValueError, UnicodeError)):
                            return
                        raise
                    seen.append((case.method, case.path, resp.status_code))
                    if resp.status_code >= 500:
                        failures.append((case.method, case.formatted_path, resp.status_code, resp.text[:300]))

                try:
                    run()
                except Unsatisfiable:  # nothing to make negative on this operation
                    pass
    print(sorted(set(seen)))
    assert calls > 50
    assert not failures, failures[:5]
    assert httpx.get(f"{server.url}/readyz").status_code == 200
