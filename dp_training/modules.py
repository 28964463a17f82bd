"""A DP-trainable twin of HEFriendlyBert, with Opacus grad samplers for its custom layers.

Opacus computes per-sample gradients with a grad sampler per *leaf module that owns parameters*.
HEFriendlyBert has three kinds of such modules:

* nn.Linear (q, k, v, o, fc1, fc2, pooler, classifier): Opacus' own sampler.
* AffineNorm (weight, bias, plus running statistics): in training mode it normalises with the
  statistics of the *batch*, so one sample's output (hence gradient) depends on every other sample
  in the batch; the "per-sample gradient" is then not a per-sample quantity and DP-SGD's clipping
  bound says nothing about a single record. We therefore train with the statistics frozen (the
  base model's running mean/var, i.e. eval-mode normalisation) -- `FrozenAffineNorm` below. That is
  exactly the affine map the encrypted engine evaluates, so DP training sees the inference arithmetic.
  The running statistics are never updated from private data (they would be a non-private release).
* SelfAttention owns `log_z` directly (the 2quad_fixed normaliser) next to its Linear children.
  Opacus cannot hook a parent module for one parameter, so `log_z` moves into a leaf `HeadScale`
  (x -> x * exp(-log_z) per head) with its own sampler; `DPSelfAttention` overrides only
  SelfAttention's `normalise_fixed` hook to use it.

The quadratic GELU (`Activation`) has no trainable parameters (its coefficients are a buffer),
so it needs no sampler: gradients flow through it into fc1, which the tests check.
The embedding block (word table, position table and its LayerNorm) is frozen: it is computed by the
client from the published client bundle, and its 3.9M-parameter word table would dominate the noise
(DP noise is added to every trained coordinate) while rarely-seen rows barely get signal.

`make_dp_twin(model)` performs the surgery in place on a *copy*; `export_state_dict(twin)` maps the
trained parameters back to HEFriendlyBert's parameter names so `HEFriendlyBert.load_state_dict`
(and hence from_pretrained / the engine) sees the original format.
"""

from __future__ import annotations

import copy

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from he_models.model import AffineNorm, HEFriendlyBert, SelfAttention


class FrozenAffineNorm(nn.Module):
    """AffineNorm with fixed statistics in every mode: y = (x - mean) * inv_std * weight + bias.

    The statistics are plain tensors (not buffers): Opacus refuses trainable modules with buffers,
    precisely because buffers like BatchNorm's are updated from the batch. These never are.
    """

    def __init__(self, norm: AffineNorm) -> None:
        super().__init__()
        self.weight = norm.weight
        self.bias = norm.bias
        self.mean = norm.running_mean.detach().clone()
        self.inv_std = torch.rsqrt(norm.running_var.detach().clone() + norm.eps)
        self.eps = norm.eps

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.normalised(x) * self.weight + self.bias


class HeadScale(nn.Module):
    """Multiplies (batch, heads, n, n) attention weights by exp(-log_z[head])."""

    def __init__(self, log_z: nn.Parameter) -> None:
        super().__init__()
        self.log_z = log_z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(-self.log_z)[None, :, None, None]


class DPSelfAttention(SelfAttention):
    """SelfAttention whose log_z lives in a HeadScale child; same arithmetic as the original.

    Only the normaliser hook is overridden: the rest of forward is SelfAttention's own.
    """

    head_scale: HeadScale

    def normalise_fixed(self, weights: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        return self.head_scale(weights / n_valid)


# --- grad samplers (per-sample gradients; batch first; backprops already scaled by Opacus) ---

def _sum_to_batch_and_last(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., H) -> (B, H) by summing the middle dimensions."""
    return t.sum(dim=tuple(range(1, t.dim() - 1))) if t.dim() > 2 else t


@register_grad_sampler(FrozenAffineNorm)
def compute_frozen_affine_norm_grad_sample(layer: FrozenAffineNorm, activations, backprops):
    x = activations[0]
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = _sum_to_batch_and_last(layer.normalised(x) * backprops)
    if layer.bias.requires_grad:
        out[layer.bias] = _sum_to_batch_and_last(backprops)
    return out


@register_grad_sampler(HeadScale)
def compute_head_scale_grad_sample(layer: HeadScale, activations, backprops):
    x = activations[0]  # (B, heads, n, n)
    if not layer.log_z.requires_grad:
        return {}
    y = x * torch.exp(-layer.log_z)[None, :, None, None]
    # d y / d log_z[h] = -y[:, h]
    return {layer.log_z: -(y * backprops).sum(dim=(2, 3))}


# --- surgery ---

FROZEN_PREFIXES = ("embeddings.",)


def make_dp_twin(model: HEFriendlyBert, train_log_z: bool | None = None) -> HEFriendlyBert:
    """A deep copy of `model` that Opacus can wrap: frozen norms, log_z in HeadScale, embeddings frozen.

    Range recorders are put in eval mode (they record only when their own `training` flag is set)
    so nothing is recorded from private data; see `record_public_ranges`.
    """
    twin = copy.deepcopy(model)
    twin.train()
    for layer in twin.layers:
        attn = layer.attn
        log_z = attn._parameters.pop("log_z")
        attn.__class__ = DPSelfAttention
        attn.head_scale = HeadScale(log_z)
        use_log_z = attn.kind == "2quad_fixed" if train_log_z is None else train_log_z
        log_z.requires_grad_(bool(use_log_z))
        for name in ("norm1", "norm2"):
            norm = getattr(layer, name)
            if isinstance(norm, AffineNorm):
                setattr(layer, name, FrozenAffineNorm(norm))
    for name, p in twin.named_parameters():
        if name.startswith(FROZEN_PREFIXES):
            p.requires_grad_(False)
    set_recorders_training(twin, False)
    return twin


def set_recorders_training(model: nn.Module, mode: bool) -> None:
    from he_models.model import RangeRecorder

    for m in model.modules():
        if isinstance(m, RangeRecorder):
            m.training = mode


def twin_to_model_name(name: str) -> str:
    return name.replace(".head_scale.log_z", ".log_z")


def export_state_dict(twin: nn.Module, base_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HEFriendlyBert state dict: the base's buffers (running stats, recorders) + the twin's parameters."""
    twin = getattr(twin, "_module", twin)  # unwrap a GradSampleModule
    state = {k: v.detach().clone() for k, v in base_state.items()}
    for name, p in twin.named_parameters():
        key = twin_to_model_name(name)
        if key not in state:
            raise KeyError(f"twin parameter {name} has no counterpart {key} in HEFriendlyBert")
        state[key] = p.detach().clone()
    return state


def trainable_summary(twin: nn.Module) -> dict:
    trainable = [(n, p.numel()) for n, p in twin.named_parameters() if p.requires_grad]
    frozen = [(n, p.numel()) for n, p in twin.named_parameters() if not p.requires_grad]
    return {
        "trainable_parameters": sum(n for _, n in trainable),
        "frozen_parameters": sum(n for _, n in frozen),
        "frozen": sorted({twin_to_model_name(n) for n, _ in frozen}),
    }
