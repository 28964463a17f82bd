"""The typed contracts between the service and the parts it drives: the engine, the store, the worker.

The service never imports a concrete engine: worker processes load whatever class CIPHERBERT_ENGINE
names, and this module states what that class must offer (`EngineClass`, `Engine`). The two stores
(`service.store.SQLiteStore`, `service.store.RedisStore`) satisfy `Store`. What crosses the process
pool is a `StepResult`: the engine's own `StepOutput` (he_models.engine) plus where and how long it ran.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # at run time the API process imports it only when it unpickles the first result
    from he_models.engine import StepOutput

__all__ = ["Engine", "EngineClass", "InferenceRecord", "KeyRecord", "StepResult", "Store"]


@runtime_checkable
class Engine(Protocol):
    """One loaded model as the worker processes use it (he_models.engine.EncryptedEngine and stand-ins)."""

    model_id: str
    max_tokens: int

    @property
    def model_hash(self) -> str: ...

    def client_bundle(self) -> dict[str, Any]:
        """JSON the client needs: CKKS parameters, Galois steps, labels, its client module."""
        ...

    def client_bundle_files(self) -> dict[str, Path]:
        """Files the client downloads beside the bundle (embeddings, tokenizer), by name."""
        ...

    def load_context(self, public_keys: bytes) -> Any:
        """Parse and check a public evaluation context; raises ClientInputError when it is unusable."""
        ...

    def start(self, ctx: Any, inference_id: str, n_tokens: int, inputs: list[bytes]) -> StepOutput: ...

    def resume(
        self,
        ctx: Any,
        state: bytes,
        replies: list[bytes],
        *,
        inference_id: str | None = None,
        round_no: int | None = None,
    ) -> StepOutput: ...


class EngineClass(Protocol):
    """The class CIPHERBERT_ENGINE names: `load` builds an Engine from a model directory."""

    def load(self, model_dir: Path, server_secret: bytes, **options: Any) -> Engine: ...


@dataclass(frozen=True)
class StepResult:
    """What an engine job returns across the process pool: the step and how it was computed."""

    step: StepOutput
    seconds: float  # time inside the worker, context loading included
    context_loaded: bool  # the evaluation context was not cached in that worker
    pid: int


@dataclass
class KeyRecord:
    key_id: str
    tenant: str
    model_id: str
    created_at: float
    expires_at: float
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class InferenceRecord:
    inference_id: str
    tenant: str
    key_id: str
    model_id: str
    round: int
    digest: str
    done: bool
    created_at: float
    expires_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Store(Protocol):
    """What must outlive one request: keys, the pending round of each inference, rate-limit counters.

    Every method may raise service.store.StoreError when the backing store fails (answered 503).
    """

    def put_key(self, rec: KeyRecord, blob: bytes) -> None: ...
    def get_key(self, key_id: str) -> KeyRecord | None:
        """The record of a live (unexpired) key, else None."""
        ...

    def get_key_blob(self, key_id: str) -> bytes | None: ...
    def list_keys(self, tenant: str) -> list[KeyRecord]:
        """The tenant's live keys, oldest first."""
        ...

    def delete_key(self, key_id: str) -> bool: ...
    def put_state(self, rec: InferenceRecord, state: bytes | None) -> None:
        """Replace the inference's record (state None: finished, kept as a tombstone until it expires)."""
        ...

    def peek_state(self, inference_id: str) -> InferenceRecord | None: ...
    def get_state(self, inference_id: str, round: int, digest: str) -> bytes | None:
        """The state if the inference still waits for this round and digest (not done, not expired); the
        record stays: a round whose answer fails can be answered again."""
        ...

    def advance_state(self, rec: InferenceRecord, state: bytes | None, round: int, digest: str) -> bool:
        """Compare-and-swap: replace the record by `rec` (and its state) only if it still waits for
        `round` with `digest`; False if another reply advanced it first."""
        ...

    def drop_state(self, inference_id: str, round: int, digest: str) -> bool:
        """Compare-and-delete: end the inference if it still waits for this round (a refused reply)."""
        ...

    def delete_state(self, inference_id: str) -> bool: ...
    def hit(self, bucket: str, window_s: int) -> tuple[int, int, float]:
        """Count one request in the current fixed window; return (this window's count, the previous
        window's count, now). The caller weighs them into a sliding-window estimate."""
        ...

    def unhit(self, bucket: str, window_s: int, now: float) -> None:
        """Take back a counted request that was refused (refusals do not use up the allowance)."""
        ...

    def ping(self) -> bool: ...
    def close(self) -> None: ...


if TYPE_CHECKING:  # mypy holds the real engine to the contract (no run-time cost, no import)
    from he_models.engine import EncryptedEngine

    def _real_engine_conforms(engine: EncryptedEngine) -> Engine:
        return engine
