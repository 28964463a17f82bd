"""The operation counter on real SEAL calls, the multiply_plain floor, and sentence packing."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from he_models.ckks import CKKSParams, encode_vector
from he_models.kernels import Backend
from he_models.opcount import Counter, CountingEncoder, CountingEvaluator, counting, multiply_plain_floor, section
from he_models.packing import pack, per_token, pooling, same_segment


def test_counter_counts_seal_calls_per_section():
    backend = Backend(CKKSParams())
    backend.evaluator = CountingEvaluator(backend.evaluator)
    backend.encoder = CountingEncoder(backend.encoder)
    keygen = seal.KeyGenerator(backend.context)
    encryptor = seal.Encryptor(backend.context, keygen.secret_key())
    pt = encode_vector(backend.encoder, np.ones(backend.slots), backend.parms_id(backend.top), 2.0**36)
    ct = seal.Ciphertext()
    encryptor.encrypt_symmetric(pt, ct)
    before = backend.add(ct, ct)  # nothing is counted outside counting()
    with counting() as counter:
        with section("square"):
            backend.add_plain(before, np.ones(backend.slots))
        out = seal.Ciphertext()
        backend.evaluator.multiply_plain(ct, pt, out)
    assert counter.counts["encodes"] == 1 and counter.counts["additions"] == 1
    assert counter.counts["multiply_plain"] == 1 and counter.counts["rotations"] == 0
    assert counter.sections["square"]["encodes"] == 1 and counter.sections["square"]["multiply_plain"] == 0
    merged = Counter.from_dict(counter.to_dict())
    merged.add(counter)
    assert merged.summary()["multiply_plain"] == 2


def test_multiply_plain_floor_counts_slot_filling_products():
    class Layer:
        wq = wk = wv = wo = np.zeros((128, 128))
        w1, w2 = np.zeros((128, 512)), np.zeros((512, 128))

    class Cfg:
        hidden_size, intermediate_size, num_heads, num_labels = 128, 512, 2, 2

    class Plan:
        config, layers, params = Cfg, [Layer, Layer], CKKSParams()

    linear = multiply_plain_floor(Plan, 32, corrections=False)
    assert linear == 2 * (4 * 32 * 128 * 128 + 2 * 32 * 128 * 512) // 4096 + 2
    assert multiply_plain_floor(Plan, 32) == linear + 2 * 4 * 32
    assert multiply_plain_floor(Plan, 64, corrections=False) == 2 * linear


@pytest.mark.parametrize("lengths", [[12, 10, 13, 8, 15, 14, 10, 13], [32, 1, 31, 2], [40, 5]])
def test_pack_fills_chunks_and_keeps_every_sentence(lengths):
    groups = pack(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or sum(lengths[i] for i in g) <= 32
    assert len(groups) <= len(lengths)


def test_segment_helpers():
    segs = (2, 3)
    same = same_segment(segs)
    assert same.shape == (5, 5) and same[0, 1] and not same[1, 2] and same[4, 2]
    assert per_token(segs, [1.0, 2.0]).tolist() == [1, 1, 2, 2, 2]
    assert np.allclose(pooling(segs, mean=True).sum(0), 1.0)
    assert pooling(segs, mean=False)[:, 1].tolist() == [0, 0, 1, 0, 0]
