"""The client half's contract: what the SDK needs from the code that owns the secret key.

The SDK does the HTTP, the keystore and the round loop; a `ClientHalf` does the cryptography: key
generation, embedding, encryption, answering the server's refresh rounds, decrypting the logits. The
default, `HEModelsClientHalf`, wraps he_models.client (TenSEAL, numpy, tokenizers: never torch). A
different engine ships its own client half, and the caller passes it in: `Client(..., client_half=...)`.
The SDK never imports a module because a server's bundle names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load_file

from he_models import client as he_client
from he_models.layout import Geometry


class KeySet(Protocol):
    """A CKKS key set owned by the client; `save` writes the secret key (the SDK makes the file 0600)."""

    def public_keys_bytes(self) -> bytes: ...

    def save(self, path: Path) -> None: ...


class TextEmbedder(Protocol):
    """Tokenizes and embeds a text locally: one row per token."""

    def embed(self, text: str) -> np.ndarray: ...

    def encode(self, text: str) -> Any:
        """The tokenizers.Encoding of the text (ids, tokens, offsets); token classification aligns with it."""
        ...

    def embed_ids(self, ids: list[int]) -> np.ndarray: ...


class ClientHalf(Protocol):
    """The functions the SDK calls on the client side of encrypted inference."""

    #: the `client_module` a bundle names when it expects this client half
    module: str

    def generate_keys(self, ckks: dict, galois_steps: list[int]) -> KeySet: ...

    def load_keys(self, path: Path) -> KeySet: ...

    def embedder(self, bundle: dict, bundle_dir: Path) -> TextEmbedder: ...

    def geometry(self, bundle: dict, n_tokens: int) -> Any: ...

    def encrypt_embeddings(self, keys: Any, embeddings: np.ndarray, geometry: Any) -> list[bytes]: ...

    def answer_round(self, keys: Any, kind: str, meta: dict, to_client: list[bytes], geometry: Any) -> list[bytes]:
        """The reply to one round; `geometry` is this sentence's own packing: refuse a round that disagrees."""
        ...

    def decrypt_logits(self, keys: Any, meta: dict, to_client: list[bytes], num_labels: int) -> np.ndarray:
        """The logits; refuse a count other than the bundle's `num_labels`."""
        ...

    def decrypt_token_logits(
        self, keys: Any, meta: dict, to_client: list[bytes], num_labels: int, geometry: Any
    ) -> np.ndarray:
        """(n, num_labels) logits of a token-classification model, for this sentence's `geometry`."""
        ...


class HEModelsClientHalf:
    """The client half of he_models' encrypted engine (the one real deployments run)."""

    module = "he_models.client"

    def generate_keys(self, ckks: dict, galois_steps: list[int]) -> KeySet:
        return he_client.ClientKeys.generate(ckks, galois_steps)

    def load_keys(self, path: Path) -> KeySet:
        return he_client.ClientKeys.load(path)

    def embedder(self, bundle: dict, bundle_dir: Path) -> TextEmbedder:
        tables = load_file(str(bundle_dir / "embeddings.safetensors"))
        return he_client.Embedder.from_files(bundle_dir / "tokenizer.json", tables, int(bundle["max_tokens"]))

    def geometry(self, bundle: dict, n_tokens: int) -> Any:
        slots = int(bundle["ckks"]["poly_modulus_degree"]) // 2
        return Geometry.for_tokens(
            n_tokens, int(bundle["hidden_size"]), int(bundle["num_heads"]), int(bundle["intermediate_size"]), slots
        )

    def encrypt_embeddings(self, keys: Any, embeddings: np.ndarray, geometry: Any) -> list[bytes]:
        return he_client.encrypt_embeddings(keys, embeddings, geometry)

    def answer_round(self, keys: Any, kind: str, meta: dict, to_client: list[bytes], geometry: Any) -> list[bytes]:
        return he_client.answer_round(keys, kind, meta, to_client, geometry=geometry)

    def decrypt_logits(self, keys: Any, meta: dict, to_client: list[bytes], num_labels: int) -> np.ndarray:
        return he_client.decrypt_logits(keys, meta, to_client, num_labels=num_labels)

    def decrypt_token_logits(
        self, keys: Any, meta: dict, to_client: list[bytes], num_labels: int, geometry: Any
    ) -> np.ndarray:
        return he_client.decrypt_token_logits(keys, meta, to_client, num_labels=num_labels, geometry=geometry)
