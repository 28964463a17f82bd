"""One public namespace: every exported name resolves, and the SDK imports neither torch nor fastapi."""

import subprocess
import sys

import cipherbert
from cipherbert.launch import REPO


def test_every_exported_name_resolves():
    for name in cipherbert.__all__:
        assert getattr(cipherbert, name) is not None, name
    assert set(cipherbert.__all__) <= set(dir(cipherbert))


def test_sdk_import_pulls_in_neither_torch_nor_fastapi():
    code = ("import sys, cipherbert, clients.sdk; cipherbert.Client; cipherbert.CipherbertError; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
