"""Compile a trained HE-friendly model directory into an HE plan.

The plan holds what the encrypted engine needs and nothing it must derive at request time: the CKKS
parameter set (checked against the 128-bit bound), folded float64 weights (affine norms merged into the
neighbouring linear maps, the GELU quadratic rewritten as alpha*(u+beta)^2+gamma, attention scalings
merged into W_q), the value ranges that size the refresh masks (calibrated on shipped sentences), and
the Galois steps the kernels rotate by. `simulate` runs exactly the plan's arithmetic in numpy: the
reference the encrypted run is compared against.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from he_models.ckks import CKKSParams
from he_models.config import ConfigError, HEConfig
from he_models.layout import CHUNK

PLAN_FORMAT = "cipherbert-he-plan/1"
ROUNDS_PER_LAYER = 4  # scores, context, refresh after attention, refresh after the FFN
ROUND_KINDS = ("scores", "context", "refresh", "refresh")
# What the engine's head computes: one logit vector per text (pooled) or per token (no pooling).
ENGINE_TASKS = ("text-classification", "token-classification")
BABY_STEPS = 8  # baby-step count of the within-block kernels; giant steps are taken Horner-style with one key
GIANT_STEPS = (256, 512, 1024)  # giant rotations (both signs) available to block kernels


class PlanError(ValueError):
    """A model that the engine cannot run (not HE-friendly, missing files, ...)."""


@dataclass
class LayerPlan:
    wq: np.ndarray
    bq: np.ndarray
    wk: np.ndarray
    bk: np.ndarray
    wv: np.ndarray
    bv: np.ndarray
    wo: np.ndarray
    bo: np.ndarray
    in_scale: np.ndarray | None  # residual input X = in_scale * raw + in_shift (None: X = raw)
    in_shift: np.ndarray | None
    n1_scale: np.ndarray
    n1_shift: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    score_shift: np.ndarray  # per head: c / sqrt(z_h); divided by sqrt(n) at run time
    # Precision gains (compile_plan sets them): Q is carried multiplied by q_gain (folded into wq, bq) and
    # the attention weights by a_gain, so that each pair of masked operands has similar ranges. The mask
    # corrections multiply one operand's CKKS error by the other's mask; balancing the ranges keeps the
    # larger mask off the smaller value's error. Both cancel exactly in the result.
    q_gain: float = 1.0
    a_gain: float = 1.0

    def score_factor(self, n: int) -> float:
        """What multiplies (Q+rQ)(K+rK)^T: 1/sqrt(n), the attention scale's remainder and the gains."""
        return math.sqrt(self.a_gain) / (self.q_gain * math.sqrt(n))

    def shift(self, n: int) -> np.ndarray:
        return math.sqrt(self.a_gain) * self.score_shift / math.sqrt(n)


