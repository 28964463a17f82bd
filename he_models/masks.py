"""Refresh masks: uniform noise from a PRF of (server secret, inference, round, tensor).

Every value the client decrypts is masked: x + r with r uniform in [-width, width]. The mask is
re-derived, never stored, so any replica holding the secret can remove it from the client's reply.
Its width is 2^mask_bits times the tensor's calibrated range, capped so that |x + r| still fits in
the last level's headroom (base prime 55 bits - scale 36 bits - 1 sign bit).
"""

from __future__ import annotations

import hashlib
import hmac
import math

import numpy as np
import tenseal.sealapi as seal

from he_models.ckks import save_bytes
from he_models.kernels import Backend
from he_models.layout import Geometry

HEADROOM_BITS = 18  # base prime 55 bits - scale 36 bits - 1: |value| at the last level must stay below 2^18

MaskLimits = dict[str, tuple[float, float]]


def mask_limits(ranges: dict[str, float], mask_bits: int) -> MaskLimits:
    """(mask half-width, bits of hiding) per masked tensor, capped by the last level's headroom."""
    limits = {}
    cap = 2.0**HEADROOM_BITS
    for name, rng in ranges.items():
        width = min(rng * 2.0**mask_bits, cap - rng)
        limits[name] = (width, math.log2(max(width / rng, 1.0)))
    return limits


class Masks:
    """Draws masks and applies them to outgoing ciphertexts, removes them from refresh replies."""

    def __init__(self, secret: bytes, backend: Backend, limits: MaskLimits) -> None:
        self._secret = secret
        self.backend = backend
        self.slots = backend.slots
        self.limits = limits

    def draw(self, inference: str, round_no: int, name: str, n_cts: int) -> list[np.ndarray]:
        """n_cts slot vectors of the mask for tensor `name` in this round of this inference."""
        width = self.limits[name][0]
        digest = hmac.new(self._secret, f"mask|{inference}|{round_no}|{name}".encode(), hashlib.sha256).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "big"))
        flat = rng.uniform(-width, width, size=n_cts * self.slots)
        return [flat[i * self.slots : (i + 1) * self.slots] for i in range(n_cts)]

    def masked_out(self, ct: seal.Ciphertext, mask: np.ndarray) -> bytes:
        """ct + mask, dropped to the last level (smallest on the wire), serialized for the client."""
        masked = self.backend.add_plain(ct, mask)
        return save_bytes(self.backend.mod_to(masked, 0))

    def mask_all(self, cts: list[seal.Ciphertext], inference: str, round_no: int, name: str) -> list[bytes]:
        """Mask every ciphertext of one tensor with that tensor's mask for this round."""
        masks = self.draw(inference, round_no, name, len(cts))
        return [self.masked_out(c, m) for c, m in zip(cts, masks, strict=True)]

    def unmask(
        self, fresh: list[seal.Ciphertext], inference: str, round_no: int, name: str, geo: Geometry
    ) -> list[seal.Ciphertext]:
        """Remove the mask from a refreshed feature-major tensor (padding slots were never masked)."""
        mask = self.draw(inference, round_no, name, len(fresh))
        valid = geo.fm_valid(geo.hidden)
        return [self.backend.sub_plain(c, m * v) for c, m, v in zip(fresh, mask, valid, strict=False)]
