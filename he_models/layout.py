"""How matrices are laid out in CKKS slots; pure numpy, shared by the server plan and the client half.

Three layouts, each a map from logical indices to a global slot index; global slot g lives in
ciphertext g // slots at slot g % slots:

- feature-major  FM: (token t, feature f)      -> chunk(t) + f * 32 + t % 32   (linear layers)
  Tokens go in chunks of 32: chunk c holds tokens 32c..32c+31 of every feature in ceil(32 F / slots)
  ciphertexts of its own, so one set of weight kernels (encoded once, for 32 tokens) serves every
  sentence length, chunk by chunk.
- score          SL: (head h, key k, query i)  -> (h * n + k) * B + i
- token-major    TM: (head h, token k, feat d) -> (h * n + k) * B + d

n is the number of tokens, n_p the smallest of 32/64/128 holding them, and B = max(n_p, head_dim), so SL
and TM share their block structure (one block per head and key) and a within-block kernel maps one
onto the other. Slots of padded tokens hold zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from he_models.errors import ClientInputError

TOKEN_BLOCKS = (32, 64, 128)
CHUNK = 32  # tokens per feature-major chunk
# Version of the packing and round protocol. The server puts it in the bundle and in every round's meta;
# the client half refuses a round from a different version instead of decrypting garbage.
PROTOCOL = "cipherbert-rounds/4"


class LayoutError(ClientInputError):
    pass


def token_block(n_tokens: int) -> int:
    for n_p in TOKEN_BLOCKS:
        if n_tokens <= n_p:
            return n_p
    raise LayoutError(f"{n_tokens} tokens exceed the maximum of {TOKEN_BLOCKS[-1]}")


@dataclass(frozen=True)
class Geometry:
    """Everything about one sentence's packing that both sides must agree on."""

    n: int  # real tokens
    n_p: int  # token block
    hidden: int
    heads: int
    intermediate: int
    slots: int

    @classmethod
    def for_tokens(cls, n: int, hidden: int, heads: int, intermediate: int, slots: int) -> Geometry:
        if n < 1:
            raise LayoutError("a sentence needs at least one token")
        return cls(n=n, n_p=token_block(n), hidden=hidden, heads=heads, intermediate=intermediate, slots=slots)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def block(self) -> int:
        return max(self.n_p, self.head_dim)

    def cts(self, total_slots: int) -> int:
        return -(-total_slots // self.slots)

    @property
    def chunks(self) -> int:
        return -(-self.n // CHUNK)

    def per_chunk(self, features: int) -> int:
        """Ciphertexts one chunk of 32 tokens needs for `features` features."""
        return self.cts(features * CHUNK)

    def fm_cts(self, features: int) -> int:
        return self.chunks * self.per_chunk(features)

    @property
    def sl_cts(self) -> int:
        return self.cts(self.heads * self.n * self.block)

    # -- index maps ---------------------------------------------------------------------------
    def fm_slot(self, t: np.ndarray, f: np.ndarray, features: int) -> np.ndarray:
        """Global slot of (token t, feature f) in the chunked feature-major layout."""
        return (t // CHUNK) * (self.per_chunk(features) * self.slots) + f * CHUNK + t % CHUNK

    def fm_index(self, features: int) -> np.ndarray:
        """[t, f] -> global slot, for every token slot of the chunks (t < chunks * 32)."""
        t = np.arange(self.chunks * CHUNK)[:, None]
        f = np.arange(features)[None, :]
        return self.fm_slot(t, f, features)

    def sl_slot(self, h: np.ndarray, k: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Global slot of (head h, key/token k, position x in its block): SL with x = query, TM with x = feature."""
        return (h * self.n + k) * self.block + x

    def sl_index(self) -> np.ndarray:
        """[h, k, i] -> global slot."""
        h = np.arange(self.heads)[:, None, None]
        k = np.arange(self.n)[None, :, None]
        i = np.arange(self.n)[None, None, :]
        return self.sl_slot(h, k, i)

    def tm_index(self) -> np.ndarray:
        """[h, k, d] -> global slot."""
        h = np.arange(self.heads)[:, None, None]
        k = np.arange(self.n)[None, :, None]
        d = np.arange(self.head_dim)[None, None, :]
        return self.sl_slot(h, k, d)

    # -- packing ------------------------------------------------------------------------------
    def _scatter(self, index: np.ndarray, values: np.ndarray, n_cts: int) -> list[np.ndarray]:
        flat = np.zeros(n_cts * self.slots)
        flat[index.ravel()] = values.ravel()
        return [flat[c * self.slots : (c + 1) * self.slots] for c in range(n_cts)]

    @staticmethod
    def _gather(index: np.ndarray, vectors: list[np.ndarray]) -> np.ndarray:
        flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in vectors])
        return flat[index]

    def pack_fm(self, x: np.ndarray) -> list[np.ndarray]:
        """(n, features) -> slot vectors; padded tokens are zero."""
        n, features = x.shape
        if n != self.n:
            raise LayoutError(f"expected {self.n} tokens, got {n}")
        padded = np.zeros((self.chunks * CHUNK, features))
        padded[:n] = x
        return self._scatter(self.fm_index(features), padded, self.fm_cts(features))

    def unpack_fm(self, vectors: list[np.ndarray], features: int) -> np.ndarray:
        return self._gather(self.fm_index(features), vectors)[: self.n]

    def pack_sl(self, s: np.ndarray) -> list[np.ndarray]:
        """(heads, n, n) indexed [h, k, i] -> slot vectors."""
        return self._scatter(self.sl_index(), s[:, : self.n, : self.n], self.sl_cts)

    def unpack_sl(self, vectors: list[np.ndarray]) -> np.ndarray:
        return self._gather(self.sl_index(), vectors)

    def pack_tm(self, x: np.ndarray) -> list[np.ndarray]:
        """(n, hidden) -> token-major per head."""
        per_head = x.reshape(self.n, self.heads, self.head_dim).transpose(1, 0, 2)
        return self._scatter(self.tm_index(), per_head, self.sl_cts)

    # -- validity masks (1 on slots that hold real data) ---------------------------------------
    def fm_valid(self, features: int) -> list[np.ndarray]:
        return self.pack_fm(np.ones((self.n, features)))

    def sl_valid(self) -> list[np.ndarray]:
        return self.pack_sl(np.ones((self.heads, self.n, self.n)))

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "n_p": self.n_p,
            "hidden": self.hidden,
            "heads": self.heads,
            "intermediate": self.intermediate,
            "slots": self.slots,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(**{k: int(d[k]) for k in ("n", "n_p", "hidden", "heads", "intermediate", "slots")})


def client_scores(geo: Geometry, q_masked: np.ndarray, k_masked: np.ndarray, sigma: float) -> np.ndarray:
    """The client's part of Q.K^T on masked operands: sigma * (Q+rQ)_h (K+rK)_h^T as [h, k, i]."""
    dh = geo.head_dim
    q = q_masked.reshape(geo.n, geo.heads, dh).transpose(1, 0, 2)  # h, i, d
    k = k_masked.reshape(geo.n, geo.heads, dh).transpose(1, 0, 2)  # h, k, d
    return sigma * np.einsum("hkd,hid->hki", k, q)


def client_context(geo: Geometry, a_masked: np.ndarray, v_masked: np.ndarray) -> np.ndarray:
    """The client's part of A.V on masked operands: (A+rA)(V+rV) as (n, hidden); a is [h, k, i]."""
    dh = geo.head_dim
    v = v_masked.reshape(geo.n, geo.heads, dh).transpose(1, 0, 2)  # h, k, e
    out = np.einsum("hki,hke->hie", a_masked, v)
    return out.transpose(1, 0, 2).reshape(geo.n, geo.hidden)
