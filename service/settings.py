"""Service configuration: every operator knob in one place, read from the environment or the CLI.

Environment variables (all optional):
  CIPHERBERT_DATA_DIR          data directory (keys, embedded SQLite store, secret)      default ./data/service
  CIPHERBERT_MODELS_DIR        directory whose subdirectories are model directories      default ./models
  CIPHERBERT_API_KEYS          comma-separated tenant:key pairs
  CIPHERBERT_API_KEYS_FILE     file with one tenant:key per line (or a JSON object {tenant: key | [keys]})
  CIPHERBERT_SECRET            server secret shared by replicas (else <data-dir>/secret, created 0600)
  CIPHERBERT_REDIS_URL         redis://... : use Redis instead of the embedded store
  CIPHERBERT_WORKERS           engine processes in the pool                              default 2
  CIPHERBERT_MAX_INFLIGHT      engine jobs queued or running per replica before 429      default max(8, 4*workers)
  CIPHERBERT_TENANT_INFLIGHT   engine jobs per tenant per replica before 429             default = max_inflight
  CIPHERBERT_RATE_LIMIT        per-tenant limit on new inferences/keys, "N/SECONDS"     default 600/60
  CIPHERBERT_KEY_TTL_S         lifetime of registered evaluation keys                    default 604800 (7 days)
  CIPHERBERT_INFERENCE_TTL_S   how long a pending round waits for the client's reply     default 600
  CIPHERBERT_MAX_KEY_BYTES     largest accepted public-context upload                    default 256 MiB
  CIPHERBERT_MAX_FRAMES_BYTES  largest accepted ciphertext upload per request            default 64 MiB
  CIPHERBERT_MAX_FRAMES        most ciphertext frames per request                        default 512
  CIPHERBERT_CTX_CACHE         evaluation contexts cached per worker process (LRU)       default 4
  CIPHERBERT_ENGINE_WORKERS    processes one engine uses for a single query (he_models' forked assistant;
                               2 = both cores on one query: lower latency, pair it with CIPHERBERT_WORKERS=1)
  CIPHERBERT_WARM_TOKENS       token blocks whose kernels each worker encodes at start, e.g. "32,64"
                               (default: the engine's own choice; an unwarmed block is encoded on first use)
  CIPHERBERT_ENGINE            engine class "module:Class"      default he_models.engine:EncryptedEngine
  CIPHERBERT_MODELS            comma-separated model directory names to load (default: all found)
  CIPHERBERT_REPLICA_ID        name reported in X-Cipherbert-Replica                     default host:pid
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A configuration the service cannot start with; the message says which knob."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def parse_rate_limit(text: str) -> tuple[int, int]:
    """'120/60' -> (120 requests, 60 s window); '0' or 'off' disables."""
    text = text.strip().lower()
    if text in ("0", "off", "none", ""):
        return 0, 1
    try:
        count, _, window = text.partition("/")
        n, w = int(count), int(window or 1)
    except ValueError:
        raise SettingsError(f"rate limit must look like N/SECONDS (e.g. 120/60), got {text!r}") from None
    if n < 0 or w <= 0:
        raise SettingsError(f"rate limit must be N/SECONDS with N >= 0 and SECONDS > 0, got {text!r}")
    return n, w


def parse_api_keys(text: str, source: str = "CIPHERBERT_API_KEYS") -> dict[str, str]:
    """'tenantA:key1,tenantB:key2' (or one pair per line) -> {key: tenant}."""
    result: dict[str, str] = {}
    for raw in text.replace("\n", ",").split(","):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        tenant, sep, key = item.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not tenant or not key:
            raise SettingsError(f"{source}: expected tenant:key pairs, got {item!r}")
        if len(key) < 8:
            raise SettingsError(f"{source}: API key for tenant {tenant!r} is shorter than 8 characters")
        result[key] = tenant
    return result


def load_api_keys_file(path: str | Path) -> dict[str, str]:
    import json

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read API keys file {path}: {exc.strerror}") from None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"API keys file {path} is not valid JSON: {exc}") from None
        pairs = []
        for tenant, keys in data.items():
            for key in [keys] if isinstance(keys, str) else keys:
                pairs.append(f"{tenant}:{key}")
        text = ",".join(pairs)
    return parse_api_keys(text, source=str(path))


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("CIPHERBERT_DATA_DIR", "data/service")))
    models_dir: Path = field(default_factory=lambda: Path(
        os.environ.get("CIPHERBERT_MODELS_DIR", str(REPO_ROOT / "models"))))
    models: list[str] = field(default_factory=lambda: [
        m.strip() for m in os.environ.get("CIPHERBERT_MODELS", "").split(",") if m.strip()])
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> tenant
    api_keys_file: str | None = field(default_factory=lambda: os.environ.get("CIPHERBERT_API_KEYS_FILE") or None)
    secret: bytes | None = None
    redis_url: str | None = field(default_factory=lambda: os.environ.get("CIPHERBERT_REDIS_URL") or None)
    workers: int = field(default_factory=lambda: _env_int("CIPHERBERT_WORKERS", 2))
    max_inflight: int = field(default_factory=lambda: _env_int("CIPHERBERT_MAX_INFLIGHT", 0))
    tenant_inflight: int = field(default_factory=lambda: _env_int("CIPHERBERT_TENANT_INFLIGHT", 0))
    rate_limit: tuple[int, int] = field(default_factory=lambda: parse_rate_limit(
        os.environ.get("CIPHERBERT_RATE_LIMIT", "600/60")))
    key_ttl_s: int = field(default_factory=lambda: _env_int("CIPHERBERT_KEY_TTL_S", 7 * 24 * 3600))
    inference_ttl_s: int = field(default_factory=lambda: _env_int("CIPHERBERT_INFERENCE_TTL_S", 600))
    max_key_bytes: int = field(default_factory=lambda: _env_int("CIPHERBERT_MAX_KEY_BYTES", 256 << 20))
    max_frames_bytes: int = field(default_factory=lambda: _env_int("CIPHERBERT_MAX_FRAMES_BYTES", 64 << 20))
    max_frames: int = field(default_factory=lambda: _env_int("CIPHERBERT_MAX_FRAMES", 512))
    engine_workers: int = field(default_factory=lambda: _env_int("CIPHERBERT_ENGINE_WORKERS", 1))
    warm_tokens: list[int] = field(default_factory=lambda: [
        int(x) for x in os.environ.get("CIPHERBERT_WARM_TOKENS", "").split(",") if x.strip()])
    ctx_cache: int = field(default_factory=lambda: _env_int("CIPHERBERT_CTX_CACHE", 4))
    engine: str = field(default_factory=lambda: os.environ.get(
        "CIPHERBERT_ENGINE", "he_models.engine:EncryptedEngine"))
    replica_id: str = field(default_factory=lambda: os.environ.get(
        "CIPHERBERT_REPLICA_ID", f"{socket.gethostname()}:{os.getpid()}"))

    def finalize(self) -> "Settings":
        """Resolve API keys, the secret and defaults; create the data directory."""
        self.data_dir = Path(self.data_dir)
        self.models_dir = Path(self.models_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.workers < 1:
            raise SettingsError("workers must be >= 1")
        if self.max_inflight <= 0:
            self.max_inflight = max(8, 4 * self.workers)
        if self.tenant_inflight <= 0:
            self.tenant_inflight = self.max_inflight
        if not self.api_keys:
            env = os.environ.get("CIPHERBERT_API_KEYS", "")
            if env.strip():
                self.api_keys.update(parse_api_keys(env))
            if self.api_keys_file:
                self.api_keys.update(load_api_keys_file(self.api_keys_file))
        if not self.api_keys:
            # No keys configured: create one development key once and keep it in the data dir.
            path = self.data_dir / "api_keys"
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"default:{secrets.token_urlsafe(24)}\n")
            self.api_keys = load_api_keys_file(path)
            self.generated_keys_file = str(path)
        if self.secret is None:
            env = os.environ.get("CIPHERBERT_SECRET")
            if env:
                self.secret = env.encode()
            else:
                path = self.data_dir / "secret"
                if not path.exists():
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        with os.fdopen(fd, "wb") as fh:
                            fh.write(secrets.token_bytes(32))
                    except FileExistsError:
                        pass
                self.secret = path.read_bytes()
        if len(self.secret) < 16:
            raise SettingsError("the server secret (CIPHERBERT_SECRET) must be at least 16 bytes")
        return self

    def subkey(self, purpose: str) -> bytes:
        """Independent keys for independent uses of the one server secret."""
        assert self.secret is not None
        return hmac.new(self.secret, b"cipherbert/" + purpose.encode(), hashlib.sha256).digest()

    def worker_config(self) -> dict:
        """The picklable part the engine worker processes need."""
        return {
            "models_dir": str(self.models_dir),
            "models": list(self.models),
            "engine": self.engine,
            "engine_secret": self.subkey("engine-mask"),
            "store": self.store_config(),
            "ctx_cache": self.ctx_cache,
            "warm_tokens": list(self.warm_tokens),
            "engine_workers": int(self.engine_workers),
        }

    def store_config(self) -> dict:
        return {"redis_url": self.redis_url, "data_dir": str(self.data_dir)}
