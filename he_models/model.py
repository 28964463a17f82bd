"""HE-friendly BERT-Tiny in PyTorch (THE-X / MPCFormer style).

Every operation after the embedding is either exact (for the `tiny_exact` baseline) or a low-degree
polynomial / affine map chosen in `HEConfig`. Each polynomial records the range of its inputs during
training; the engine reads those ranges from config.json to size masks and check the approximation.
The embedding (token + position lookup and its LayerNorm) runs on the client in plaintext, so it stays
exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from he_models.config import ConfigError, HEConfig


class RangeRecorder(nn.Module):
    """Tracks min/max of the values passing through (valid positions only) while training."""

    lo: torch.Tensor  # buffers: typed for mypy (register_buffer is untyped)
    hi: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                values = x[valid] if valid is not None else x
                if values.numel():
                    self.lo.copy_(torch.minimum(self.lo, values.min().float()))
                    self.hi.copy_(torch.maximum(self.hi, values.max().float()))
        return x

    def reset(self) -> None:
        self.lo.fill_(float("inf"))
        self.hi.fill_(float("-inf"))

    def as_list(self) -> list[float] | None:
        if not torch.isfinite(self.lo) or not torch.isfinite(self.hi):
            return None
        return [float(self.lo), float(self.hi)]


class AffineNorm(nn.Module):
    """LayerNorm replaced by a per-feature affine map with fixed statistics.

    Trains like BatchNorm over the valid tokens of a batch (running statistics kept); at inference,
    (x - mean) / std * gamma + beta is one scale and one shift per feature, which folds into the
    neighbouring linear layers under HE.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, hidden: int, eps: float = 1e-5, momentum: float = 0.05) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.register_buffer("running_mean", torch.zeros(hidden))
        self.register_buffer("running_var", torch.ones(hidden))
        self.eps = eps
        self.momentum = momentum

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            flat = x[valid] if valid is not None else x.reshape(-1, x.shape[-1])
            mean = flat.mean(0)
            var = flat.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) such that forward(x) == x * scale + shift at inference."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale


def make_norm(config: HEConfig) -> nn.Module:
    if config.layernorm == "exact":
        return nn.LayerNorm(config.hidden_size, eps=1e-12)
    return AffineNorm(config.hidden_size, eps=config.layernorm_eps)


