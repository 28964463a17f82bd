"""The distillation run's configuration: a JSON or TOML file, validated with messages naming the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from he_models.config import ConfigError, HEConfig

DEFAULTS: dict = {
    "name": "he-bert-tiny-rt",
    "seed": 13,
    "output_dir": "models/he-bert-tiny-rt",   # the shipped HE-friendly model
    "work_dir": "cache/he-bert-tiny-rt",      # checkpoints, cached teacher outputs (gitignored)
    "threads": 2,                            # torch.set_num_threads on the CPU
    "progress": True,
    "data": {
        # "sentiment": Rotten Tomatoes grouped 80/10/10 (cipherbert.data.sentiment_splits)
        # or give train/dev/test files (CSV/TSV/JSONL with text,label) instead.
        "task": "sentiment",
        "train": None,
        "dev": None,
        "test": None,
        "sst2_dev": True,          # also evaluate on data/sst2-dev.tsv
        "max_len": 128,
        "limit_train": None,       # keep only the first N training sentences (tests, smoke runs)
        "limit_eval": None,
    },
    "teacher": {
        "path": None,              # any local HF BERT-family dir; default: the shipped MiniLM-L6-H384
        "finetune": True,
        "epochs": 4,
        "lr": 8e-5,
        "batch_size": 32,
        "warmup": 0.1,
        "weight_decay": 0.01,
    },
    # HEConfig fields for the shipped student (he_models.config.HEConfig).
    "student": {"softmax": "2quad_fixed", "gelu": "quad", "layernorm": "affine", "pooler": "none",
                "pooling": "mean"},
    "distill": {
        "pca_init": True,          # word/position embeddings from a PCA of the teacher's tables
        "stage1_epochs": 4,        # hidden-state + attention-map distillation
        "stage2_epochs": 6,        # logits (temperature) + task loss
        "lr_stage1": 1e-3,
        "lr_stage2": 5e-4,
        "batch_size": 32,
        "batch_size_stage2": None,  # default: batch_size
        "temperature": 2.0,
        "alpha": 0.5,              # stage 2: alpha * KD + (1 - alpha) * cross entropy
        "hidden_weight": 1.0,
        "attn_weight": 1.0,
        "layer_map": None,         # student layer i -> teacher layer; default uniform (TinyBERT)
        "augment": 2,              # teacher-labelled augmented copies of each training sentence
        "softmax_score_bound": 0.0,  # >0: penalise attention scores outside [-bound, bound]
        "gelu_input_bound": 0.0,     # >0: penalise GELU/quad inputs outside [-bound, bound]
        "range_penalty_weight": 1.0,
    },
    # Extra students trained with the same distillation (same cached teacher outputs).
    "tiny_exact": {"enabled": True},
    # Each approximation alone (cheaper schedule); name -> HEConfig overrides.
    "ablation": {
        "enabled": True,
        "stage1_epochs": 2,
        "stage2_epochs": 3,
        "batch_size": 64,
        "augment_copies": 1,       # augmented copies used by ablation students (<= distill.augment)
        "variants": {
            "softmax_only": {"softmax": "2quad_fixed", "gelu": "exact", "layernorm": "exact"},
            "gelu_only": {"softmax": "exact", "gelu": "quad", "layernorm": "exact"},
            "layernorm_only": {"softmax": "exact", "gelu": "exact", "layernorm": "affine"},
        },
        # Which helps to measure (each one switched off, same cheap schedule, HE-friendly student).
        "helps": ["no_pca_init", "no_stage1", "no_augment", "no_kd"],
    },
}

SECTIONS = ("data", "teacher", "distill", "tiny_exact", "ablation")


def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown field {key!r}; known fields: {sorted(base)}")
        if isinstance(base[key], dict) and key != "student" and not (where == "config.ablation" and key == "variants"):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be an object, got {type(value).__name__}")
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def _check_number(cfg: dict, section: str, key: str, lo: float, hi: float | None = None,
                  integer: bool = False) -> None:
    value = cfg[section][key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"config field {section}.{key} must be a number, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"config field {section}.{key} must be {bound}, got {value!r}")


def validate(cfg: dict) -> dict:
    if not isinstance(cfg["seed"], int):
        raise ConfigError(f"config field seed must be an integer, got {cfg['seed']!r}")
    data = cfg["data"]
    if data["task"] not in ("sentiment", "files"):
        raise ConfigError(f"config field data.task is {data['task']!r}; choose 'sentiment' or 'files'")
    if data["task"] == "files":
        for key in ("train", "dev"):
            if not data[key]:
                raise ConfigError(f"config field data.{key} is required when data.task is 'files'")
    for key in ("train", "dev", "test"):
        if data[key] is not None and not isinstance(data[key], str):
            raise ConfigError(f"config field data.{key} must be a file path string, got {data[key]!r}")
    _check_number(cfg, "data", "max_len", 8, 512, integer=True)
    for key in ("limit_train", "limit_eval"):
        if data[key] is not None:
            _check_number(cfg, "data", key, 1, integer=True)
    _check_number(cfg, "teacher", "epochs", 0)
    _check_number(cfg, "teacher", "lr", 0, 1)
    _check_number(cfg, "teacher", "batch_size", 1, integer=True)
    d = cfg["distill"]
    for key in ("stage1_epochs", "stage2_epochs", "augment"):
        _check_number(cfg, "distill", key, 0, integer=key == "augment")
    for key in ("lr_stage1", "lr_stage2"):
        _check_number(cfg, "distill", key, 0, 1)
    _check_number(cfg, "distill", "batch_size", 1, integer=True)
    if d["batch_size_stage2"] is not None:
        _check_number(cfg, "distill", "batch_size_stage2", 1, integer=True)
    for key in ("stage1_epochs", "stage2_epochs", "batch_size", "augment_copies"):
        _check_number(cfg, "ablation", key, 0 if key != "batch_size" else 1, integer=True)
    _check_number(cfg, "distill", "temperature", 0.1, 100)
    _check_number(cfg, "distill", "alpha", 0, 1)
    if d["layer_map"] is not None and (not isinstance(d["layer_map"], list)
                                       or not all(isinstance(x, int) for x in d["layer_map"])):
        raise ConfigError("config field distill.layer_map must be a list of teacher layer numbers")
    try:
        HEConfig(**cfg["student"])
    except TypeError as exc:
        raise ConfigError(f"config field student: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config field student: {exc}") from None
    for name, over in cfg["ablation"]["variants"].items():
        try:
            HEConfig(**{**cfg["student"], **over})
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"config field ablation.variants.{name}: {exc}") from None
    known_helps = {"no_pca_init", "no_stage1", "no_augment", "no_kd"}
    bad = [h for h in cfg["ablation"]["helps"] if h not in known_helps]
    if bad:
        raise ConfigError(f"config field ablation.helps: unknown {bad}; choose from {sorted(known_helps)}")
    return cfg


def load_config(path: str | Path) -> dict:
    """Read and validate a JSON or TOML run configuration; every problem names the file and field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except Exception as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected an object at the top level")
    try:
        cfg = _merge(DEFAULTS, raw, "config")
        cfg = validate(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent
    cfg["_config_path"] = str(path)
    cfg["_config_dir"] = str(base)
    return cfg


def from_dict(raw: dict) -> dict:
    return validate(_merge(DEFAULTS, raw, "config"))
