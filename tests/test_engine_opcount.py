"""Operation counts of a real inference agree with the kernels' own formulas (small engine, real TenSEAL)."""

from __future__ import annotations

import numpy as np

from he_models import opcount
from he_models.corrections import CORRECTIONS, correction_triplets
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
        assert ops["encodes"] == len(layout.entries)
        assert ops["rotations"] == layout.rotations()
