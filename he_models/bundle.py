"""What a client downloads before its first query: the bundle description and the files it names.

The client embeds locally, so it needs the tokenizer and the embedding tables (never the encoder's
weights). The tables are cut out of model.safetensors once per model hash into a cache directory
outside the model directory, which may be read-only (a container image) or a git checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from he_models import protocol_spec
from he_models.layout import PROTOCOL
from he_models.plan import HEPlan, PlanError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def labels(plan: HEPlan, model_dir: Path | None) -> list[str]:
    """The label names in id order: config.json's `id2label` (as Hugging Face writes it). A model whose
    config.json names no labels (written before id2label existed, or only HF's LABEL_i placeholders) keeps
    what it was served with: its labels.json, else negative/positive for two labels, else 0..n-1."""
    names = plan.config.labels
    unnamed = names == [f"LABEL_{i}" for i in range(len(names))]  # HF's placeholders: no names were given
    if model_dir is None or ("id2label" in _raw_config(model_dir) and not unnamed):
        return names
    if (model_dir / "labels.json").exists():
        names = [str(x) for x in json.loads((model_dir / "labels.json").read_text())]
        if len(names) != plan.config.num_labels:
            raise PlanError(
                f"{model_dir / 'labels.json'} names {len(names)} labels; the model has {plan.config.num_labels}"
            )
        return names
    if plan.config.num_labels == 2:
        return ["negative", "positive"]
    return [str(i) for i in range(plan.config.num_labels)]


def _raw_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return data if isinstance(data, dict) else {}


def client_bundle(plan: HEPlan, model_id: str, model_dir: Path | None) -> dict:
    """JSON-able description of the model for the client: parameters, layout sizes, labels, files."""
    cfg = plan.config
    names = labels(plan, model_dir)
    return {
        "model_id": model_id,
        "model_hash": plan.model_hash,
        "protocol": PROTOCOL,
        "ckks": plan.params.to_dict(),
        "galois_steps": plan.galois_steps,
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_tokens": cfg.max_position,
        "num_labels": cfg.num_labels,
        "labels": names,
        "id2label": {str(i): name for i, name in enumerate(names)},  # as in a Hugging Face config.json
        "rounds": plan.rounds,
        **protocol_spec.bundle_protocol_fields(
            len(plan.layers), list(plan.params.coeff_mod_bit_sizes), plan.params.scale_bits, cfg.task
        ),
        "files": sorted(client_bundle_files(plan, model_dir)),
    }


def client_bundle_files(plan: HEPlan, model_dir: Path | None) -> dict[str, Path]:
    """Tokenizer and embedding tables: what the client needs to embed locally."""
    if model_dir is None:
        return {}
    files = {name: model_dir / name for name in TOKENIZER_FILES if (model_dir / name).exists()}
    files["embeddings.safetensors"] = embedding_file(plan.model_hash, model_dir)
    return files


def cache_dir() -> Path:
    """$CIPHERBERT_CACHE_DIR, else $XDG_CACHE_HOME/cipherbert, else ~/.cache/cipherbert; then bundles/."""
    root = os.environ.get("CIPHERBERT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cipherbert"
    )
    return Path(root) / "bundles"


def embedding_file(model_hash: str, model_dir: Path) -> Path:
    """The embedding tables of this model as their own safetensors file, written once (atomically)."""
    from safetensors.numpy import load_file, save_file

    from he_models.client import EMBEDDING_TENSORS

    cache = cache_dir()
    target = cache / f"embeddings-{model_hash[:16]}.safetensors"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        state = load_file(str(model_dir / "model.safetensors"))
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        save_file({k: state[k] for k in EMBEDDING_TENSORS}, str(tmp))
        os.replace(tmp, target)
    return target