def apply_norm(norm: nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return norm(x, valid) if isinstance(norm, AffineNorm) else norm(x)


def fit_gelu(lo: float, hi: float, degree: int = 2, samples: torch.Tensor | None = None) -> list[float]:
    """Least-squares polynomial fit of exact GELU on [lo, hi], coefficients lowest degree first.

    With `samples` (observed inputs), the fit is weighted by their empirical distribution (clipped to
    the range), which is what matters for accuracy; otherwise uniform on the interval.
    """
    if not hi > lo:
        raise ValueError(f"empty range [{lo}, {hi}]")
    if samples is not None and samples.numel() > 16:
        x = samples.detach().double().flatten().clamp(lo, hi)
    else:
        x = torch.linspace(lo, hi, 2001, dtype=torch.float64)
    y = F.gelu(x)
    vander = torch.stack([x**k for k in range(degree + 1)], 1)
    coeffs = torch.linalg.lstsq(vander, y[:, None]).solution[:, 0]
    return [float(c) for c in coeffs]


def poly(x: torch.Tensor, coeffs: list[float] | tuple[float, ...]) -> torch.Tensor:
    """Horner evaluation, coefficients lowest degree first."""
    out = torch.zeros_like(x) + coeffs[-1]
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


class Activation(nn.Module):
    """GELU or its quadratic replacement."""

    coeffs: torch.Tensor

    def __init__(self, config: HEConfig) -> None:
        super().__init__()
        self.kind = config.gelu
        self.register_buffer("coeffs", torch.tensor(config.gelu_coeffs, dtype=torch.float32))
        self.recorder = RangeRecorder()

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.recorder(x, valid)
        # Kept (training only) so a trainer can penalise inputs outside a bound; no effect on outputs.
        self._last_input = x.masked_fill(~valid[..., None], 0.0) if self.training else None
        if self.kind == "exact":
            return F.gelu(x)
        return poly(x, self.coeffs.tolist())


class SelfAttention(nn.Module):
    def __init__(self, config: HEConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.kind = config.softmax
        self.c = config.softmax_c
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(h, h)
        self.v = nn.Linear(h, h)
        self.o = nn.Linear(h, h)
        self.dropout = nn.Dropout(config.dropout)
        # Per-head normaliser of 2quad_fixed: A = (s + c)^2 / (n * z), z = exp(log_z) > 0.
        self.log_z = nn.Parameter(torch.full((config.num_heads,), math.log(config.softmax_c**2)))
        self.recorder = RangeRecorder()

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def normalise_fixed(self, weights: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """2quad_fixed's normaliser: weights / (n * exp(log_z[head])).

        A method of its own so a subclass can compute it elsewhere (the DP twin moves log_z into a leaf
        module that Opacus can compute per-sample gradients for) without copying forward.
        """
        return weights / (n_valid * torch.exp(self.log_z)[None, :, None, None])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (b, heads, n, n)
        key_valid = mask[:, None, None, :].bool()
        pair_valid = key_valid & mask[:, None, :, None].bool()
        self.recorder(scores, pair_valid.expand_as(scores))
        # Kept (training only) so a trainer can penalise scores outside a bound; no effect on outputs.
        self._last_scores = scores.masked_fill(~pair_valid, 0.0) if self.training else None
        if self.kind == "exact":
            probs = torch.softmax(scores.masked_fill(~key_valid, torch.finfo(scores.dtype).min), dim=-1)
        else:
            weights = (scores + self.c) ** 2 * key_valid
            if self.kind == "2quad":
                probs = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
            else:
                n_valid = mask.sum(-1).clamp_min(1).to(scores.dtype)[:, None, None, None]
                probs = self.normalise_fixed(weights, n_valid)
        context = self.dropout(probs) @ v
        b, _, n, _ = context.shape
        context = context.transpose(1, 2).reshape(b, n, -1)
        return self.o(context), probs


class EncoderLayer(nn.Module):
    def __init__(self, config: HEConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.norm1 = make_norm(config)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = Activation(config)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm2 = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = mask.bool()
        attn_out, probs = self.attn(x, mask)
        h = apply_norm(self.norm1, x + self.dropout(attn_out), valid)
        f = self.fc2(self.act(self.fc1(h), valid))
        y = apply_norm(self.norm2, h + self.dropout(f), valid)
        return y, probs


class Embeddings(nn.Module):
    """Token + position embeddings and an exact LayerNorm; computed by the client in plaintext."""

    def __init__(self, config: HEConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.norm(self.word(input_ids) + self.position(positions)[None]))


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]  # embedding output, then each layer's output
    attentions: tuple[torch.Tensor, ...]  # (batch, heads, n, n) per layer


class HEFriendlyBert(nn.Module):
    def __init__(self, config: HEConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if config.pooler != "none" else None
        self.pooler_recorder = RangeRecorder()
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ModelOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds max_position {self.config.max_position}")
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        x = self.embeddings(input_ids)
        return self.forward_embedded(x, attention_mask)

    def forward_embedded(self, x: torch.Tensor, attention_mask: torch.Tensor) -> ModelOutput:
        """Everything the server computes: from client-side embeddings to logits."""
        hidden, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, attention_mask)
            hidden.append(x)
            attentions.append(probs)
        logits = self.head(x, attention_mask)
        return ModelOutput(logits=logits, hidden_states=tuple(hidden), attentions=tuple(attentions))

    def head(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, labels) logits of the pooled text, or (batch, n, labels) per token for token-classification."""
        if self.config.task == "token-classification":
            return self.classifier(x)
        mask = attention_mask.to(x.dtype)
        if self.config.pooling == "mean":
            pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        else:
            pooled = x[:, 0]
        if self.pooler is not None:
            z = self.pooler_recorder(self.pooler(pooled))
            pooled = torch.tanh(z) if self.config.pooler == "tanh" else poly(z, self.config.pooler_coeffs)
        return self.classifier(pooled)

    def recorded_ranges(self) -> dict[str, list[float]]:
        ranges: dict[str, list[float]] = {}
        for i, layer in enumerate(self.layers):
            block = cast(EncoderLayer, layer)
            for name, rec in (
                ("softmax", block.attn.recorder),
                ("gelu", block.act.recorder),
            ):
                value = rec.as_list()
                if value is not None:
                    ranges[f"layers.{i}.{name}"] = value
        if self.pooler is not None and (value := self.pooler_recorder.as_list()) is not None:
            ranges["pooler"] = value
        return ranges

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.ranges = {**self.config.ranges, **self.recorded_ranges()}
        self.config.save(directory / "config.json")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HEFriendlyBert:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = HEConfig.load(directory / "config.json")
        weights = directory / "model.safetensors"
        if not weights.exists():
            raise ConfigError(f"{weights}: no such weights file")
        model = cls(config)
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{weights}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        model.eval()
        return model
