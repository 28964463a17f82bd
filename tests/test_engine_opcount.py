"""Operation counts of a real inference agree with the kernels' own formulas (small engine, real TenSEAL)."""

from __future__ import annotations

import numpy as np

from he_models import opcount
from he_models.ckks import load_ciphertext, save_bytes
from he_models.corrections import CORRECTIONS, correction_triplets
from he_models.kernels import apply_map, build_map, encode_map
from tests.support.engine_fixtures import embeddings, run_protocol, small_client, small_engine


def counted(n: int, inference_id: str):
    engine = small_engine()
    keys, ctx = small_client()
    opcount.install(engine.backend)
    with opcount.counting() as counter:
        logits, steps = run_protocol(engine, keys, ctx, embeddings(n), inference_id)
    return engine, counter, logits, steps


def test_rounds_partition_the_inference_and_counting_changes_nothing():
    engine, counter, logits, steps = counted(9, "count-rounds")
    keys, ctx = small_client()
    uncounted, _ = run_protocol(engine, keys, ctx, embeddings(9), "count-rounds")
    assert np.abs(logits - uncounted).max() < 1e-3  # same computation, other masks
    rounds = ["start"] + [f"r{s.round}:{s.kind}" for s in steps[:-1]]
    assert set(rounds) <= set(counter.sections)
    total = counter.summary()
    for kind in opcount.REPORTED:
        assert sum(counter.summary(name)[kind] for name in rounds) == total[kind]
    assert counter.critical() == total  # nothing precomputed off the path here
    assert total["rotations"] > 0 and total["encodes"] > 0


def test_correction_counts_match_their_diagonal_layouts():
    engine, counter, _, _ = counted(12, "count-corrections")
    geo = engine.geometry(12)
    corrections = engine.parts.corrections
    for name, spec in CORRECTIONS.items():
        shape = (geo.heads, geo.n, geo.n) if spec.mask == "a" else (geo.n, geo.hidden)
        out, inp, _ = correction_triplets(spec, geo, np.ones(shape))
        layout = corrections.layout(name, geo, out, inp)
        ops = counter.summary(name)  # one layer: each correction ran once
        assert ops["multiply_plain"] == len(layout.entries)
        assert 0 < ops["encodes"] <= len(layout.entries)  # equal diagonals share one encoding
        assert ops["rotations"] == layout.rotations()


def test_equal_diagonals_are_encoded_once_and_the_map_stays_exact():
    engine = small_engine()
    keys, ctx = small_client()
    be = engine.backend
    slots = be.slots
    rng = np.random.default_rng(5)
    diag = rng.normal(size=slots)
    # two input ciphertexts, each scaled slot-wise by the same vector into its own output: one plaintext
    idx = np.arange(slots)
    out = np.concatenate([idx, idx + slots])
    inp = np.concatenate([idx, idx + slots])
    weights = np.concatenate([diag, diag])
    dmap = build_map(out, inp, weights, 2, 2, slots, 1, 8)
    opcount.install(be)
    with opcount.counting() as counter:
        emap = encode_map(be, dmap, be.top, engine.plan.params.scale, engine.plan.params.scale)
    assert counter.counts["encodes"] == 1
    assert emap.plaintexts[0][0][3] is emap.plaintexts[1][0][3]
    x = rng.normal(size=(2, slots))
    cts = [load_ciphertext(be.context, c) for c in keys.encrypt(list(x))]
    got = keys.decrypt([save_bytes(c) for c in apply_map(be, emap, cts, ctx.galois)])
    assert np.abs(np.array(got) - x * diag).max() < 1e-4
