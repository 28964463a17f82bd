"""Refresh masks (he_models.masks): a PRF of (secret, inference, round, tensor), within the headroom."""

from __future__ import annotations

import numpy as np
import pytest

from he_models.ckks import CKKSParams, load_ciphertext
from he_models.client import ClientKeys
from he_models.kernels import Backend
from he_models.layout import Geometry
from he_models.masks import HEADROOM_BITS, Masks, mask_limits

SECRET = b"mask-test-secret-0123456789"
PARAMS = CKKSParams()


@pytest.fixture(scope="module")
def backend():
    return Backend(PARAMS)


def test_limits_scale_with_range_and_stop_at_the_headroom():
    limits = mask_limits({"small": 2.0, "huge": 2.0**17}, mask_bits=10)
    width, bits = limits["small"]
    assert width == 2.0 * 2**10 and bits == pytest.approx(10)
    width, bits = limits["huge"]
    assert width == 2.0**HEADROOM_BITS - 2.0**17  # |x + r| <= 2^18
    assert bits == pytest.approx(0.0)


def test_masks_are_a_prf_of_secret_inference_round_and_tensor(backend):
    limits = mask_limits({"0.q": 3.0, "0.k": 3.0}, 8)
    masks = Masks(SECRET, backend, limits)
    a = masks.draw("inf", 1, "0.q", 2)
    assert len(a) == 2 and all(v.shape == (PARAMS.slots,) for v in a)
    again = Masks(SECRET, backend, limits).draw("inf", 1, "0.q", 2)  # another replica
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    others = [
        masks.draw("inf", 2, "0.q", 1)[0],
        masks.draw("other", 1, "0.q", 1)[0],
        masks.draw("inf", 1, "0.k", 1)[0],
        Masks(b"another-secret-0123456789", backend, limits).draw("inf", 1, "0.q", 1)[0],
    ]
    assert not any(np.allclose(a[0], o) for o in others)
    width = limits["0.q"][0]
    flat = np.concatenate(a)
    assert np.abs(flat).max() <= width and np.abs(flat).max() > 0.9 * width  # uniform over [-w, w]
    assert abs(flat.mean()) < 0.05 * width


def test_mask_out_then_unmask_restores_the_values(backend):
    keys = ClientKeys.generate(PARAMS, [1])
    geo = Geometry.for_tokens(5, 32, 2, 64, PARAMS.slots)
    masks = Masks(SECRET, backend, mask_limits({"0.h": 4.0}, 6))
    x = np.random.default_rng(1).normal(size=(5, 32))
    cts = [load_ciphertext(backend.context, b) for b in keys.encrypt(geo.pack_fm(x))]
    sent = masks.mask_all(cts, "inf", 3, "0.h")
    seen = geo.unpack_fm(keys.decrypt(sent), 32)
    assert np.abs(seen - x).max() > 1.0  # the client sees masked values only
    fresh = [load_ciphertext(backend.context, b) for b in keys.encrypt(keys.decrypt(sent))]  # the refresh
    restored = masks.unmask(fresh, "inf", 3, "0.h", geo)
    from he_models.ckks import save_bytes

    got = keys.decrypt([save_bytes(c) for c in restored])
    assert np.abs(geo.unpack_fm(got, 32) - x).max() < 1e-3
    padding = np.concatenate(got)[np.concatenate(geo.fm_valid(32)) == 0]
    assert np.abs(padding).max() > 1.0  # padding slots were never masked, so none is removed there
