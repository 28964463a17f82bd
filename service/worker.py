"""Engine worker processes: the loaded engines and cached evaluation contexts live here.

The API process never loads an engine: it sends small jobs (ids, ciphertext frames, the opaque state
blob) to a `ProcessPoolExecutor` whose workers each load every model once (`init`) and keep an LRU of
`EvalContext`s keyed by key id. A cache miss reads the public context from the shared store (SQLite
files or Redis), so any worker of any replica can serve any key. Key ids are random and never reused,
so a cached context can only be stale for a deleted key, and the API process refuses deleted keys
before it dispatches.
"""

from __future__ import annotations

import importlib
import os
import time
from collections import OrderedDict
from pathlib import Path

_STATE: dict = {}


class UnknownKey(LookupError):
    """The key id vanished from the store between the API check and the worker (expired/deleted)."""


def engine_class(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name or "EncryptedEngine")


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


def init(config: dict) -> None:
    """Pool initializer: load every model once in this process."""
    from service.store import open_store

    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cls = engine_class(config["engine"])
    engines, errors = {}, {}
    for model_dir in discover_models(config["models_dir"], config.get("models")):
        try:
            kwargs = {"warm": tuple(config["warm_tokens"])} if config.get("warm_tokens") else {}
            if int(config.get("engine_workers", 1)) > 1:
                kwargs["workers"] = int(config["engine_workers"])
            engine = cls.load(model_dir, server_secret=config["engine_secret"], **kwargs)
            engines[engine.model_id] = engine
        except Exception as exc:  # a broken model directory must not take the others down
            errors[model_dir.name] = f"{type(exc).__name__}: {exc}"
    _STATE.update(engines=engines, errors=errors, store=open_store(config["store"]),
                  cache=OrderedDict(), cache_size=max(1, int(config.get("ctx_cache", 4))))


def describe() -> dict:
    out = {}
    for model_id, engine in _STATE["engines"].items():
        files = {name: str(path) for name, path in engine.client_bundle_files().items()}
        out[model_id] = {"bundle": engine.client_bundle(), "files": files,
                         "model_hash": engine.model_hash, "max_tokens": int(engine.max_tokens)}
    return {"pid": os.getpid(), "models": out, "errors": dict(_STATE["errors"])}


def ping() -> int:
    time.sleep(0.05)  # lets the pool start its other workers for warm-up
    return os.getpid()


def _engine(model_id: str):
    try:
        return _STATE["engines"][model_id]
    except KeyError:
        raise LookupError(f"model {model_id!r} is not loaded in this worker") from None


def _remember(key_id: str, ctx) -> None:
    cache: OrderedDict = _STATE["cache"]
    cache[key_id] = ctx
    cache.move_to_end(key_id)
    while len(cache) > _STATE["cache_size"]:
        cache.popitem(last=False)


def _context(model_id: str, key_id: str):
    cache: OrderedDict = _STATE["cache"]
    cached = cache.get((model_id, key_id))
    if cached is not None:
        cache.move_to_end((model_id, key_id))
        return cached, False
    blob = _STATE["store"].get_key_blob(key_id)
    if blob is None:
        raise UnknownKey(f"key id {key_id!r} is unknown or expired")
    ctx = _engine(model_id).load_context(blob)
    _remember((model_id, key_id), ctx)
    return ctx, True


def validate_key(model_id: str, key_id: str, blob: bytes) -> dict:
    """engine.load_context checks: no secret key, parameters, relin + the plan's Galois keys."""
    t0 = time.perf_counter()
    ctx = _engine(model_id).load_context(blob)
    _remember((model_id, key_id), ctx)
    return {"seconds": time.perf_counter() - t0, "pid": os.getpid()}


def _pack(out, t0: float, loaded: bool) -> dict:
    return {"inference_id": out.inference_id, "round": int(out.round), "done": bool(out.done),
            "to_client": list(out.to_client), "state": out.state, "kind": out.kind,
            "meta": dict(out.meta or {}), "seconds": time.perf_counter() - t0, "ctx_loaded": loaded,
            "pid": os.getpid()}


def start(model_id: str, key_id: str, inference_id: str, n_tokens: int, frames: list[bytes]) -> dict:
    t0 = time.perf_counter()
    ctx, loaded = _context(model_id, key_id)
    out = _engine(model_id).start(ctx, inference_id, n_tokens, frames)
    return _pack(out, t0, loaded)


def resume(model_id: str, key_id: str, state: bytes, frames: list[bytes], inference_id: str,
           round_no: int) -> dict:
    """inference_id and round_no come from the verified round token: the engine checks the state agrees."""
    t0 = time.perf_counter()
    ctx, loaded = _context(model_id, key_id)
    out = _engine(model_id).resume(ctx, state, frames, inference_id=inference_id, round_no=round_no)
    return _pack(out, t0, loaded)
