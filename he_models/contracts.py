"""The engine's public data types: what the service passes in and gets back, and the refusal it raises.

They live apart from engine.py so every engine module can use them without importing the facade;
`he_models.engine` re-exports them, and that is where callers import them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tenseal.sealapi as seal

from he_models.errors import ClientInputError


class EngineError(ClientInputError):
    """Input the engine refuses: wrong parameters, level or count, secret keys, replays, too many tokens."""


@dataclass
class EvalContext:
    """A client's parsed evaluation keys (public: relinearization and Galois keys only)."""

    relin: seal.RelinKeys
    galois: seal.GaloisKeys
    fingerprint: str
    steps: list[int]
    nbytes: int
    raw: bytes = field(default=b"", repr=False)  # kept to hand the keys to the assistant process once


@dataclass(frozen=True, slots=True)
class StepOutput:
    """One round's answer: what the client must compute next (or the logits) and the state to keep."""

    inference_id: str
    round: int
    done: bool
    to_client: list[bytes]
    state: bytes | None
    kind: str
    meta: dict = field(default_factory=dict)
