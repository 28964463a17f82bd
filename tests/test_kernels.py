"""Kernels: diagonal maps evaluated on real SEAL ciphertexts agree with numpy, and cost what they say.

A map is given as triplets (global out slot, global in slot, weight) over lists of ciphertexts; the
tests build dense and sparse maps across two input and two output ciphertexts, evaluate them under
encryption and compare with the same matrix applied in float64.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tenseal.sealapi as seal

from he_models.ckks import CKKSParams, encode_vector
from he_models.kernels import (
    Backend,
    apply_map,
    build_map,
    build_map_fewest_rotations,
    encode_map,
    plan_map,
    subset_map,
)

PARAMS = CKKSParams()  # the engine's parameters: N=8192, [55, 36, 36, 36, 55], 2^36
UNIT = 1
BABY = 4


@functools.cache
def keyed_backend() -> tuple[Backend, seal.Encryptor, seal.Decryptor, seal.GaloisKeys, seal.RelinKeys]:
    backend = Backend(PARAMS)
    keygen = seal.KeyGenerator(backend.context)
    public = seal.PublicKey()
    keygen.create_public_key(public)
    galois = seal.GaloisKeys()
    keygen.create_galois_keys(sorted({UNIT, UNIT * BABY, -UNIT * BABY, *[1 << i for i in range(12)]}), galois)
    relin = seal.RelinKeys()
    keygen.create_relin_keys(relin)
    return (
        backend,
        seal.Encryptor(backend.context, public),
        seal.Decryptor(backend.context, keygen.secret_key()),
        galois,
        relin,
    )


def encrypt(values: np.ndarray, level: int | None = None) -> seal.Ciphertext:
    backend, encryptor, _, _, _ = keyed_backend()
    level = backend.top if level is None else level
    padded = np.zeros(backend.slots)
    padded[: len(values)] = values
    ct = seal.Ciphertext()
    encryptor.encrypt(encode_vector(backend.encoder, padded, backend.parms_id(level), PARAMS.scale), ct)
    return ct


def decrypt(ct: seal.Ciphertext) -> np.ndarray:
    backend, _, decryptor, _, _ = keyed_backend()
    pt = seal.Plaintext()
    decryptor.decrypt(ct, pt)
    return np.asarray(backend.encoder.decode_double(pt))


def triplets_of(matrix: np.ndarray, out_base: int, in_base: int, slots: int) -> tuple[list, list, list]:
    """Triplets of y[out_base + i] += M[i, j] x[in_base + j], in global slot numbers."""
    rows, cols = np.nonzero(matrix)
    return list(out_base + rows), list(in_base + cols), list(matrix[rows, cols])


def test_dense_map_across_two_ciphertexts_matches_numpy():
    backend, _, _, galois, _ = keyed_backend()
    slots = backend.slots
    rng = np.random.default_rng(0)
    m = rng.normal(size=(48, 48)) * 0.2
    x = rng.normal(size=96)
    # inputs: x[0:48] in ct 0 at slots 0.., x[48:96] in ct 1 at slots 0..; outputs: ct 0 and ct 1
    outs, ins, ws = [], [], []
    for out_ct in (0, 1):
        for in_ct in (0, 1):
            o, i, w = triplets_of(m if out_ct == in_ct else m.T, out_ct * slots, in_ct * slots, slots)
            outs += o
            ins += i
            ws += w
    dmap = build_map(np.array(outs), np.array(ins), np.array(ws), 2, 2, slots, UNIT, BABY)
    emap = encode_map(backend, dmap, backend.top, PARAMS.scale, PARAMS.scale)
    result = apply_map(backend, emap, [encrypt(x[:48]), encrypt(x[48:])], galois)
    expected0 = m @ x[:48] + m.T @ x[48:]
    expected1 = m.T @ x[:48] + m @ x[48:]
    assert np.abs(decrypt(result[0])[:48] - expected0).max() < 1e-4
    assert np.abs(decrypt(result[1])[:48] - expected1).max() < 1e-4
    # one rescale: the output sits one level below its input, at exactly the requested scale
    assert backend.level(result[0]) == backend.top - 1 and result[0].scale == PARAMS.scale


def test_scales_are_exact_and_outputs_elsewhere_are_zero():
    backend, _, _, galois, _ = keyed_backend()
    slots = backend.slots
    x = np.linspace(-1, 1, 16)
    # y[100 + j] = 3 x[j]: a shift of 100 slots, output scale half the input's
    dmap = build_map(100 + np.arange(16), np.arange(16), np.full(16, 3.0), 1, 1, slots, UNIT, BABY)
    emap = encode_map(backend, dmap, backend.top, PARAMS.scale, PARAMS.scale / 2)
    (y,) = apply_map(backend, emap, [encrypt(x)], galois)
    assert y.scale == PARAMS.scale / 2
    got = decrypt(y)
    assert np.abs(got[100:116] - 3 * x).max() < 1e-4
    assert np.abs(np.delete(got, np.arange(100, 116))).max() < 1e-4


def test_rotation_count_is_what_the_map_reports():
    """DiagonalMap.rotations() is the cost model the bench and plan use: count the real evaluator calls."""
    backend, _, _, galois, _ = keyed_backend()
    slots = backend.slots
    rng = np.random.default_rng(1)
    m = rng.normal(size=(24, 24))
    o, i, w = triplets_of(m, 0, 0, slots)
    dmap = build_map(np.array(o), np.array(i), np.array(w), 1, 1, slots, UNIT, BABY)
    emap = encode_map(backend, dmap, backend.top, PARAMS.scale, PARAMS.scale)
    calls = 0
    original = backend.rotate

    def counting_rotate(ct, step, keys):
        nonlocal calls
        calls += 1
        return original(ct, step, keys)

    backend.rotate = counting_rotate  # type: ignore[method-assign]
    try:
        apply_map(backend, emap, [encrypt(rng.normal(size=24))], galois)
    finally:
        del backend.rotate
    assert calls == dmap.rotations() > 0
    assert dmap.steps() == {UNIT, UNIT * BABY, -UNIT * BABY}


def test_fewest_rotations_picks_the_cheapest_baby_step():
    slots = PARAMS.slots
    m = np.ones((32, 32))
    o, i, w = triplets_of(m, 0, 0, slots)
    best = build_map_fewest_rotations(np.array(o), np.array(i), np.array(w), 1, 1, slots, 1, (1, 2, 4, 8, 16))
    costs = [plan_map(np.array(o), np.array(i), 1, 1, slots, 1, b).rotations() for b in (1, 2, 4, 8, 16)]
    assert best.rotations() == min(costs) < max(costs)


def test_subset_map_computes_only_its_outputs():
    backend, _, _, galois, _ = keyed_backend()
    slots = backend.slots
    x = np.arange(8, dtype=float) / 8
    outs = np.concatenate([np.arange(8), slots + np.arange(8)])
    ins = np.concatenate([np.arange(8), np.arange(8)])
    ws = np.concatenate([np.full(8, 2.0), np.full(8, -1.0)])
    emap = encode_map(
        backend, build_map(outs, ins, ws, 1, 2, slots, UNIT, BABY), backend.top, PARAMS.scale, PARAMS.scale
    )
    second = subset_map(emap, outputs=[1])
    (y,) = apply_map(backend, second, [encrypt(x)], galois)
    assert np.abs(decrypt(y)[:8] + x).max() < 1e-4


def test_misuse_is_refused():
    backend, _, _, galois, _ = keyed_backend()
    slots = backend.slots
    with pytest.raises(ValueError, match="unit"):
        plan_map(np.array([0]), np.array([3]), 1, 1, slots, 2, BABY)
    emap = encode_map(
        backend,
        build_map(np.arange(4), np.arange(4), np.ones(4), 1, 1, slots, UNIT, BABY),
        backend.top,
        PARAMS.scale,
        PARAMS.scale,
    )
    with pytest.raises(ValueError, match="expects 1 input"):
        apply_map(backend, emap, [encrypt(np.ones(4)), encrypt(np.ones(4))], galois)
    low = encrypt(np.ones(4), level=backend.top - 1)
    with pytest.raises(ValueError, match="cannot be raised"):
        backend.mod_to(low, backend.top)


def test_backend_square_and_sum_slots():
    backend, _, _, galois, relin = keyed_backend()
    x = np.array([0.5, -1.5, 2.0])
    sq = backend.square(encrypt(x), relin)
    assert backend.level(sq) == backend.top - 1
    assert np.abs(decrypt(sq)[:3] - x * x).max() < 1e-4
    total = backend.sum_slots(encrypt(x), galois)
    assert np.abs(decrypt(total)[:5] - x.sum()).max() < 1e-3
    shifted = backend.add_plain(encrypt(x), np.full(backend.slots, 1.0))
    assert np.abs(decrypt(backend.sub(shifted, encrypt(x)))[:10] - 1.0).max() < 1e-4
