"""Service configuration: one pydantic-settings model, each CIPHERBERT_* variable declared once.

`Settings()` reads the environment (keyword arguments, e.g. from the CLI, take precedence) and
validates every value at once: a bad value raises SettingsError naming the variable. `resolve()` then
returns a copy with the run-time values filled in: the API keys (environment, keys file or a generated
development key), the server secret (environment or `<data-dir>/secret`, created once) and the
derived limits. `settings_table()` renders the documentation table in docs/service.md from the model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.store import StoreConfig
from service.worker import WorkerConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "CIPHERBERT_"


class SettingsError(ValueError):
    """A configuration the service cannot start with; the message says which knob."""


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
    """A file of tenant:key lines, or a JSON object {tenant: key | [keys]} -> {key: tenant}."""
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


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _meta(*, cli: str | None = None, shown_default: str | None = None) -> dict[str, Any]:
    """Field metadata for the documentation table: the CLI flag and a default written for people."""
    extra: dict[str, Any] = {}
    if cli:
        extra["cli"] = cli
    if shown_default is not None:
        extra["shown_default"] = shown_default
    return extra


MIB = 1 << 20


class Settings(BaseSettings):
    """Every operator knob; environment variable = CIPHERBERT_ + the field name in upper case."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid")

    data_dir: Path = Field(
        Path("data/service"), description="embedded store, key files, secret", json_schema_extra=_meta(cli="--data-dir")
    )
    models_dir: Path = Field(
        REPO_ROOT / "models",
        description="directory whose subdirectories are model directories",
        json_schema_extra=_meta(cli="--models-dir", shown_default="./models"),
    )
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated model directory names to load",
        json_schema_extra=_meta(cli="--model", shown_default="all found"),
    )
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        repr=False,
        description=(
            "comma-separated `tenant:key` pairs (keys of 8+ characters); with none configured anywhere, a "
            "development key is written to `<data-dir>/api_keys`"
        ),
        json_schema_extra=_meta(shown_default="none"),
    )
    api_keys_file: Path | None = Field(
        None,
        description=(
            "file with one `tenant:key` per line, or a JSON object {tenant: key or [keys]}; adds to "
            "`CIPHERBERT_API_KEYS` (the `--api-keys` flag replaces them)"
        ),
        json_schema_extra=_meta(cli="--api-keys", shown_default="none"),
    )
    secret: bytes | None = Field(
        None,
        repr=False,
        description="server secret (16+ bytes), the same on every replica",
        json_schema_extra=_meta(shown_default="`<data-dir>/secret`, created 0600"),
    )
    redis_url: str | None = Field(
        None,
        description="`redis://...`: keep keys and rounds in Redis (replicas) instead of the embedded store",
        json_schema_extra=_meta(cli="--redis-url", shown_default="embedded"),
    )
    workers: int = Field(
        2,
        ge=1,
        description="engine processes per replica (concurrent queries)",
        json_schema_extra=_meta(cli="--workers"),
    )
    engine_workers: int = Field(
        1,
        ge=1,
        description=(
            "processes inside one query (the engine's forked assistant); `--workers 1 --engine-workers 2` favours"
            " latency, `--workers 2` throughput"
        ),
        json_schema_extra=_meta(cli="--engine-workers"),
    )
    warm_tokens: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description=(
            "token blocks whose kernels each worker encodes at start, e.g. `32,64`; others are encoded on first "
            "use (seconds)"
        ),
        json_schema_extra=_meta(shown_default="engine default (32)"),
    )
    max_inflight: int = Field(
        0,
        ge=0,
        description="engine jobs queued or running per replica, then 429 + Retry-After",
        json_schema_extra=_meta(cli="--max-inflight", shown_default="0 = max(8, 4 x workers)"),
    )
    tenant_inflight: int = Field(
        0,
        ge=0,
        description="per-tenant share of those engine slots",
        json_schema_extra=_meta(shown_default="0 = max inflight"),
    )
    rate_limit: Annotated[tuple[int, int], NoDecode] = Field(
        (600, 60),
        description=(
            "per-tenant new inferences + key registrations, `N/SECONDS` (`off` disables); a sliding-window "
            "estimate (this window's count + the previous window's, weighted by overlap) kept in the store, so "
            "shared by every replica using it; refused requests do not use up the allowance; rounds of a started "
            "inference are never rate limited"
        ),
        json_schema_extra=_meta(cli="--rate-limit", shown_default="600/60"),
    )
    key_ttl_s: int = Field(
        7 * 24 * 3600,
        gt=0,
        description="lifetime of a registered evaluation key, seconds",
        json_schema_extra=_meta(cli="--key-ttl"),
    )
    inference_ttl_s: int = Field(
        600, gt=0, description="how long a pending round waits for the client's reply, seconds"
    )
    max_key_bytes: int = Field(
        256 * MIB,
        gt=0,
        description="largest public-context upload (413 above)",
        json_schema_extra=_meta(shown_default="268435456 (256 MiB)"),
    )
    max_frames_bytes: int = Field(
        64 * MIB,
        gt=0,
        description="largest ciphertext upload per request (413 above)",
        json_schema_extra=_meta(shown_default="67108864 (64 MiB)"),
    )
    max_frames: int = Field(512, gt=0, description="most ciphertext frames per request")
    ctx_cache: int = Field(
        4, ge=1, description="parsed evaluation contexts cached per worker process (LRU, each ~20-40 MB)"
    )
    engine: str = Field(
        "he_models.engine:EncryptedEngine",
        description="engine class `module:Class` the workers load (tests use a stand-in)",
        json_schema_extra=_meta(cli="--engine"),
    )
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}",
        description="name in the X-Cipherbert-Replica header and the logs",
        json_schema_extra=_meta(cli="--replica-id", shown_default="host:pid"),
    )

    _generated_keys_file: Path | None = PrivateAttr(None)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(describe_errors(exc)) from None

    @field_validator("models", "warm_tokens", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return _comma_list(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, value: Any) -> Any:
        return parse_api_keys(value) if isinstance(value, str) else value

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _parse_rate_limit(cls, value: Any) -> Any:
        return parse_rate_limit(value) if isinstance(value, str) else value

    @field_validator("secret")
    @classmethod
    def _secret_length(cls, value: bytes | None) -> bytes | None:
        if value is not None and len(value) < 16:
            raise ValueError("the server secret must be at least 16 bytes")
        return value

    # run time ------------------------------------------------------------------------------------
    def resolve(self) -> Settings:
        """A copy with API keys, the secret and derived limits filled in; creates the data directory."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        max_inflight = self.max_inflight or max(8, 4 * self.workers)
        keys, generated = self._resolve_api_keys()
        resolved = self.model_copy(
            update={
                "api_keys": keys,
                "secret": self._resolve_secret(),
                "max_inflight": max_inflight,
                "tenant_inflight": self.tenant_inflight or max_inflight,
            }
        )
        resolved._generated_keys_file = generated
        return resolved

    def _resolve_api_keys(self) -> tuple[dict[str, str], Path | None]:
        keys = dict(self.api_keys)
        if self.api_keys_file is not None:
            keys.update(load_api_keys_file(self.api_keys_file))
        if keys:
            return keys, None
        # No keys configured: create one development key once and keep it in the data dir.
        path = self.data_dir / "api_keys"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"default:{secrets.token_urlsafe(24)}\n")
        return load_api_keys_file(path), path

    def _resolve_secret(self) -> bytes:
        if self.secret is not None:
            return self.secret
        path = self.data_dir / "secret"
        if not path.exists():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(secrets.token_bytes(32))
            except FileExistsError:
                pass
        secret = path.read_bytes()
        if len(secret) < 16:
            raise SettingsError(f"the server secret in {path} must be at least 16 bytes")
        return secret

    @property
    def generated_keys_file(self) -> Path | None:
        """Where resolve() wrote the development API key, when no key was configured."""
        return self._generated_keys_file

    def subkey(self, purpose: str) -> bytes:
        """Independent keys for independent uses of the one server secret (after resolve())."""
        if self.secret is None:
            raise SettingsError("settings are not resolved: call resolve() first")
        return hmac.new(self.secret, b"cipherbert/" + purpose.encode(), hashlib.sha256).digest()

    def worker_config(self) -> WorkerConfig:
        """The picklable part the engine worker processes need."""
        return WorkerConfig(
            models_dir=self.models_dir,
            models=list(self.models),
            engine=self.engine,
            engine_secret=self.subkey("engine-mask"),
            store=self.store_config(),
            ctx_cache=self.ctx_cache,
            warm_tokens=list(self.warm_tokens),
            engine_workers=self.engine_workers,
        )

    def store_config(self) -> StoreConfig:
        return StoreConfig(data_dir=self.data_dir, redis_url=self.redis_url)


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def describe_errors(exc: ValidationError) -> str:
    """'CIPHERBERT_WORKERS: must be >= 1 (got '0')' for each bad value, naming the variable."""
    parts = []
    for err in exc.errors():
        loc = err.get("loc") or ("?",)
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        field = Settings.model_fields.get(str(loc[0]))
        given = err.get("input") if field is not None and field.repr else None  # never echo a secret
        suffix = f" (got {given!r})" if isinstance(given, str | int | float) and str(given) not in message else ""
        name = env_name(str(loc[0]))
        cli = _extra(str(loc[0])).get("cli")
        name_cli = f"{name} ({cli})" if cli else name
        if message.startswith(name):
            message = message.removeprefix(name).lstrip(": ")
        parts.append(f"{name_cli}: {message}{suffix}")
    return "; ".join(parts)


def _extra(field: str) -> dict[str, Any]:
    info = Settings.model_fields.get(field)
    extra = info.json_schema_extra if info is not None else None
    return extra if isinstance(extra, dict) else {}


def settings_table() -> str:
    """The Markdown table of every setting, generated from the model (docs/service.md embeds it)."""
    rows = ["| variable | CLI | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        extra = _extra(name)
        cli = f"`{extra['cli']}`" if extra.get("cli") else ""
        if "shown_default" in extra:
            default = str(extra["shown_default"])
        else:
            default = f"`{info.default}`"
        kind = _type_name(info.annotation)
        rows.append(f"| `{env_name(name)}` | {cli} | {kind} | {default} | {info.description} |")
    return "\n".join(rows) + "\n"


TABLE_BEGIN = "<!-- settings table: generated by `python -m service.settings --write docs/service.md` -->"
TABLE_END = "<!-- end of settings table -->"


def embed_settings_table(text: str) -> str:
    """`text` with the part between the table markers replaced by the current table."""
    head, found, rest = text.partition(TABLE_BEGIN)
    _, found_end, tail = rest.partition(TABLE_END)
    if not (found and found_end):
        raise ValueError("the document has no settings table markers")
    return f"{head}{TABLE_BEGIN}\n{settings_table()}{TABLE_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print the settings table, or (--write FILE) refresh it inside a Markdown document."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m service.settings", description=main.__doc__)
    parser.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(embed_settings_table(path.read_text()))
    else:
        print(settings_table(), end="")
    return 0


def _type_name(annotation: Any) -> str:
    names = {
        "Path": "path",
        "Path | None": "path",
        "str | None": "string",
        "str": "string",
        "int": "integer",
        "bytes | None": "string",
        "list[str]": "list of names",
        "list[int]": "list of integers",
        "dict[str, str]": "`tenant:key` list",
        "tuple[int, int]": "`N/SECONDS`",
    }
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("pathlib.", "").replace("typing.", "")
    return names.get(text, text)


if __name__ == "__main__":
    raise SystemExit(main())
