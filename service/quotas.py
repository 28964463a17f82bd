"""Per-tenant quotas on what a tenant keeps in the shared store: live keys, pending inferences, bytes.

The usage is read from the store (SQLite or Redis), so every replica sharing it enforces one quota.
Each quota is checked twice: before the work (refused early, from the declared upload size) and after
the record is written (a concurrent request on another replica may have taken the last place: the
record is removed again and the request refused). Concurrent requests can thus both be refused near
the limit, never both admitted over it. Refusals name the quota and the setting that sizes it.
"""

from __future__ import annotations

from service.contracts import TenantUsage
from service.errors import ApiError
from service.settings import Settings


def key_quota_error(s: Settings, usage: TenantUsage, adding: int, new_keys: int = 1) -> ApiError | None:
    """Why one more key of `adding` bytes would exceed the tenant's quotas (None: it fits)."""
    if usage.keys + new_keys > s.tenant_max_keys:
        return ApiError(
            403,
            "key_quota",
            f"tenant holds {usage.keys} live keys; quota CIPHERBERT_TENANT_MAX_KEYS={s.tenant_max_keys} "
            "(delete a key or wait for one to expire)",
        )
    if usage.key_bytes + adding > s.tenant_max_key_bytes:
        return ApiError(
            403,
            "key_bytes_quota",
            f"tenant holds {usage.key_bytes} bytes of keys, this one adds {adding}; quota "
            f"CIPHERBERT_TENANT_MAX_KEY_BYTES={s.tenant_max_key_bytes}",
        )
    return stored_quota_error(s, usage, adding)


def stored_quota_error(s: Settings, usage: TenantUsage, adding: int) -> ApiError | None:
    if usage.stored_bytes + adding > s.tenant_max_stored_bytes:
        return ApiError(
            403,
            "stored_bytes_quota",
            f"tenant stores {usage.stored_bytes} bytes (keys + pending rounds), this adds {adding}; quota "
            f"CIPHERBERT_TENANT_MAX_STORED_BYTES={s.tenant_max_stored_bytes}",
        )
    return None


def inference_quota_error(s: Settings, usage: TenantUsage, new: int = 1) -> ApiError | None:
    if usage.inferences + new > s.tenant_max_inferences:
        return ApiError(
            429,
            "inference_quota",
            f"tenant has {usage.inferences} pending inferences; quota CIPHERBERT_TENANT_MAX_INFERENCES="
            f"{s.tenant_max_inferences} (finish or abort one)",
            {"Retry-After": "2"},
        )
    return stored_quota_error(s, usage, 0)


def raise_if(error: ApiError | None) -> None:
    if error is not None:
        raise error
