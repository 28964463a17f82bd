"""The state of one API process: settings, store, the engine process pool, the loaded models, limits.

`Service` runs engine jobs in a `ProcessPoolExecutor` (spawned workers, see service.worker) under two
limits (per replica and per tenant, 429 when full), maps what comes back to API errors, restarts the
pool when a worker dies, and keeps blocking store calls off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from he_models.errors import ClientInputError
from service import worker
from service.errors import ApiError, not_ready
from service.metrics import Metrics
from service.settings import Settings
from service.store import StoreError, open_store

log = logging.getLogger("cipherbert.service")

T = TypeVar("T")
WARM_UP_DEADLINE_S = 1800


@dataclass(frozen=True)
class ServedFile:
    name: str
    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ServedModel:
    """A model every engine worker has loaded, with the bundle files the API hands out."""

    info: worker.ModelInfo
    files: list[ServedFile]

    @classmethod
    def from_info(cls, info: worker.ModelInfo) -> ServedModel:
        files = []
        for f in info.files:
            data = Path(f.path).read_bytes()
            files.append(ServedFile(f.name, f.path, len(data), hashlib.sha256(data).hexdigest()))
        return cls(info, files)


class Service:
    """Everything one API process holds: settings, store, pool, model descriptions, limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.resolve()
        self.token_key = self.settings.subkey("round-token")
        self.store = open_store(self.settings.store_config())
        self.metrics = Metrics()
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.models: dict[str, ServedModel] = {}
        self.model_errors: dict[str, str] = {}
        self.ready = False
        self.not_ready_reason = "starting: engine workers are loading the models"
        self.inflight = 0
        self.tenant_inflight: dict[str, int] = {}
        self.answering: set[tuple[str, int]] = set()  # (inference, round) being answered by this process
        self._startup: asyncio.Task[None] | None = None

    # pool -----------------------------------------------------------------------------------------
    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.settings.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=worker.init,
            initargs=(self.settings.worker_config(),),
        )

    async def start(self) -> None:
        self.pool = self._new_pool()
        self._startup = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            # Ready only when every engine process has loaded the models: ping until each has answered.
            pids: set[int] = set()
            deadline = time.time() + WARM_UP_DEADLINE_S
            while len(pids) < self.settings.workers and time.time() < deadline:
                pids |= set(
                    await asyncio.gather(
                        *(loop.run_in_executor(self.pool, worker.ping) for _ in range(self.settings.workers))
                    )
                )
            info = await loop.run_in_executor(self.pool, worker.describe)
            self.models = {model_id: ServedModel.from_info(m) for model_id, m in info.models.items()}
            self.model_errors = info.errors
            if not self.models:
                self.not_ready_reason = "no model loaded" + (
                    f": {self.model_errors}"
                    if self.model_errors
                    else f" (no model directory with config.json under {self.settings.models_dir})"
                )
                log.error(self.not_ready_reason)
                return
            self.ready = True
            self.not_ready_reason = ""
            log.info("ready: models %s, %d engine workers", sorted(self.models), self.settings.workers)
        except Exception as exc:  # keep serving /healthz and say why in /readyz
            self.not_ready_reason = f"engine workers failed to start: {type(exc).__name__}: {exc}"
            log.exception("engine workers failed to start")

    async def stop(self) -> None:
        if self._startup is not None:
            self._startup.cancel()
        if self.pool is not None:
            _stop_pool(self.pool)
            self.pool = None
        self.store.close()

    def _restart_pool(self) -> None:
        old = self.pool
        self.ready = False
        self.not_ready_reason = "restarting the engine pool"
        self.pool = self._new_pool()
        loop = asyncio.get_running_loop()
        if old is not None:  # off the event loop: joining processes may take seconds
            loop.run_in_executor(None, _stop_pool, old)
        self._startup = loop.create_task(self._warm_up())

    # admission ------------------------------------------------------------------------------------
    def require_ready(self) -> None:
        """503 not_ready until every engine worker has loaded the models (and while the pool restarts)."""
        if not self.ready:
            raise not_ready(self.not_ready_reason)

    def check_capacity(self, tenant: str) -> None:
        """429 when this replica's engine slots, or the tenant's share of them, are all taken."""
        if self.inflight >= self.settings.max_inflight:
            # Saturation is back-pressure, not a server failure: 429 + Retry-After (503 is kept for
            # "not ready", a restarting pool and an unavailable store).
            raise ApiError(
                429,
                "busy",
                f"all {self.settings.max_inflight} engine slots of this replica are busy; retry later",
                {"Retry-After": "1"},
            )
        if self.tenant_inflight.get(tenant, 0) >= self.settings.tenant_inflight:
            raise ApiError(
                429,
                "tenant_busy",
                f"tenant already has {self.settings.tenant_inflight} engine jobs "
                "in flight on this replica; retry later",
                {"Retry-After": "1"},
            )

    @contextmanager
    def _engine_slot(self, tenant: str, op: str) -> Iterator[None]:
        self.require_ready()
        self.check_capacity(tenant)
        self.inflight += 1
        self.tenant_inflight[tenant] = self.tenant_inflight.get(tenant, 0) + 1
        self.metrics.inflight.set(self.inflight)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.inflight -= 1
            self.tenant_inflight[tenant] -= 1
            if not self.tenant_inflight[tenant]:
                del self.tenant_inflight[tenant]
            self.metrics.inflight.set(self.inflight)
            self.metrics.engine.labels(op).observe(time.perf_counter() - t0)

    async def run_engine(self, tenant: str, op: str, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the pool under the concurrency limits; map failures to ApiError.

        The client's fault (ClientInputError from the engine) is 400; a key that vanished is 404; a
        dead worker or an unavailable store is 503; anything else is a bug: logged, 500 `internal`.
        """
        with self._engine_slot(tenant, op):
            try:
                return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
            except BrokenProcessPool:
                log.error("engine pool broke during %s; restarting it", op)
                self._restart_pool()
                raise ApiError(
                    503,
                    "engine_restarting",
                    "an engine worker died; the pool is restarting, retry",
                    {"Retry-After": "5"},
                ) from None
            except worker.UnknownKey as exc:
                raise ApiError(404, "unknown_key", str(exc)) from None
            except ClientInputError as exc:
                raise ApiError(400, "rejected_by_engine", f"{type(exc).__name__}: {exc}") from None
            except StoreError as exc:
                log.error("store failure in an engine worker: %s", exc)
                raise ApiError(
                    503, "store_unavailable", "the key/state store is unavailable; retry later", {"Retry-After": "2"}
                ) from None
            except Exception as exc:
                log.exception("engine %s failed", op)
                raise ApiError(500, "internal", f"internal error in the engine ({type(exc).__name__})") from None

    # store (blocking calls off the event loop) ----------------------------------------------------
    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except StoreError as exc:
            log.error("store failure: %s", exc)
            raise ApiError(
                503, "store_unavailable", "the key/state store is unavailable; retry later", {"Retry-After": "2"}
            ) from None

    async def rate_limit(self, tenant: str, what: str) -> None:
        limit, window = self.settings.rate_limit
        if limit <= 0:
            return
        current, previous, now = await self.db(self.store.hit, f"{tenant}", window)
        # Sliding-window estimate: the previous window weighs by how much of it still overlaps the
        # last `window` seconds, so a burst across a window boundary is not counted twice as allowed.
        frac = (now % window) / window
        estimate = previous * (1.0 - frac) + current
        if estimate > limit:
            await self.db(self.store.unhit, f"{tenant}", window, now)  # a refusal uses no allowance
            if current > limit or previous <= 0:
                retry = window - (now % window)
            else:  # until the previous window's weight has decayed enough
                retry = min(window - (now % window), (estimate - limit) / previous * window)
            raise ApiError(
                429,
                "rate_limited",
                f"tenant rate limit of {limit} requests per {window}s reached ({what})",
                {"Retry-After": str(max(1, int(retry + 0.999)))},
            )

    def model(self, model_id: str) -> ServedModel:
        self.require_ready()
        served = self.models.get(model_id)
        if served is None:
            raise ApiError(404, "unknown_model", f"no model {model_id!r}; available: {sorted(self.models)}")
        return served


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor, timeout: float = 5.0) -> None:
    """Stop the engine processes now: a job in flight is abandoned (its round stays answerable)."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.time() + timeout
    for proc in processes:
        proc.join(max(0.0, deadline - time.time()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
