"""Mask-correction kernels (he_models.corrections): each table row is the product it claims to be."""

from __future__ import annotations

import numpy as np
import pytest

from he_models.ckks import load_ciphertext, save_bytes
from he_models.corrections import CORRECTIONS, CorrectionKernels, correction_triplets, correction_weights
from he_models.kernels import apply_map
from he_models.layout import Geometry
from tests.support.engine_fixtures import SMALL, small_client, small_engine

HIDDEN, HEADS = SMALL["hidden_size"], SMALL["num_heads"]
SLOTS = 4096


def _geo(n: int) -> Geometry:
    return Geometry.for_tokens(n, HIDDEN, HEADS, SMALL["intermediate_size"], SLOTS)


def _case(name: str, geo: Geometry, rng: np.random.Generator):
    """(input slot vectors, weights, expected output slot vectors) for one correction."""
    n, dh = geo.n, geo.head_dim
    x_fm, w_fm = rng.normal(size=(n, HIDDEN)), rng.normal(size=(n, HIDDEN))
    x_sl, w_sl = rng.normal(size=(HEADS, n, n)), rng.normal(size=(HEADS, n, n))
    per_head = lambda m: m.reshape(n, HEADS, dh).transpose(1, 0, 2)  # noqa: E731  (h, token, d)
    if name == "c1":  # sigma Q rK^T: out[h, k, i] = sum_d Q[i, f] W[k, f]
        return geo.pack_fm(x_fm), w_fm, geo.pack_sl(np.einsum("hid,hkd->hki", per_head(x_fm), per_head(w_fm)))
    if name == "c2":  # rQ (K+rK)^T from token-major K: out[h, k, i] = sum_d K[k, f] W[i, f]
        return geo.pack_tm(x_fm), w_fm, geo.pack_sl(np.einsum("hkd,hid->hki", per_head(x_fm), per_head(w_fm)))
    if name == "c3":  # (A+rA) rV: out[i, f] = sum_k A[h, k, i] W[k, f]
        out = np.einsum("hki,hkd->ihd", x_sl, per_head(w_fm)).reshape(n, HIDDEN)
        return geo.pack_sl(x_sl), w_fm, geo.pack_fm(out)
    out = np.einsum("hki,hkd->ihd", w_sl, per_head(x_fm)).reshape(n, HIDDEN)  # c4: rA V
    return geo.pack_fm(x_fm), w_sl, geo.pack_fm(out)


def _dense_apply(out_slots, in_slots, weights, x: list[np.ndarray], n_out: int) -> list[np.ndarray]:
    flat_in = np.concatenate(x)
    flat_out = np.zeros(n_out * SLOTS)
    np.add.at(flat_out, out_slots.ravel(), weights.ravel() * flat_in[in_slots.ravel()])
    return [flat_out[c * SLOTS : (c + 1) * SLOTS] for c in range(n_out)]


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
@pytest.mark.parametrize("n", [1, 5, 40])
def test_triplets_compute_the_documented_product(name, n):
    geo = _geo(n)
    x, w, expected = _case(name, geo, np.random.default_rng(n))
    spec = CORRECTIONS[name]
    triplets = correction_triplets(spec, geo, w)
    got = _dense_apply(*triplets, x, spec.n_cts(spec.out, geo))
    assert np.abs(np.concatenate(got) - np.concatenate(expected)).max() < 1e-9


def test_weights_come_from_the_rounds_masks():
    engine = small_engine()
    geo = engine.geometry(5)
    layer = engine.plan.layers[0]
    for name, spec in CORRECTIONS.items():
        w = correction_weights(spec, engine.plan, engine.masks, geo, 0, "inf", 1)
        n_cts = geo.sl_cts if spec.mask == "a" else geo.fm_cts(geo.hidden)
        raw = engine.masks.draw("inf", 1, f"0.{spec.mask}", n_cts)
        mask = geo.unpack_sl(raw) if spec.mask == "a" else geo.unpack_fm(raw, geo.hidden)
        factor = layer.score_factor(geo.n) if spec.by_score_factor else 1.0 / layer.a_gain
        assert np.allclose(w, factor * mask), name


def test_layouts_are_planned_once_per_geometry():
    engine = small_engine()
    kernels = CorrectionKernels(engine.plan, engine.backend)
    geo = engine.geometry(5)
    rng = np.random.default_rng(0)
    first = kernels.build("c4", geo, rng.normal(size=(HEADS, 5, 5)))
    second = kernels.build("c4", geo, rng.normal(size=(HEADS, 5, 5)))
    assert kernels.layout("c4", geo, None, None) is kernels.layout("c4", geo, None, None)  # cached: slots unused
    assert first.dmap.rotations() == second.dmap.rotations()
    assert kernels.layout(
        "c4",
        engine.geometry(6),
        *correction_triplets(CORRECTIONS["c4"], engine.geometry(6), np.zeros((HEADS, 6, 6)))[:2],
    ) is not kernels.layout("c4", geo, None, None)


@pytest.mark.parametrize("name", sorted(CORRECTIONS))
def test_encrypted_corrections_match_numpy(name):
    """The encoded map on real level-2 ciphertexts (as in the rounds) gives the product to CKKS precision."""
    engine = small_engine()
    keys, ctx = small_client()
    be = engine.backend
    geo = engine.geometry(7)
    x, w, expected = _case(name, geo, np.random.default_rng(7))
    cts = [be.mod_to(load_ciphertext(be.context, b), 2) for b in keys.encrypt(x)]
    out = apply_map(be, CorrectionKernels(engine.plan, be).build(name, geo, w), cts, ctx.galois)
    got = keys.decrypt([save_bytes(c) for c in out])
    assert np.abs(np.concatenate(got) - np.concatenate(expected)).max() < 1e-3
