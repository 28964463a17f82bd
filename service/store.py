"""Where the service keeps what must outlive one request.

Two implementations of one small interface (service.contracts.Store):

* `SQLiteStore` (default, embedded): SQLite in WAL mode under the data directory, with registered public
  contexts as files beside it (`keys/<key_id>.ctx`, mode 0600). Keys survive a restart; several
  processes on one host may share the directory.
* `RedisStore` (CIPHERBERT_REDIS_URL): everything in Redis with native expiry, for replicas on
  several hosts.

What is stored: key records (tenant, model, expiry, size, digest) and their public contexts; one record
per pending inference (tenant, key id, model, round, digest of what was sent, the engine's opaque state
blob), kept until its successor is written: `get_state` reads the round's state without removing it and
`advance_state` swaps in the next round only if the record still waits for the round and digest the
caller read (a compare-and-swap), so of concurrent replies to one round exactly one wins, and a round
whose engine step or successor write failed (a store outage) can simply be answered again; rate-limit
counters.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.contracts import InferenceRecord, KeyRecord, Store

__all__ = [
    "InferenceRecord",
    "KeyRecord",
    "RedisStore",
    "SQLiteStore",
    "Store",
    "StoreConfig",
    "StoreError",
    "open_store",
]


class StoreError(RuntimeError):
    """The backing store failed (not the client's fault): maps to 503."""


@dataclass(frozen=True)
class StoreConfig:
    """Which store to open (picklable: the engine workers open their own)."""

    data_dir: Path
    redis_url: str | None = None


def open_store(config: StoreConfig) -> Store:
    if config.redis_url:
        return RedisStore(config.redis_url)
    return SQLiteStore(Path(config.data_dir))


# ---------------------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
  key_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, model_id TEXT NOT NULL,
  created_at REAL NOT NULL, expires_at REAL NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS keys_tenant ON keys(tenant);
CREATE TABLE IF NOT EXISTS inferences (
  inference_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, key_id TEXT NOT NULL, model_id TEXT NOT NULL,
  round INTEGER NOT NULL, digest TEXT NOT NULL, done INTEGER NOT NULL,
  created_at REAL NOT NULL, expires_at REAL NOT NULL, state BLOB);
CREATE TABLE IF NOT EXISTS counters (bucket TEXT PRIMARY KEY, count INTEGER NOT NULL, expires_at REAL NOT NULL);
"""


class SQLiteStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.keys_dir = self.data_dir / "keys"
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        self.path = self.data_dir / "store.sqlite3"
        self._local = threading.local()
        self._last_purge = 0.0
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def _exec(self, sql: str, args: tuple = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store: {exc}") from exc

    def _purge(self) -> None:
        now = time.time()
        if now - self._last_purge < 30:
            return
        self._last_purge = now
        for (key_id,) in self._exec("DELETE FROM keys WHERE expires_at <= ? RETURNING key_id", (now,)):
            (self.keys_dir / f"{key_id}.ctx").unlink(missing_ok=True)
        self._exec("DELETE FROM inferences WHERE expires_at <= ?", (now,))
        self._exec("DELETE FROM counters WHERE expires_at <= ?", (now,))

    def put_key(self, rec: KeyRecord, blob: bytes) -> None:
        self._purge()
        path = self.keys_dir / f"{rec.key_id}.ctx"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
        self._exec(
            "INSERT OR REPLACE INTO keys VALUES (?,?,?,?,?,?,?)",
            (rec.key_id, rec.tenant, rec.model_id, rec.created_at, rec.expires_at, rec.size, rec.sha256),
        )

    def get_key(self, key_id: str) -> KeyRecord | None:
        rows = self._exec("SELECT * FROM keys WHERE key_id = ? AND expires_at > ?", (key_id, time.time()))
        return KeyRecord(*rows[0]) if rows else None

    def get_key_blob(self, key_id: str) -> bytes | None:
        if self.get_key(key_id) is None:
            return None
        try:
            return (self.keys_dir / f"{key_id}.ctx").read_bytes()
        except FileNotFoundError:
            return None

    def list_keys(self, tenant: str) -> list[KeyRecord]:
        rows = self._exec(
            "SELECT * FROM keys WHERE tenant = ? AND expires_at > ? ORDER BY created_at", (tenant, time.time())
        )
        return [KeyRecord(*row) for row in rows]

    def delete_key(self, key_id: str) -> bool:
        rows = self._exec("DELETE FROM keys WHERE key_id = ? RETURNING key_id", (key_id,))
        (self.keys_dir / f"{key_id}.ctx").unlink(missing_ok=True)
        return bool(rows)

    def put_state(self, rec: InferenceRecord, state: bytes | None) -> None:
        self._purge()
        self._exec(
            "INSERT OR REPLACE INTO inferences VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                rec.inference_id,
                rec.tenant,
                rec.key_id,
                rec.model_id,
                rec.round,
                rec.digest,
                int(rec.done),
                rec.created_at,
                rec.expires_at,
                state,
            ),
        )

    def peek_state(self, inference_id: str) -> InferenceRecord | None:
        rows = self._exec(
            "SELECT inference_id, tenant, key_id, model_id, round, digest, done, created_at, expires_at "
            "FROM inferences WHERE inference_id = ? AND expires_at > ?",
            (inference_id, time.time()),
        )
        if not rows:
            return None
        row = list(rows[0])
        row[6] = bool(row[6])
        return InferenceRecord(*row)

    def get_state(self, inference_id: str, round: int, digest: str) -> bytes | None:
        rows = self._exec(
            "SELECT state FROM inferences WHERE inference_id = ? AND round = ? AND digest = ? AND done = 0 "
            "AND expires_at > ?",
            (inference_id, round, digest, time.time()),
        )
        return rows[0][0] if rows else None

    def advance_state(self, rec: InferenceRecord, state: bytes | None, round: int, digest: str) -> bool:
        # One statement: the compare (round, digest, not done) and the swap are atomic across processes.
        rows = self._exec(
            "UPDATE inferences SET round = ?, digest = ?, done = ?, expires_at = ?, state = ? "
            "WHERE inference_id = ? AND round = ? AND digest = ? AND done = 0 AND expires_at > ? "
            "RETURNING inference_id",
            (rec.round, rec.digest, int(rec.done), rec.expires_at, state, rec.inference_id, round, digest, time.time()),
        )
        return bool(rows)

    def drop_state(self, inference_id: str, round: int, digest: str) -> bool:
        rows = self._exec(
            "DELETE FROM inferences WHERE inference_id = ? AND round = ? AND digest = ? AND done = 0 "
            "RETURNING inference_id",
            (inference_id, round, digest),
        )
        return bool(rows)

    def delete_state(self, inference_id: str) -> bool:
        return bool(self._exec("DELETE FROM inferences WHERE inference_id = ? RETURNING inference_id", (inference_id,)))

    def hit(self, bucket: str, window_s: int) -> tuple[int, int, float]:
        now = time.time()
        window = int(now // window_s)
        expires = (window + 2) * window_s  # kept one extra window: it is the next one's "previous"
        rows = self._exec(
            "INSERT INTO counters VALUES (?, 1, ?) ON CONFLICT(bucket) DO UPDATE SET count = count + 1 RETURNING count",
            (f"{bucket}:{window}", expires),
        )
        prev = self._exec("SELECT count FROM counters WHERE bucket = ?", (f"{bucket}:{window - 1}",))
        return int(rows[0][0]), int(prev[0][0]) if prev else 0, now

    def unhit(self, bucket: str, window_s: int, now: float) -> None:
        self._exec(
            "UPDATE counters SET count = count - 1 WHERE bucket = ? AND count > 0",
            (f"{bucket}:{int(now // window_s)}",),
        )

    def ping(self) -> bool:
        self._exec("SELECT 1")
        return True

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


# ----------------------------------------------------------------------------------------------- Redis

# Compare-and-swap scripts: the inference's record changes only while it still waits for the round
# (and digest) the caller read, so of concurrent replies to one round exactly one advances it.
_MATCH = (
    "local r = redis.call('HMGET', KEYS[1], 'round', 'digest', 'done')\n"
    "if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] or r[3] ~= '0' then return false end\n"
)
_GET_LUA = _MATCH + "local s = redis.call('HGET', KEYS[1], 'state')\nif s then return s else return '' end\n"
_DROP_LUA = _MATCH + "redis.call('DEL', KEYS[1])\nreturn 1\n"
# ARGV[3] = expire-at, ARGV[4] = 1 to keep a state (ARGV[5]), then field/value pairs
_ADVANCE_LUA = (
    _MATCH
    + """redis.call('HDEL', KEYS[1], 'state')
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'state', ARGV[5]) end
redis.call('EXPIREAT', KEYS[1], ARGV[3])
return 1
"""
)


class RedisStore:
    prefix = "cb:"

    def __init__(self, url: str) -> None:
        import redis

        self._redis_mod = redis
        self.r = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)
        self._get = self.r.register_script(_GET_LUA)
        self._drop = self.r.register_script(_DROP_LUA)
        self._advance = self.r.register_script(_ADVANCE_LUA)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call redis-py (its replies are untyped: bytes, ints, lists) and map its errors to StoreError."""
        try:
            return fn(*args, **kwargs)
        except self._redis_mod.RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    def put_key(self, rec: KeyRecord, blob: bytes) -> None:
        ttl = max(1, int(rec.expires_at - time.time()))
        pipe = self.r.pipeline(transaction=True)
        pipe.set(f"{self.prefix}keyblob:{rec.key_id}", blob, ex=ttl)
        pipe.set(f"{self.prefix}key:{rec.key_id}", json.dumps(rec.to_dict()), ex=ttl)
        pipe.zadd(f"{self.prefix}tenantkeys:{rec.tenant}", {rec.key_id: rec.expires_at})
        self._call(pipe.execute)

    def get_key(self, key_id: str) -> KeyRecord | None:
        raw = self._call(self.r.get, f"{self.prefix}key:{key_id}")
        if raw is None:
            return None
        rec = KeyRecord(**json.loads(raw))
        return rec if rec.expires_at > time.time() else None

    def get_key_blob(self, key_id: str) -> bytes | None:
        return self._call(self.r.get, f"{self.prefix}keyblob:{key_id}")

    def list_keys(self, tenant: str) -> list[KeyRecord]:
        zkey = f"{self.prefix}tenantkeys:{tenant}"
        self._call(self.r.zremrangebyscore, zkey, "-inf", time.time())
        out = []
        for key_id in self._call(self.r.zrange, zkey, 0, -1):
            rec = self.get_key(key_id.decode())
            if rec is not None:
                out.append(rec)
        return sorted(out, key=lambda r: r.created_at)

    def delete_key(self, key_id: str) -> bool:
        rec = self.get_key(key_id)
        n = self._call(self.r.delete, f"{self.prefix}key:{key_id}", f"{self.prefix}keyblob:{key_id}")
        if rec is not None:
            self._call(self.r.zrem, f"{self.prefix}tenantkeys:{rec.tenant}", key_id)
        return bool(n)

    def put_state(self, rec: InferenceRecord, state: bytes | None) -> None:
        key = f"{self.prefix}inf:{rec.inference_id}"
        mapping: dict[Any, str | bytes] = {
            k: (str(int(v)) if isinstance(v, bool) else str(v)) for k, v in rec.to_dict().items()
        }
        if state is not None:
            mapping["state"] = state
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=mapping)
        pipe.expireat(key, int(rec.expires_at) + 1)
        self._call(pipe.execute)

    def peek_state(self, inference_id: str) -> InferenceRecord | None:
        fields = ["inference_id", "tenant", "key_id", "model_id", "round", "digest", "done", "created_at", "expires_at"]
        vals = self._call(self.r.hmget, f"{self.prefix}inf:{inference_id}", fields)
        if vals[0] is None:
            return None
        d = dict(zip(fields, (v.decode() for v in vals), strict=True))
        rec = InferenceRecord(
            d["inference_id"],
            d["tenant"],
            d["key_id"],
            d["model_id"],
            int(d["round"]),
            d["digest"],
            d["done"] == "1",
            float(d["created_at"]),
            float(d["expires_at"]),
        )
        return rec if rec.expires_at > time.time() else None

    def get_state(self, inference_id: str, round: int, digest: str) -> bytes | None:
        key = f"{self.prefix}inf:{inference_id}"
        out = self._call(self._get, keys=[key], args=[str(round), digest])
        if out is None:
            return None
        rec = self.peek_state(inference_id)  # expiry is checked like SQLite's (Redis may lag by a second)
        return bytes(out) if rec is not None else None

    def advance_state(self, rec: InferenceRecord, state: bytes | None, round: int, digest: str) -> bool:
        fields: list[str | bytes] = []
        for k, v in rec.to_dict().items():
            fields += [k, str(int(v)) if isinstance(v, bool) else str(v)]
        args = [str(round), digest, str(int(rec.expires_at) + 1), "0" if state is None else "1", state or b"", *fields]
        return bool(self._call(self._advance, keys=[f"{self.prefix}inf:{rec.inference_id}"], args=args))

    def drop_state(self, inference_id: str, round: int, digest: str) -> bool:
        return bool(self._call(self._drop, keys=[f"{self.prefix}inf:{inference_id}"], args=[str(round), digest]))

    def delete_state(self, inference_id: str) -> bool:
        return bool(self._call(self.r.delete, f"{self.prefix}inf:{inference_id}"))

    def hit(self, bucket: str, window_s: int) -> tuple[int, int, float]:
        now = time.time()
        window = int(now // window_s)
        key = f"{self.prefix}rl:{bucket}:{window}"
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, 2 * window_s + 1)
        pipe.get(f"{self.prefix}rl:{bucket}:{window - 1}")
        count, _, prev = self._call(pipe.execute)
        return int(count), int(prev or 0), now

    def unhit(self, bucket: str, window_s: int, now: float) -> None:
        self._call(self.r.decr, f"{self.prefix}rl:{bucket}:{int(now // window_s)}")

    def ping(self) -> bool:
        return bool(self._call(self.r.ping))

    def close(self) -> None:
        self.r.close()
