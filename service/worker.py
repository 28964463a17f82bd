"""Engine worker processes: the loaded engines and cached evaluation contexts live here.

The API process never loads an engine: it sends small jobs (ids, ciphertext frames, the opaque state
blob) to a `ProcessPoolExecutor` whose workers each load every model once (`init`) and keep an LRU of
evaluation contexts keyed by key id. A cache miss reads the public context from the shared store (SQLite
files or Redis), so any worker of any replica can serve any key. Key ids are random and never reused,
so a cached context can only be stale for a deleted key, and the API process refuses deleted keys
before it dispatches. Jobs return `StepResult`s (the engine's StepOutput, pickled across the pool).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from service.contracts import Engine, EngineClass, StepResult, Store
from service.store import StoreConfig

if TYPE_CHECKING:
    from he_models.engine import StepOutput


class UnknownKey(LookupError):
    """The key id vanished from the store between the API check and the worker (expired/deleted)."""


@dataclass(frozen=True)
class WorkerConfig:
    """What every engine process needs to start (picklable)."""

    models_dir: Path
    engine: str
    engine_secret: bytes = field(repr=False)
    store: StoreConfig
    models: list[str] = field(default_factory=list)
    ctx_cache: int = 4
    warm_tokens: list[int] = field(default_factory=list)
    engine_workers: int = 1


@dataclass(frozen=True)
class BundleFile:
    name: str
    path: str


@dataclass(frozen=True)
class ModelInfo:
    """What the API process learns about one loaded model (from `describe`)."""

    model_id: str
    bundle: dict[str, Any]
    files: list[BundleFile]
    model_hash: str
    max_tokens: int


@dataclass(frozen=True)
class PoolInfo:
    pid: int
    models: dict[str, ModelInfo]
    errors: dict[str, str]  # model directory -> why it did not load


@dataclass
class _WorkerState:
    engines: dict[str, Engine]
    errors: dict[str, str]
    store: Store
    cache_size: int
    cache: OrderedDict[tuple[str, str], Any] = field(default_factory=OrderedDict)


_STATE: _WorkerState | None = None


def engine_class(spec: str) -> EngineClass:
    module, _, name = spec.partition(":")
    return cast(EngineClass, getattr(importlib.import_module(module), name or "EncryptedEngine"))


def discover_models(models_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    root = Path(models_dir)
    if names:
        dirs = [root / n if not Path(n).is_absolute() else Path(n) for n in names]
    else:
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [d for d in dirs if (d / "config.json").is_file()]


def _die_with_parent() -> None:
    """An engine process must never outlive its API process (it holds GBs of encoded weights)."""
    import signal
    import threading

    parent = os.getppid()
    try:  # Linux: the kernel sends SIGTERM when the parent exits
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:  # portable fallback: re-parented means the parent is gone
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def init(config: WorkerConfig) -> None:
    """Pool initializer: load every model once in this process."""
    from service.store import open_store

    global _STATE
    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cls = engine_class(config.engine)
    options: dict[str, Any] = {"warm": tuple(config.warm_tokens)} if config.warm_tokens else {}
    if config.engine_workers > 1:
        options["workers"] = config.engine_workers
    engines: dict[str, Engine] = {}
    errors: dict[str, str] = {}
    for model_dir in discover_models(config.models_dir, config.models):
        try:
            engine = cls.load(model_dir, server_secret=config.engine_secret, **options)
            engines[engine.model_id] = engine
        except Exception as exc:  # a broken model directory must not take the others down
            errors[model_dir.name] = f"{type(exc).__name__}: {exc}"
    _STATE = _WorkerState(
        engines=engines, errors=errors, store=open_store(config.store), cache_size=max(1, config.ctx_cache)
    )


def _state() -> _WorkerState:
    if _STATE is None:
        raise RuntimeError("engine worker used before init()")
    return _STATE


def describe() -> PoolInfo:
    state = _state()
    models = {}
    for model_id, engine in state.engines.items():
        files = [BundleFile(name, str(path)) for name, path in sorted(engine.client_bundle_files().items())]
        models[model_id] = ModelInfo(
            model_id=model_id,
            bundle=engine.client_bundle(),
            files=files,
            model_hash=engine.model_hash,
            max_tokens=int(engine.max_tokens),
        )
    return PoolInfo(pid=os.getpid(), models=models, errors=dict(state.errors))


def ping() -> int:
    time.sleep(0.05)  # lets the pool start its other workers for warm-up
    return os.getpid()


def _engine(model_id: str) -> Engine:
    try:
        return _state().engines[model_id]
    except KeyError:
        raise LookupError(f"model {model_id!r} is not loaded in this worker") from None


def _remember(key: tuple[str, str], ctx: Any) -> None:
    state = _state()
    state.cache[key] = ctx
    state.cache.move_to_end(key)
    while len(state.cache) > state.cache_size:
        state.cache.popitem(last=False)


def _context(model_id: str, key_id: str) -> tuple[Any, bool]:
    state = _state()
    cached = state.cache.get((model_id, key_id))
    if cached is not None:
        state.cache.move_to_end((model_id, key_id))
        return cached, False
    blob = state.store.get_key_blob(key_id)
    if blob is None:
        raise UnknownKey(f"key id {key_id!r} is unknown or expired")
    ctx = _engine(model_id).load_context(blob)
    _remember((model_id, key_id), ctx)
    return ctx, True


def validate_key(model_id: str, key_id: str, blob: bytes) -> float:
    """engine.load_context checks: no secret key, parameters, relin + the plan's Galois keys. Returns seconds."""
    t0 = time.perf_counter()
    _remember((model_id, key_id), _engine(model_id).load_context(blob))
    return time.perf_counter() - t0


def _result(out: StepOutput, t0: float, loaded: bool) -> StepResult:
    step = dataclasses.replace(
        out, round=int(out.round), done=bool(out.done), to_client=list(out.to_client), meta=dict(out.meta or {})
    )
    return StepResult(step=step, seconds=time.perf_counter() - t0, context_loaded=loaded, pid=os.getpid())


def start(model_id: str, key_id: str, inference_id: str, n_tokens: int, frames: list[bytes]) -> StepResult:
    t0 = time.perf_counter()
    ctx, loaded = _context(model_id, key_id)
    return _result(_engine(model_id).start(ctx, inference_id, n_tokens, frames), t0, loaded)


def resume(
    model_id: str, key_id: str, state: bytes, frames: list[bytes], inference_id: str, round_no: int
) -> StepResult:
    """inference_id and round_no come from the verified round token: the engine checks the state agrees."""
    t0 = time.perf_counter()
    ctx, loaded = _context(model_id, key_id)
    out = _engine(model_id).resume(ctx, state, frames, inference_id=inference_id, round_no=round_no)
    return _result(out, t0, loaded)
