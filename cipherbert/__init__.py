"""cipherbert: privacy-preserving BERT-Tiny inference under CKKS, one public namespace.

    from cipherbert import Client, CipherbertError, Result, TagResult  # the SDK (no torch, no fastapi)
    from cipherbert import EncryptedEngine, HEConfig, HEFriendlyBert  # the engine and the model
    from cipherbert import create_app, Settings                    # the service

Names are imported on first use (module-level __getattr__), so `import cipherbert` stays cheap and
the SDK never pulls in torch or fastapi.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Client": "clients.sdk",
    "CipherbertError": "clients.sdk",
    "Result": "clients.sdk",
    "TagResult": "clients.tagging",
    "Session": "clients.sdk",
    "ClientHalf": "clients.client_half",
    "HEModelsClientHalf": "clients.client_half",
    "EncryptedEngine": "he_models.engine",
    "HEConfig": "he_models.config",
    "HEFriendlyBert": "he_models.model",
    "ClientInputError": "he_models.errors",
    "create_app": "service.app",
    "Settings": "service.settings",
    "start_server": "cipherbert.launch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cipherbert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
