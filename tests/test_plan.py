"""The plan: folding a trained HE-friendly model into the engine's maps, calibrating the masks, refusing
models the engine cannot run. Plaintext only (float64): no ciphertexts here."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cipherbert.data import load_sst2_dev
from he_models.client import Embedder
from he_models.config import HEConfig
from he_models.model import HEFriendlyBert
from he_models.plan import (
    CALIBRATION_FILE,
    PlanError,
    calibration_texts,
    check_he_friendly,
    compile_plan,
    model_hash,
    simulate,
)
from tests.support.engine_fixtures import small_model_dir


@pytest.fixture(scope="module")
def plan():
    return compile_plan(small_model_dir())


def reference_logits(model_dir, emb: np.ndarray) -> np.ndarray:
    model = HEFriendlyBert.from_pretrained(model_dir)
    with torch.no_grad():
        x = torch.tensor(emb, dtype=torch.float32)[None]
        return model.forward_embedded(x, torch.ones(1, emb.shape[0])).logits[0].numpy()


@pytest.mark.parametrize("text", ["a", "folding is exact for every length of sentence the model can take"])
def test_folded_plan_computes_the_model(plan, text):
    emb = Embedder.from_model_dir(small_model_dir()).embed(text)
    assert np.abs(simulate(plan, emb).logits - reference_logits(small_model_dir(), emb)).max() < 1e-4


def test_gains_cancel_in_the_result(plan):
    """q_gain/a_gain only move precision between operands; undoing them leaves the logits unchanged."""
    emb = Embedder.from_model_dir(small_model_dir()).embed("gains are invisible in the output")
    before = simulate(plan, emb).logits
    assert any(layer.q_gain != 1.0 or layer.a_gain != 1.0 for layer in plan.layers)
    for layer in plan.layers:
        layer.wq, layer.bq = layer.wq / layer.q_gain, layer.bq / layer.q_gain
        saved = (layer.q_gain, layer.a_gain)
        layer.q_gain = layer.a_gain = 1.0
        try:
            after = simulate(plan, emb).logits
        finally:
            layer.wq, layer.bq = layer.wq * saved[0], layer.bq * saved[0]
            layer.q_gain, layer.a_gain = saved
    assert np.abs(after - before).max() < 1e-9


def test_ranges_cover_every_masked_tensor_with_margin(plan):
    names = {f"{i}.{t}" for i in range(len(plan.layers)) for t in "qkvashuyx"}
    assert set(plan.ranges) == names
    emb = Embedder.from_model_dir(small_model_dir()).embed(calibration_texts(small_model_dir())[0])
    seen = simulate(plan, emb).tensors
    for name, value in seen.items():  # a calibration sentence stays inside half of its range
        assert np.abs(value).max() <= plan.ranges[name] / 2


def test_default_calibration_is_the_shipped_public_sentences():
    shipped = calibration_texts(small_model_dir())
    assert shipped == [ex.text for ex in load_sst2_dev()[:64]]


def test_a_model_can_bring_its_own_calibration(tmp_path, plan):
    model_dir = shutil.copytree(small_model_dir(), tmp_path / "m")
    (model_dir / CALIBRATION_FILE).write_text("the only sentence\n\n")
    assert calibration_texts(model_dir) == ["the only sentence"]
    own = compile_plan(model_dir)
    assert own.ranges != plan.ranges
    (model_dir / CALIBRATION_FILE).write_text("\n  \n")
    with pytest.raises(PlanError, match="no calibration sentences"):
        compile_plan(model_dir)


def test_model_hash_follows_config_and_weights(tmp_path):
    model_dir = shutil.copytree(small_model_dir(), tmp_path / "m")
    before = model_hash(model_dir)
    (model_dir / "tokenizer_config.json").write_text("{}")  # not part of what the server computes
    assert model_hash(model_dir) == before
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["name"] = "renamed"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert model_hash(model_dir) != before


def test_models_the_engine_cannot_run_are_refused_with_every_reason():
    config = HEConfig(softmax="exact", gelu="exact", layernorm="exact")
    with pytest.raises(PlanError) as err:
        check_he_friendly(config)
    for part in ("softmax=exact", "gelu=exact", "layernorm=exact"):
        assert part in str(err.value)


def test_broken_model_directories_are_plan_errors(tmp_path):
    with pytest.raises(PlanError):
        compile_plan(tmp_path)  # no config.json
    model_dir = shutil.copytree(small_model_dir(), tmp_path / "m")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises((PlanError, FileNotFoundError)):
        compile_plan(model_dir)


def test_keys_and_rounds_fit_the_parameters(plan):
    steps = plan.galois_steps
    assert all(abs(s) < plan.params.slots for s in steps) and len(steps) == len(set(steps))
    assert max(seg["levels"] for seg in plan.schedule()) <= plan.params.levels
    assert plan.rounds == 4 * len(plan.layers)
    summary = plan.summary()
    assert summary["model_hash"] == model_hash(small_model_dir())
    assert len(summary["round_kinds"]) == plan.rounds
