"""The HE-friendly model's configuration: the approximation choices and the ranges recorded in training.

This file is the contract between training (distill/, dp_training/) and the encrypted engine: the engine
reads config.json, never the training code, so every choice that changes the arithmetic lives here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

SOFTMAX_CHOICES = ("exact", "2quad", "2quad_fixed")
GELU_CHOICES = ("exact", "quad", "fit")
LAYERNORM_CHOICES = ("exact", "affine")
POOLER_CHOICES = ("none", "tanh", "poly")
POOLING_CHOICES = ("mean", "cls")

# MPCFormer's Quad GELU: 0.125 x^2 + 0.25 x + 0.5 (coefficients lowest degree first).
QUAD_GELU_COEFFS = (0.5, 0.25, 0.125)


class ConfigError(ValueError):
    """A model configuration that cannot be built; the message names the field."""


@dataclass
class HEConfig:
    vocab_size: int = 30522
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_position: int = 128
    num_labels: int = 2
    dropout: float = 0.1
    pad_token_id: int = 0
    # Approximations (see README "HE-friendly model").
    softmax: str = "2quad_fixed"  # exact | 2quad: (s+c)^2 / sum_k (s+c)^2 | 2quad_fixed: (s+c)^2 / (n * z_head)
    softmax_c: float = 5.0
    gelu: str = "quad"  # exact | quad (MPCFormer) | fit (least squares quadratic on the recorded range)
    gelu_coeffs: list[float] = field(default_factory=lambda: list(QUAD_GELU_COEFFS))
    layernorm: str = "affine"  # exact | affine (fixed statistics, folds into neighbouring linear maps)
    layernorm_eps: float = 1e-5
    pooler: str = "none"  # none | tanh | poly (odd cubic fit of tanh on its recorded range)
    pooler_coeffs: list[float] = field(default_factory=lambda: [0.0, 1.0, 0.0, -1.0 / 3.0])
    pooling: str = "mean"  # mean over valid tokens | cls (first token)
    # Input range of every polynomial, recorded during training: name -> [min, max].
    ranges: dict[str, list[float]] = field(default_factory=dict)
    name: str = "he-bert-tiny"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        checks = [
            ("softmax", self.softmax, SOFTMAX_CHOICES),
            ("gelu", self.gelu, GELU_CHOICES),
            ("layernorm", self.layernorm, LAYERNORM_CHOICES),
            ("pooler", self.pooler, POOLER_CHOICES),
            ("pooling", self.pooling, POOLING_CHOICES),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"config field {name!r} is {value!r}; choose one of {list(allowed)}")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_position",
            "num_labels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if len(self.gelu_coeffs) != 3:
            raise ConfigError("gelu_coeffs must hold 3 coefficients (c0, c1, c2): a quadratic")
        if len(self.pooler_coeffs) != 4:
            raise ConfigError("pooler_coeffs must hold 4 coefficients (c0..c3): a cubic")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")

    def is_he_friendly(self) -> bool:
        """True when every operation after the (client-side) embedding is polynomial or affine."""
        return (
            self.softmax == "2quad_fixed"
            and self.gelu in ("quad", "fit")
            and self.layernorm == "affine"
            and self.pooler in ("none", "poly")
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"format", "architecture", "depth"})
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        payload = {"format": "cipherbert-he-model/1", **self.to_dict(), "depth": multiplicative_depth(self)}
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> HEConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def multiplicative_depth(config: HEConfig) -> dict[str, int]:
    """Ciphertext levels one encoder layer consumes when evaluated purely under HE (no refresh).

    Counted as rescales: each plaintext-weight matmul is 1, each ciphertext-ciphertext product is 1,
    a quadratic is 1 (a(x+b)^2 + c with a folded into the next weights). Affine norms fold into
    neighbouring linear maps (0), except where their output also feeds a residual (counted in the
    engine's plan, not here).
    """
    qkv, scores, softmax_poly, context, out_proj = 1, 1, 1, 1, 1
    ffn1, gelu, ffn2 = 1, 1, 1
    if config.softmax == "2quad":
        softmax_poly += 1  # reciprocal of the row sum (blinded client step) and the multiply by it
    attention = qkv + scores + softmax_poly + context + out_proj
    ffn = ffn1 + gelu + ffn2
    return {"attention": attention, "ffn": ffn, "layer": attention + ffn}
