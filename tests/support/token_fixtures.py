"""Tiny token-classification and named multi-class models for the engine, SDK and service tests.

Random weights (one layer, hidden 32, the teacher's uncased tokenizer), with the classifier scaled up so
the logits are of order one and differ from token to token: argmax margins then stay far above the
encrypted run's error (about 1e-4), and the entities a test compares are the model's, not noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
TINY = {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "max_position": 80, "num_layers": 1}


def _scale_classifier(directory: Path, scale: float, seed: int) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    w = state["classifier.weight"]
    state["classifier.weight"] = torch.randn(w.shape, generator=g) * scale
    state["classifier.bias"] = torch.randn(w.shape[0], generator=g) * 0.5
    save_file(state, str(path), metadata={"format": "pt"})


def make_token_model(directory: Path, name: str = "tiny-ner", seed: int = 5, labels: list[str] | None = None) -> Path:
    """A token-classification model directory (config.json with task and id2label)."""
    from tests.conftest import make_random_model_dir

    labels = labels or NER_LABELS
    make_random_model_dir(
        directory,
        seed=seed,
        **TINY,
        name=name,
        task="token-classification",
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
    )
    _scale_classifier(directory, 0.3, seed)
    return directory


def make_named_text_model(directory: Path, name: str = "tiny-trec", seed: int = 6) -> Path:
    """A six-class sentence model whose config.json names its labels (TREC's coarse classes)."""
    from tests.conftest import make_random_model_dir

    make_random_model_dir(
        directory, seed=seed, **TINY, name=name, num_labels=len(TREC_LABELS), id2label=dict(enumerate(TREC_LABELS))
    )
    _scale_classifier(directory, 30.0, seed)
    return directory


def make_legacy_labels_model(directory: Path, labels: list[str]) -> Path:
    """A model as written before id2label: config.json without label names, a labels.json beside it."""
    from tests.conftest import make_random_model_dir

    make_random_model_dir(directory, seed=7, **TINY, num_labels=len(labels))
    config = json.loads((directory / "config.json").read_text())
    for field in ("id2label", "label2id", "task"):
        config.pop(field, None)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "labels.json").write_text(json.dumps(labels))
    return directory


def plaintext_logits(directory: Path, emb: np.ndarray) -> np.ndarray:
    """The PyTorch model's logits on client-side embeddings: (labels,) or (n, labels)."""
    from he_models.model import HEFriendlyBert

    model = HEFriendlyBert.from_pretrained(directory)
    x = torch.tensor(emb, dtype=torch.float32)[None]
    with torch.no_grad():
        return model.forward_embedded(x, torch.ones(1, emb.shape[0])).logits[0].double().numpy()