@dataclass
class HEPlan:
    params: CKKSParams
    config: HEConfig
    layers: list[LayerPlan]
    head_w: np.ndarray  # (hidden, labels): final norm scale folded in; text models divide by n for mean pooling
    head_b: np.ndarray
    ranges: dict[str, float] = field(default_factory=dict)  # max |value| per masked tensor
    mask_bits: int = 10
    model_hash: str = ""

    @staticmethod
    def block_babies(n_p: int) -> tuple[int, ...]:
        """Baby-step counts whose giant step (baby * n_p) has a Galois key."""
        return tuple(g // n_p for g in GIANT_STEPS if g % n_p == 0 and g // n_p >= 2)

    @property
    def rounds(self) -> int:
        return ROUNDS_PER_LAYER * len(self.layers)

    @property
    def galois_steps(self) -> list[int]:
        slots = self.params.slots
        steps = {1, BABY_STEPS, -BABY_STEPS, CHUNK}
        steps |= set(GIANT_STEPS) | {-g for g in GIANT_STEPS}
        steps |= {2**k for k in range(int(math.log2(slots)))}
        return sorted(s for s in steps if abs(s) < slots)

    def schedule(self) -> list[dict]:
        """Levels each segment between refreshes consumes; a segment must fit a fresh ciphertext.

        A segment starts at a fresh ciphertext (the client's input or a refresh reply) and ends at the
        next refresh. The rounds are placed where the level budget runs out; with three levels per
        fresh ciphertext this is four rounds per layer, and compile_plan refuses parameters that
        cannot hold a segment.
        """
        segments = [
            {
                "after": "input or round 4",
                "ops": ["QKV (1)", "C1 = Q rK^T (1)"],
                "levels": 2,
                "then": "round 1 scores (Q, K masked)",
            },
            {
                "after": "round 1",
                "ops": ["C2 on the reply (1, from level 2)", "2Quad square (1)"],
                "levels": 2,
                "then": "round 2 context (A, V masked)",
            },
            {
                "after": "round 2",
                "ops": ["C3 (1, from level 2)", "C4 on V (1)", "W_o (1)"],
                "levels": 3,
                "then": "round 3 refresh (h masked)",
            },
            {
                "after": "round 3",
                "ops": ["FFN1 (1)", "(u+beta)^2 (1)", "FFN2 (1)"],
                "levels": 3,
                "then": "round 4 refresh (y masked)",
            },
        ]
        return segments

    def summary(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "model": self.config.name,
            "model_hash": self.model_hash,
            "task": self.config.task,
            "ckks": self.params.to_dict(),
            "galois_steps": self.galois_steps,
            "rounds": self.rounds,
            "schedule_per_layer": self.schedule(),
            "round_kinds": list(ROUND_KINDS) * len(self.layers),
            "mask_bits": self.mask_bits,
            "ranges": self.ranges,
            "levels_per_round": f"fresh ciphertexts have {self.params.levels} levels; see README for the schedule",
        }


def model_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update((model_dir / name).read_bytes())
    return h.hexdigest()


def _linear(state: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    return state[f"{name}.weight"].astype(np.float64).T, state[f"{name}.bias"].astype(np.float64)


def _affine(state: dict, name: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    weight = state[f"{name}.weight"].astype(np.float64)
    bias = state[f"{name}.bias"].astype(np.float64)
    mean = state[f"{name}.running_mean"].astype(np.float64)
    var = state[f"{name}.running_var"].astype(np.float64)
    scale = weight / np.sqrt(var + eps)
    return scale, bias - mean * scale


def check_he_friendly(config: HEConfig) -> None:
    problems = []
    if config.softmax != "2quad_fixed":
        problems.append(f"softmax={config.softmax} (the engine runs 2quad_fixed)")
    if config.gelu not in ("quad", "fit"):
        problems.append(f"gelu={config.gelu} (needs a quadratic)")
    if config.layernorm != "affine":
        problems.append(f"layernorm={config.layernorm} (needs affine)")
    if config.pooler != "none":
        problems.append(f"pooler={config.pooler} (the engine supports pooler=none)")
    if problems:
        raise PlanError("model is not HE-friendly: " + "; ".join(problems))


def check_task(config: HEConfig, state: dict[str, np.ndarray]) -> None:
    """The head the engine will run: a task it implements, and a classifier of num_labels x hidden."""
    if config.task not in ENGINE_TASKS:
        raise PlanError(f"task {config.task!r}: the engine runs {list(ENGINE_TASKS)}")
    shape = tuple(state["classifier.weight"].shape) if "classifier.weight" in state else None
    if shape != (config.num_labels, config.hidden_size):
        raise PlanError(
            f"classifier weight has shape {shape}; a {config.task} head for {config.num_labels} labels "
            f"needs {(config.num_labels, config.hidden_size)}"
        )


def fold(config: HEConfig, state: dict[str, np.ndarray]) -> tuple[list[LayerPlan], np.ndarray, np.ndarray]:
    check_he_friendly(config)
    check_task(config, state)
    dh = config.head_dim
    c2, c1, c0 = config.gelu_coeffs[2], config.gelu_coeffs[1], config.gelu_coeffs[0]
    if abs(c2) < 1e-9:
        raise PlanError("gelu quadratic has no x^2 term")
    alpha, beta = c2, c1 / (2 * c2)
    gamma = c0 - c1 * c1 / (4 * c2)
    layers: list[LayerPlan] = []
    prev: tuple[np.ndarray, np.ndarray] | None = None  # folded norm2 of the previous layer
    for i in range(config.num_layers):
        p = f"layers.{i}"
        wq, bq = _linear(state, f"{p}.attn.q")
        wk, bk = _linear(state, f"{p}.attn.k")
        wv, bv = _linear(state, f"{p}.attn.v")
        wo, bo = _linear(state, f"{p}.attn.o")
        if prev is not None:
            s, t = prev
            wq, bq = s[:, None] * wq, t @ wq + bq
            wk, bk = s[:, None] * wk, t @ wk + bk
            wv, bv = s[:, None] * wv, t @ wv + bv
        z = np.exp(state[f"{p}.attn.log_z"].astype(np.float64))
        col_scale = np.repeat(1.0 / (math.sqrt(dh) * np.sqrt(z)), dh)
        wq, bq = wq * col_scale[None, :], bq * col_scale
        n1s, n1t = _affine(state, f"{p}.norm1", config.layernorm_eps)
        w1, b1 = _linear(state, f"{p}.fc1")
        w2, b2 = _linear(state, f"{p}.fc2")
        w1f, b1f = n1s[:, None] * w1, n1t @ w1 + b1 + beta
        w2f, b2f = alpha * w2, gamma * w2.sum(0) + b2
        layers.append(
            LayerPlan(
                wq=wq,
                bq=bq,
                wk=wk,
                bk=bk,
                wv=wv,
                bv=bv,
                wo=wo,
                bo=bo,
                in_scale=None if prev is None else prev[0],
                in_shift=None if prev is None else prev[1],
                n1_scale=n1s,
                n1_shift=n1t,
                w1=w1f,
                b1=b1f,
                w2=w2f,
                b2=b2f,
                score_shift=config.softmax_c / np.sqrt(z),
            )
        )
        prev = _affine(state, f"{p}.norm2", config.layernorm_eps)
    wc, bc = _linear(state, "classifier")
    assert prev is not None  # config.num_layers >= 1
    s, t = prev
    return layers, s[:, None] * wc, t @ wc + bc


@dataclass
class Trace:
    logits: np.ndarray
    tensors: dict[str, np.ndarray]


def simulate(plan: HEPlan, embeddings: np.ndarray) -> Trace:
    """The plan's arithmetic in float64 — what the encrypted engine computes, without noise or masks."""
    n = embeddings.shape[0]
    cfg = plan.config
    dh = cfg.head_dim
    raw = embeddings.astype(np.float64)
    tensors: dict[str, np.ndarray] = {}
    for li, L in enumerate(plan.layers):
        x_res = raw if L.in_scale is None else raw * L.in_scale + L.in_shift
        q, k, v = raw @ L.wq + L.bq, raw @ L.wk + L.bk, raw @ L.wv + L.bv
        qh = q.reshape(n, cfg.num_heads, dh).transpose(1, 0, 2)
        kh = k.reshape(n, cfg.num_heads, dh).transpose(1, 0, 2)
        vh = v.reshape(n, cfg.num_heads, dh).transpose(1, 0, 2)
        s = L.score_factor(n) * np.einsum("hkd,hid->hki", kh, qh)  # [h, k, i]
        a = (s + L.shift(n)[:, None, None]) ** 2  # a_gain times the attention weights
        ctx = np.einsum("hki,hke->hie", a, vh).transpose(1, 0, 2).reshape(n, cfg.hidden_size) / L.a_gain
        h_raw = x_res + ctx @ L.wo + L.bo
        h_res = h_raw * L.n1_scale + L.n1_shift
        u = h_raw @ L.w1 + L.b1
        y_raw = h_res + (u * u) @ L.w2 + L.b2
        tensors.update(
            {
                f"{li}.q": q,
                f"{li}.k": k,
                f"{li}.v": v,
                f"{li}.a": a,
                f"{li}.s": s,
                f"{li}.h": h_raw,
                f"{li}.u": u,
                f"{li}.y": y_raw,
                f"{li}.x": x_res,
            }
        )
        raw = y_raw
    if cfg.task == "token-classification":  # one logit vector per token, no pooling
        return Trace(logits=raw @ plan.head_w + plan.head_b, tensors=tensors)
    if cfg.pooling == "mean":
        pooled = raw.mean(0)
    else:
        pooled = raw[0]
    logits = pooled @ plan.head_w + plan.head_b
    return Trace(logits=logits, tensors=tensors)


def calibrate(plan: HEPlan, sentences: list[np.ndarray]) -> dict[str, float]:
    """Max |value| of each tensor the refresh protocol masks, over calibration sentences."""
    ranges: dict[str, float] = {}
    for emb in sentences:
        trace = simulate(plan, emb)
        for name, value in trace.tensors.items():
            ranges[name] = max(ranges.get(name, 0.0), float(np.abs(value).max()))
    return ranges


def choose_params(config: HEConfig) -> CKKSParams:
    """N=8192, chain [55, 36, 36, 36, 55] (218 bits, the 128-bit bound): three levels per segment.

    The special prime must be at least the largest data prime, or key switching (rotations,
    relinearization) adds errors of order 0.1; the 55-bit base prime leaves 19 bits above the 2^36
    scale for masked values at the last level.
    """
    return CKKSParams(8192, (55, 36, 36, 36, 55), 36)


def load_state(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights = model_dir / "model.safetensors"
    if not weights.exists():
        raise PlanError(f"{weights}: no such weights file")
    return load_file(str(weights))


def compile_plan(model_dir: str | Path, calibration: list[np.ndarray] | None = None, mask_bits: int = 10) -> HEPlan:
    model_dir = Path(model_dir)
    try:
        config = HEConfig.load(model_dir / "config.json")
    except ConfigError as exc:
        raise PlanError(str(exc)) from None
    state = load_state(model_dir)
    layers, head_w, head_b = fold(config, state)
    plan = HEPlan(
        params=choose_params(config),
        config=config,
        layers=layers,
        head_w=head_w,
        head_b=head_b,
        mask_bits=mask_bits,
        model_hash=model_hash(model_dir),
    )
    deepest = max(seg["levels"] for seg in plan.schedule())
    if deepest > plan.params.levels:
        raise PlanError(f"a segment needs {deepest} levels; the parameters give {plan.params.levels}")
    if calibration is None:
        calibration = default_calibration(model_dir)
    raw = calibrate(plan, calibration)
    for i, layer in enumerate(plan.layers):
        gain_q = float(np.clip(raw[f"{i}.k"] / max(raw[f"{i}.q"], 1e-9), 1 / 64, 1024))
        gain_a = float(np.clip(raw[f"{i}.v"] / max(raw[f"{i}.a"], 1e-9), 1 / 64, 1024))
        layer.wq, layer.bq = layer.wq * gain_q, layer.bq * gain_q
        layer.q_gain, layer.a_gain = gain_q, gain_a
    raw = calibrate(plan, calibration)
    # Margin over what calibration saw, so unusual sentences stay inside the masked range.
    plan.ranges = {k: 2.0 * v + 1e-3 for k, v in raw.items()}
    return plan


CALIBRATION_FILE = "calibration.txt"
DEFAULT_CALIBRATION = Path(__file__).with_name(CALIBRATION_FILE)


def calibration_texts(model_dir: Path, count: int = 64) -> list[str]:
    """The sentences whose activations size the masks: the model's own calibration.txt (one sentence a
    line, ideally like the text it will serve) or, without one, 64 public SST-2 dev sentences shipped
    with he_models. Only public text belongs here: the operator reads this file."""
    source = model_dir / CALIBRATION_FILE
    if not source.exists():
        source = DEFAULT_CALIBRATION
    texts = [line.strip() for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise PlanError(f"{source} holds no calibration sentences")
    return texts[:count]


def default_calibration(model_dir: Path, count: int = 64) -> list[np.ndarray]:
    """Embeddings of the calibration sentences, through the model's own tables."""
    from he_models.client import Embedder

    embedder = Embedder.from_model_dir(model_dir)
    return [embedder.embed(t) for t in calibration_texts(model_dir, count)]
