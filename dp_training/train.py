"""DP fine-tuning of an HE-friendly student (Opacus DP-SGD), and the non-DP baseline it is compared to.

`finetune(FinetuneConfig)` reads labelled text through cipherbert.data, splits it (identical texts in
one split), trains a DP twin of the model (see dp_training/modules.py for what is frozen and why),
and writes a model directory in the format of models/<name>/ plus privacy_report.json.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from cipherbert.data import Example, fingerprint, load_examples, load_sst2_dev, stratified_split
from dp_training.labels import data_labels
from dp_training.modules import export_state_dict, make_dp_twin, set_recorders_training, trainable_summary
from he_models.model import HEFriendlyBert

REPORT_NAME = "privacy_report.json"
MODEL_FILES = ("config.json", "model.safetensors")
# metrics.json describes the base (distillation scores on its own task): kept in the report, not copied
NOT_COPIED = set(MODEL_FILES) | {REPORT_NAME, "metrics.json"}
ACCOUNTANTS = ("rdp", "prv")


class DPTrainingError(ValueError):
    """A fine-tuning request that cannot run; the message says which argument or file."""


@dataclass
class FinetuneConfig:
    data: str
    base: str
    out: str
    epsilon: float | None = 8.0  # None: no DP (the baseline)
    delta: float | None = None  # None: default_delta(n_train)
    epochs: int = 3
    accountant: str = "rdp"
    batch_size: int = 256  # expected logical batch (Poisson: sample_rate = batch_size / n_train)
    physical_batch_size: int = 64  # BatchMemoryManager's bound on what is in memory at once
    max_grad_norm: float = 1.0
    lr: float | None = None  # None: DEFAULT_LR[train_scope]
    max_length: int = 64
    seed: int = 0
    split_seed: int = 13
    holdout: float = 0.2  # fraction held out: half dev, half test (the reported utility)
    reinit_head: bool = True
    progress: bool = True
    keep_checkpoints: bool = False
    resume: bool = False
    range_data: str | None = None  # public text to record polynomial input ranges on (default SST-2 dev)
    threads: int | None = 1  # torch intra-op threads; 1 is far faster on a shared 2-core box
    train_scope: str = "bitfit"  # all | bitfit | top (last encoder layer + head) | head
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    matrix_lr: float | None = None  # lr of the encoder's weight matrices (scopes all/top); None: DEFAULT_MATRIX_LR
    extra: dict = field(default_factory=dict)


def default_delta(n: int) -> float:
    """The largest power of ten at most 1/(10 n): 1e-5 for the 3.9k SMS training rows."""
    return 10.0 ** math.floor(math.log10(1.0 / (10.0 * n)))


# --- tokenizer and data ---

def load_tokenizer(model_dir: str | Path, max_length: int):
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    elif (model_dir / "vocab.txt").exists():
        from tokenizers import BertWordPieceTokenizer

        lower = True
        cfg = model_dir / "tokenizer_config.json"
        if cfg.exists():
            lower = bool(json.loads(cfg.read_text()).get("do_lower_case", True))
        tok = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=lower)
    else:
        raise DPTrainingError(f"{model_dir}: no tokenizer.json or vocab.txt in the base model directory")
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


@dataclass
class Encoded:
    ids: torch.Tensor  # (n, max_length) long, padded with pad_id
    mask: torch.Tensor  # (n, max_length) long
    labels: torch.Tensor  # (n,) long
    truncated: int

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.ids, self.mask, self.labels)


def encode(examples: list[Example], tok, max_length: int, pad_id: int, vocab_size: int) -> Encoded:
    n = len(examples)
    ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    truncated = 0
    encodings = tok.encode_batch([ex.text for ex in examples])
    for i, enc in enumerate(encodings):
        row = enc.ids[:max_length]
        if enc.overflowing:
            truncated += 1
        if max(row) >= vocab_size:
            raise DPTrainingError(f"tokenizer produced id {max(row)} >= model vocab_size {vocab_size}")
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return Encoded(ids, mask, labels, truncated)


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns no row of the batch uses (a batch-level length, not a per-sample one)."""
    if ids.shape[0] == 0:
        return ids[:, :1], mask[:, :1]
    length = int(mask.sum(1).max().clamp_min(1))
    return ids[:, :length], mask[:, :length]


# --- metrics ---

@torch.no_grad()
def predict(model: nn.Module, data: Encoded, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(logits (n, labels), per-example cross-entropy loss (n,)) in eval mode."""
    was_training = model.training
    model.eval()
    logits, losses = [], []
    for start in range(0, len(data), batch_size):
        ids, mask = trim(data.ids[start:start + batch_size], data.mask[start:start + batch_size])
        out = model(ids, mask).logits
        logits.append(out)
        losses.append(F.cross_entropy(out, data.labels[start:start + batch_size], reduction="none"))
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(losses).numpy()


def utility(logits: np.ndarray, labels: np.ndarray, positive: int = 1) -> dict:
    from sklearn.metrics import f1_score

    pred = logits.argmax(-1)
    return {
        "accuracy": float((pred == labels).mean()),
        "f1_label_1": float(f1_score(labels, pred, pos_label=positive, average="binary", zero_division=0))
        if logits.shape[1] == 2 else float(f1_score(labels, pred, labels=[positive], average="macro",
                                                     zero_division=0)),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "n": int(len(labels)),
    }


def membership_audit(member_loss: np.ndarray, member_logits: np.ndarray, member_labels: np.ndarray,
                     out_loss: np.ndarray, out_logits: np.ndarray, out_labels: np.ndarray,
                     seed: int = 0) -> dict:
    """Membership-inference AUCs (members = training rows, non-members = held-out rows).

    * loss: the loss-threshold attack (Yeom et al. 2018): score = -loss.
    * class_calibrated: a stronger, LiRA-style offline attack without shadow models. The score is the
      logit-scaled confidence phi = log(p_y / (1 - p_y)), standardised with the mean/std of phi over
      a *reference* half of the non-members of the same class (an attacker with population data),
      and evaluated on the other half of the non-members against an equal number of members.
      It removes the per-class offset (spam vs ham losses differ a lot), which a single threshold
      cannot.
    """
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(member_loss)), np.zeros(len(out_loss))]
    losses = np.nan_to_num(np.r_[member_loss, out_loss], nan=1e6, posinf=1e6)
    result = {"loss": float(roc_auc_score(y, -losses)),
              "members": int(len(member_loss)), "non_members": int(len(out_loss))}

    def phi(logits, labels):
        # log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j, computed without forming p_y
        z = np.nan_to_num(logits.astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
        rows = np.arange(len(labels))
        zy = z[rows, labels]
        others = z.copy()
        others[rows, labels] = -np.inf
        m = others.max(-1)
        return zy - (m + np.log(np.exp(others - m[:, None]).sum(-1)))

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(out_loss))
    ref, test = perm[: len(perm) // 2], perm[len(perm) // 2:]
    phi_out, phi_in = phi(out_logits, out_labels), phi(member_logits, member_labels)
    stats = {}
    for c in np.unique(np.r_[member_labels, out_labels]):
        r = phi_out[ref][out_labels[ref] == c]
        stats[int(c)] = (r.mean(), r.std() + 1e-6) if len(r) > 1 else (0.0, 1.0)

    def score(ph, labels):
        return np.array([(p - stats[int(c)][0]) / stats[int(c)][1] for p, c in zip(ph, labels, strict=True)])

    members = rng.permutation(len(member_loss))[: len(test)]
    if len(test) and len(members) and len(set(np.r_[np.ones(len(members)), np.zeros(len(test))])) == 2:
        s = np.r_[score(phi_in[members], member_labels[members]), score(phi_out[test], out_labels[test])]
        yy = np.r_[np.ones(len(members)), np.zeros(len(test))]
        result["class_calibrated"] = float(roc_auc_score(yy, s))
    return result


# --- model I/O ---

def load_base(base: str | Path, num_labels: int, reinit_head: bool, seed: int) -> tuple[HEFriendlyBert, dict]:
    base = Path(base)
    if not (base / "config.json").exists():
        raise DPTrainingError(f"{base}: not a model directory (no config.json)")
    model = HEFriendlyBert.from_pretrained(base)
    info = {"base_num_labels": model.config.num_labels, "head_reinitialised": False}
    if reinit_head or model.config.num_labels != num_labels:
        gen = torch.Generator().manual_seed(seed)
        head = nn.Linear(model.config.hidden_size, num_labels)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            head.bias.zero_()
        model.classifier = head
        model.config.num_labels = num_labels
        info["head_reinitialised"] = True
    return model, info


@torch.no_grad()
def record_public_ranges(model: HEFriendlyBert, base_ranges: dict, texts: list[str], tok,
                         max_length: int) -> dict:
    """Polynomial input ranges for config.json, from *public* text only, unioned with the base's.

    The ranges end up in the published config; recording them on the private training set would
    release exact extremes of private activations (not covered by DP). Running the DP model on public
    text is post-processing, so it costs no privacy.
    """
    from he_models.model import RangeRecorder

    model.eval()
    for m in model.modules():
        if isinstance(m, RangeRecorder):
            m.lo.fill_(float("inf"))
            m.hi.fill_(float("-inf"))
    set_recorders_training(model, True)
    examples = [Example(t, 0) for t in texts]
    data = encode(examples, tok, max_length, model.config.pad_token_id, model.config.vocab_size)
    for start in range(0, len(data), 256):
        ids, mask = trim(data.ids[start:start + 256], data.mask[start:start + 256])
        model(ids, mask)
    set_recorders_training(model, False)
    recorded = model.recorded_ranges()
    merged = dict(base_ranges)
    for key, (lo, hi) in recorded.items():
        if key in merged:
            merged[key] = [min(lo, merged[key][0]), max(hi, merged[key][1])]
        else:
            merged[key] = [lo, hi]
    # make the recorders hold the merged ranges so save_pretrained writes them
    names = {f"layers.{i}.softmax": layer.attn.recorder for i, layer in enumerate(model.layers)}
    names.update({f"layers.{i}.gelu": layer.act.recorder for i, layer in enumerate(model.layers)})
    if model.pooler is not None:
        names["pooler"] = model.pooler_recorder
    for key, rec in names.items():
        if key in merged:
            rec.lo.fill_(merged[key][0])
            rec.hi.fill_(merged[key][1])
    model.config.ranges = merged
    return merged


@torch.no_grad()
def held_out_range_check(model: HEFriendlyBert, data: Encoded) -> dict:
    """Polynomial input ranges on the held-out split (only compared with the published ranges, not published)."""
    from he_models.model import RangeRecorder

    probe = copy.deepcopy(model).eval()
    for m in probe.modules():
        if isinstance(m, RangeRecorder):
            m.lo.fill_(float("inf"))
            m.hi.fill_(float("-inf"))
    set_recorders_training(probe, True)
    for start in range(0, len(data), 256):
        probe(*trim(data.ids[start:start + 256], data.mask[start:start + 256]))
    return probe.recorded_ranges()


def _within(held_out: list[float], published: list[float] | None) -> bool | None:
    if published is None:
        return None
    return bool(published[0] <= held_out[0] and held_out[1] <= published[1])


def write_model_dir(model: HEFriendlyBert, base: Path, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copied = []
    for f in sorted(base.iterdir()):
        if f.is_file() and f.name not in NOT_COPIED and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    return copied


# --- training ---

def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def prepare(cfg: FinetuneConfig):
    """Data, splits, tokenizer and the starting model: shared by finetune() and the sweep."""
    examples, label_plan = data_labels(cfg.data, cfg.base)  # DatasetError names the file and line of a bad row
    labels = sorted({ex.label for ex in examples})
    num_labels = len(label_plan.names)
    if len(labels) < 2:
        raise DPTrainingError(f"{cfg.data}: need at least two distinct labels, found {labels}")
    half = cfg.holdout / 2
    splits = stratified_split(examples, seed=cfg.split_seed, fractions=(1 - cfg.holdout, half, half))
    if not splits.train or not splits.test:
        raise DPTrainingError(f"{cfg.data}: too few rows ({len(examples)}) for a train/held-out split")
    base = Path(cfg.base)
    model, head_info = load_base(base, num_labels, cfg.reinit_head, cfg.seed)
    model.config.set_labels(label_plan.names)
    max_length = min(cfg.max_length, model.config.max_position)
    tok = load_tokenizer(base, max_length)
    enc = {name: encode(part, tok, max_length, model.config.pad_token_id, model.config.vocab_size)
           for name, part in (("train", splits.train), ("dev", splits.dev), ("test", splits.test))}
    data_info = {
        "file": str(cfg.data), "rows": len(examples), "fingerprint": fingerprint(examples),
        "num_labels": num_labels, "labels": label_plan.as_dict(), "label_counts": {str(c): sum(ex.label == c for ex in examples) for c in labels},
        "split": {k: len(v) for k, v in enc.items()}, "split_seed": cfg.split_seed,
        "split_rule": "stratified by label; identical texts kept in one split (cipherbert.data.stratified_split)",
        "max_length": max_length, "truncated_rows": sum(v.truncated for v in enc.values()),
    }
    return model, head_info, tok, enc, data_info


def _check_config(cfg: FinetuneConfig) -> None:
    if cfg.accountant not in ACCOUNTANTS:
        raise DPTrainingError(f"accountant {cfg.accountant!r}: choose one of {list(ACCOUNTANTS)}")
    if cfg.epsilon is not None and not (cfg.epsilon > 0 and math.isfinite(cfg.epsilon)):
        raise DPTrainingError(f"epsilon must be a positive finite number, got {cfg.epsilon}")
    if cfg.epochs < 1:
        raise DPTrainingError(f"epochs must be >= 1, got {cfg.epochs}")


def _quiet_warnings() -> None:
    import warnings

    # the first encoder layer's input (frozen embeddings) needs no gradient: expected, not a problem
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # documented in docs/dp.md


def resolve_delta(cfg: FinetuneConfig, n_train: int) -> float:
    delta = cfg.delta if cfg.delta is not None else default_delta(n_train)
    if not 0 < delta < 1:
        raise DPTrainingError(f"delta must be in (0, 1), got {delta}")
    if cfg.epsilon is not None and delta >= 1.0 / n_train:
        raise DPTrainingError(f"delta {delta} is not below 1/n = {1.0 / n_train:.3g}; pick a smaller one")
    return delta


@dataclass
class TrainRun:
    """One training run's moving parts: the twin, the (possibly DP-wrapped) module, optimizer and loader."""

    twin: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    gen: torch.Generator
    privacy_engine: object | None
    noise_multiplier: float
    sample_rate: float
    lr: float
    batch_size: int
    delta: float
    n_train: int
    history: list = field(default_factory=list)
    train_samples: int = 0
    train_seconds: float = 0.0

    @property
    def dp(self) -> bool:
        return self.privacy_engine is not None


def is_encoder_matrix(twin: nn.Module, name: str) -> bool:
    """A weight matrix of an encoder Linear (q/k/v/o/fc1/fc2/pooler): what `bitfit` freezes."""
    module = twin.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, nn.Linear) and name.endswith(".weight") and not name.startswith("classifier.")


def param_groups(cfg: FinetuneConfig, twin: nn.Module, lr: float) -> list[dict]:
    """Trained parameters in two groups: the encoder's weight matrices get their own (smaller) rate.

    Why: with Adam every coordinate moves by about lr per step whatever its gradient, so under DP noise
    the 393k matrix entries random-walk by lr * sqrt(steps); at the rate that suits biases, norms and the
    head (5e-2) that rewrites the pretrained features, and the quadratic GELU amplifies the damage.
    """
    trained = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    matrices = [p for n, p in trained if is_encoder_matrix(twin, n)]
    rest = [p for n, p in trained if not is_encoder_matrix(twin, n)]
    groups = [{"params": rest, "lr": lr}] if rest else []
    if matrices:
        matrix_lr = cfg.matrix_lr if cfg.matrix_lr is not None else DEFAULT_MATRIX_LR.get(cfg.train_scope, lr)
        groups.append({"params": matrices, "lr": matrix_lr})
    return groups


def _make_optimizer(cfg: FinetuneConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    raise DPTrainingError(f"optimizer {cfg.optimizer!r}: choose adam or sgd")


def setup_training(cfg: FinetuneConfig, model: HEFriendlyBert, train: Encoded, delta: float) -> TrainRun:
    """DP twin of `model`, scope applied, optimizer, and (with cfg.epsilon) Opacus' Poisson loader."""
    torch.manual_seed(cfg.seed)
    twin = make_dp_twin(model)
    apply_train_scope(twin, cfg.train_scope)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.train_scope]
    optimizer = _make_optimizer(cfg, param_groups(cfg, twin, lr), lr)
    n_train = len(train)
    batch_size = min(cfg.batch_size, n_train)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train.dataset(), batch_size=batch_size, shuffle=True, generator=gen)
    if cfg.epsilon is None:
        return TrainRun(twin, twin, optimizer, loader, gen, None, 0.0, batch_size / n_train, lr, batch_size,
                        delta, n_train)
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=cfg.accountant)
    module, optimizer, loader = engine.make_private_with_epsilon(
        module=twin, optimizer=optimizer, data_loader=loader, target_epsilon=cfg.epsilon,
        target_delta=delta, epochs=cfg.epochs, max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=True, grad_sample_mode="hooks")
    sort_poisson_batches(loader, train.mask.sum(1).tolist())
    return TrainRun(twin, module, optimizer, loader, gen, engine, float(optimizer.noise_multiplier),
                    float(1.0 / len(loader)), lr, batch_size, delta, n_train)


def _checkpoint_state(cfg: FinetuneConfig, run: TrainRun, epoch: int, fingerprint: str) -> dict:
    return {"model": run.twin.state_dict(), "optimizer": run.optimizer.state_dict(),
            "accountant": run.privacy_engine.accountant.state_dict() if run.privacy_engine else None,
            "rng": torch.get_rng_state(), "loader_rng": run.gen.get_state(), "epoch": epoch,
            "fingerprint": fingerprint, "epsilon": cfg.epsilon,
            "noise_multiplier": run.noise_multiplier, "sample_rate": run.sample_rate, "history": run.history,
            "train_samples": run.train_samples, "train_seconds": run.train_seconds}


def _resume(cfg: FinetuneConfig, run: TrainRun, ckpt_path: Path, fingerprint: str) -> int:
    """Load the checkpoint into `run`; returns the epoch to continue from."""
    state = torch.load(ckpt_path, weights_only=False)
    if (state["fingerprint"] != fingerprint or state["epsilon"] != cfg.epsilon
            or state["noise_multiplier"] != run.noise_multiplier or state["sample_rate"] != run.sample_rate):
        raise DPTrainingError(f"{ckpt_path}: checkpoint is for other data or privacy settings; "
                              "remove it or drop --resume")
    run.twin.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.privacy_engine is not None:
        run.privacy_engine.accountant.load_state_dict(state["accountant"])
    torch.set_rng_state(state["rng"])
    run.gen.set_state(state["loader_rng"])
    run.history = state["history"]
    run.train_samples, run.train_seconds = state["train_samples"], state["train_seconds"]
    return int(state["epoch"])


def _train_epoch(cfg: FinetuneConfig, run: TrainRun, epoch: int) -> tuple[int, float]:
    """One pass over the loader; returns (samples seen, summed loss)."""
    run.module.train()
    seen, loss_sum = 0, 0.0
    if run.dp:
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        with BatchMemoryManager(data_loader=run.loader, max_physical_batch_size=cfg.physical_batch_size,
                                optimizer=run.optimizer) as memory_safe_loader:
            bar = tqdm(memory_safe_loader, desc=f"DP epoch {epoch + 1}/{cfg.epochs}",
                       disable=not cfg.progress, leave=False)
            for ids, mask, labels in bar:
                loss = _step(run.module, run.optimizer, ids, mask, labels)
                seen, loss_sum = seen + len(labels), loss_sum + loss * len(labels)
                bar.set_postfix(loss=f"{loss:.3f}")
    else:
        bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for ids, mask, labels in bar:
            loss = _accumulated_step(run.module, run.optimizer, ids, mask, labels, cfg.physical_batch_size)
            seen, loss_sum = seen + len(labels), loss_sum + loss * len(labels)
            bar.set_postfix(loss=f"{loss:.3f}")
    return seen, loss_sum


def train_epochs(cfg: FinetuneConfig, run: TrainRun, dev: Encoded | None, start_epoch: int = 0,
                 checkpoint: tuple[Path, str] | None = None) -> None:
    """Epochs start_epoch..cfg.epochs-1, recording history (dev utility, epsilon so far) in `run`.

    checkpoint=(path, data fingerprint): saved after every epoch (what --resume continues from).
    """
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        seen, loss_sum = _train_epoch(cfg, run, epoch)
        dt = time.perf_counter() - t0
        run.train_samples += seen
        run.train_seconds += dt
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "samples": seen, "seconds": round(dt, 2)}
        if dev is not None:
            entry["dev"] = utility(predict(run.twin, dev)[0], dev.labels.numpy()) if len(dev) else {}
        if run.privacy_engine is not None:
            entry["epsilon_so_far"] = run.privacy_engine.get_epsilon(run.delta)
        run.history.append(entry)
        if cfg.progress:
            tqdm.write(json.dumps(entry))
        if checkpoint is not None:
            torch.save(_checkpoint_state(cfg, run, epoch + 1, checkpoint[1]), checkpoint[0])


def spent_privacy(cfg: FinetuneConfig, run: TrainRun) -> tuple[int, float | None]:
    """(steps taken, epsilon spent according to the accountant; None without DP)."""
    if run.privacy_engine is None:
        return cfg.epochs * len(run.loader), None
    steps = int(sum(h[2] for h in run.privacy_engine.accountant.history))
    return steps, float(run.privacy_engine.get_epsilon(run.delta))


def export_model(run: TrainRun, model: HEFriendlyBert, base_state: dict) -> HEFriendlyBert:
    """The trained twin back in HEFriendlyBert's names and format, in eval mode."""
    final = HEFriendlyBert(copy.deepcopy(model.config))
    final.load_state_dict(export_state_dict(run.twin, base_state), strict=True)
    return final.eval()


def train_model(cfg: FinetuneConfig, model: HEFriendlyBert, train: Encoded, delta: float | None = None,
                dev: Encoded | None = None) -> tuple[HEFriendlyBert, TrainRun]:
    """Train `model`'s DP twin on `train` with cfg's recipe (no files written): the audit's entry point."""
    _check_config(cfg)
    _set_threads(cfg.threads)
    _quiet_warnings()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    run = setup_training(cfg, model, train, delta if delta is not None else resolve_delta(cfg, len(train)))
    train_epochs(cfg, run, dev)
    return export_model(run, model, base_state), run


def held_out(enc: dict[str, Encoded]) -> Encoded:
    """dev + test: the non-members of the membership audit."""
    return Encoded(torch.cat([enc["dev"].ids, enc["test"].ids]), torch.cat([enc["dev"].mask, enc["test"].mask]),
                   torch.cat([enc["dev"].labels, enc["test"].labels]), 0)


def _evaluate(final: HEFriendlyBert, enc: dict[str, Encoded], seed: int) -> tuple[dict, dict]:
    """(test utility, membership-inference AUCs)."""
    test_logits, _ = predict(final, enc["test"])
    train_logits, train_loss = predict(final, enc["train"])
    out_enc = held_out(enc)
    out_logits, out_loss = predict(final, out_enc)
    mia = membership_audit(train_loss, train_logits, enc["train"].labels.numpy(),
                           out_loss, out_logits, out_enc.labels.numpy(), seed=seed)
    return utility(test_logits, enc["test"].labels.numpy()), mia


def finetune(cfg: FinetuneConfig, prepared=None) -> dict:
    """Train, evaluate, audit and write the model directory; returns the privacy report dict."""
    _check_config(cfg)
    _set_threads(cfg.threads)
    _quiet_warnings()
    model, head_info, tok, enc, data_info = prepared if prepared is not None else prepare(cfg)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_ranges = dict(model.config.ranges)
    run = setup_training(cfg, model, enc["train"], resolve_delta(cfg, len(enc["train"])))
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "last.pt"
    start_epoch = _resume(cfg, run, ckpt_path, data_info["fingerprint"]) if cfg.resume and ckpt_path.exists() else 0
    train_epochs(cfg, run, enc["dev"], start_epoch, (ckpt_path, data_info["fingerprint"]))
    steps, spent = spent_privacy(cfg, run)
    final = export_model(run, model, base_state)
    test_util, mia = _evaluate(final, enc, cfg.seed)
    range_check = held_out_range_check(final, enc["test"])
    range_texts = ([ex.text for ex in load_examples(cfg.range_data)] if cfg.range_data
                   else [ex.text for ex in load_sst2_dev()])
    ranges = record_public_ranges(final, base_ranges, range_texts, tok, data_info["max_length"])
    copied = write_model_dir(final, Path(cfg.base), out)
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    report = {
        "dp": run.dp, "epsilon": spent, "target_epsilon": cfg.epsilon, "delta": run.delta,
        "accountant": cfg.accountant if run.dp else None, "noise_multiplier": run.noise_multiplier,
        "sample_rate": run.sample_rate, "steps": steps, "epochs": cfg.epochs,
        **_recipe(cfg, run), "utility": {"split": "test", **test_util}, "membership_inference_auc": mia,
        "throughput": {"samples_per_s": run.train_samples / run.train_seconds if run.train_seconds else None,
                       "train_seconds": round(run.train_seconds, 2), "threads": torch.get_num_threads()},
        "data": data_info, "base_model": str(cfg.base), "base_metrics": _read_json(Path(cfg.base) / "metrics.json"),
        **head_info, **trainable_summary(run.twin),
        "frozen_reason": FROZEN_REASON + SCOPE_NOTES[cfg.train_scope],
        "ranges": {"source": "public text: " + (cfg.range_data or "SST-2 dev (data/sst2-dev.tsv)")
                   + ", unioned with the base model's ranges", "values": ranges,
                   "held_out_within": {k: _within(v, ranges.get(k)) for k, v in range_check.items()}},
        "copied_from_base": copied, "history": run.history, "seed": cfg.seed, "versions": versions(),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _recipe(cfg: FinetuneConfig, run: TrainRun) -> dict:
    return {
        "max_grad_norm": cfg.max_grad_norm if run.dp else None,
        "dataset_size": run.n_train,
        "batch_size": run.batch_size,
        "physical_batch_size": cfg.physical_batch_size if run.dp else None,
        "poisson_sampling": run.dp,
        "clipping": "flat per-sample (all trainable parameters together)" if run.dp else None,
        "optimizer": {"name": cfg.optimizer, "lr": run.lr, **({"momentum": 0.9} if cfg.optimizer == "sgd" else {})},
        "matrix_lr": (cfg.matrix_lr if cfg.matrix_lr is not None else DEFAULT_MATRIX_LR.get(cfg.train_scope))
        if cfg.train_scope in DEFAULT_MATRIX_LR else None,
        "train_scope": cfg.train_scope,
        "secure_mode": False,
    }


FROZEN_REASON = ("embedding block (word/position tables, embedding LayerNorm) is computed by the "
                 "client from the published bundle; AffineNorm running statistics are fixed "
                 "(eval-mode normalisation) so each sample's output depends only on itself")


TRAIN_SCOPES = ("all", "bitfit", "top", "head")
SCOPE_NOTES = {
    "all": "",
    "bitfit": "; scope 'bitfit': the encoder's weight matrices are frozen too (only biases, norm scales/shifts, "
              "log_z and the head are trained: less noise in total)",
    "top": "; scope 'top': all but the last encoder layer and the head are frozen too",
    "head": "; scope 'head': only the classifier head is trained",
}
# Adam learning rates that trained stably on SMS spam from he-bert-tiny-rt (docs/dp.md): the quadratic
# activations make full fine-tuning fragile at high rates; bias/norm/head parameters tolerate large ones.
# `all`: biases, norms, log_z and head at bitfit's rate, the weight matrices at their own, lower one
# (param_groups): the best measured at epsilon 8 (docs/dp.md, "Training every weight").
DEFAULT_LR = {"all": 5e-2, "bitfit": 5e-2, "top": 2e-3, "head": 2e-2}
# the encoder weight matrices' own rate (param_groups); scopes without matrices ignore it
DEFAULT_MATRIX_LR = {"all": 1e-3, "top": 2e-3}


def apply_train_scope(twin: HEFriendlyBert, scope: str) -> None:
    """Freeze more than the embeddings.

    all: every encoder parameter + head. bitfit: biases of every Linear, the AffineNorm scale/shift,
    log_z, and the whole classifier head (DP-BiTFiT, Bu et al. 2022: ~0.9% of the encoder's parameters,
    so far less noise in total). top: the last encoder layer + head. head: the classifier only.
    """
    if scope not in TRAIN_SCOPES:
        raise DPTrainingError(f"train scope {scope!r}: choose one of {list(TRAIN_SCOPES)}")
    if scope == "all":
        return
    if scope == "bitfit":
        for name, p in twin.named_parameters():
            if p.requires_grad and is_encoder_matrix(twin, name):
                p.requires_grad_(False)
        return
    keep = ("classifier.", "pooler.")
    if scope == "top":
        keep += (f"layers.{len(twin.layers) - 1}.",)
    for name, p in twin.named_parameters():
        if not name.startswith(keep):
            p.requires_grad_(False)


def _step(module: nn.Module, optimizer, ids, mask, labels) -> float:
    optimizer.zero_grad(set_to_none=True)
    if not len(labels):  # an empty Poisson batch: still a step (noise only), no data term
        for p in module.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        optimizer.step()
        return 0.0
    ids, mask = trim(ids, mask)
    loss = F.cross_entropy(module(ids, mask).logits, labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _accumulated_step(module: nn.Module, optimizer, ids, mask, labels, physical: int) -> float:
    """Non-DP step over one batch, computed in length-sorted chunks like the DP path (same padding work)."""
    optimizer.zero_grad(set_to_none=True)
    order = torch.argsort(mask.sum(1))
    total = 0.0
    for start in range(0, len(order), physical):
        idx = order[start:start + physical]
        cid, cmask = trim(ids[idx], mask[idx])
        loss = F.cross_entropy(module(cid, cmask).logits, labels[idx], reduction="sum") / len(labels)
        loss.backward()
        total += float(loss.detach())
    optimizer.step()
    return total


def sort_poisson_batches(loader, lengths: list[int]) -> None:
    """Make the DP loader's Poisson sampler emit each logical batch sorted by token length.

    BatchMemoryManager then cuts it into physical batches of similar length, so `trim` removes most
    padding. The logical batch (which records are in it) is unchanged, so the sampling analysis and
    the accountant are unaffected; only the order of computation within a step changes.
    """
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = loader.batch_sampler
    if type(sampler) is not UniformWithReplacementSampler:
        return

    class LengthSortedUniformSampler(UniformWithReplacementSampler):
        def __iter__(self):
            for indices in super().__iter__():
                yield sorted(indices, key=lengths.__getitem__)

    sampler.__class__ = LengthSortedUniformSampler


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def versions() -> dict:
    import platform

    import opacus

    return {"python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__}


def recompute_epsilon(report: dict) -> float:
    """Epsilon from the recorded hyperparameters with a fresh accountant (what the tests check)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(report["accountant"])
    acc.history = [(report["noise_multiplier"], report["sample_rate"], report["steps"])]
    return float(acc.get_epsilon(report["delta"]))


def throughput_benchmark(model: HEFriendlyBert, data: Encoded, scopes=("bitfit", "all"), batches: int = 6,
                         batch_size: int = 256, physical: int = 64, rounds: int = 2, seed: int = 0,
                         noise_multiplier: float = 1.0) -> dict:
    """DP vs non-DP training steps on the *same* batches, interleaved, so machine load hits both alike.

    For each scope: `batches` logical batches of `batch_size` rows, each sorted by length and cut into
    physical batches of `physical` rows (as in training); a DP step (per-sample gradients, clipping, noise,
    Adam) and a non-DP step (Adam) alternate on every batch, `rounds` times. Returns samples/s for both.
    """
    import warnings

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(len(data), generator=gen)[:batch_size] for _ in range(batches)]
    lengths = data.mask.sum(1)
    result = {}
    for scope in scopes:
        torch.manual_seed(seed)
        twin_dp, twin_plain = make_dp_twin(model), make_dp_twin(model)
        apply_train_scope(twin_dp, scope)
        apply_train_scope(twin_plain, scope)
        gsm = GradSampleModule(twin_dp)
        dp_opt = DPOptimizer(torch.optim.Adam([p for p in twin_dp.parameters() if p.requires_grad], lr=1e-4),
                             noise_multiplier=noise_multiplier, max_grad_norm=1.0, expected_batch_size=batch_size)
        plain_opt = torch.optim.Adam([p for p in twin_plain.parameters() if p.requires_grad], lr=1e-4)
        times = {"dp": 0.0, "non_dp": 0.0}
        samples = 0
        for _ in range(rounds):
            for idx in picks:
                idx = idx[torch.argsort(lengths[idx])]
                chunks = [idx[i:i + physical] for i in range(0, len(idx), physical)]
                t0 = time.perf_counter()
                for j, c in enumerate(chunks):
                    dp_opt.signal_skip_step(do_skip=j < len(chunks) - 1)
                    _step(gsm, dp_opt, data.ids[c], data.mask[c], data.labels[c])
                times["dp"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                plain_opt.zero_grad(set_to_none=True)
                for c in chunks:
                    ids, mask = trim(data.ids[c], data.mask[c])
                    (F.cross_entropy(twin_plain(ids, mask).logits, data.labels[c], reduction="sum")
                     / len(idx)).backward()
                plain_opt.step()
                times["non_dp"] += time.perf_counter() - t0
                samples += len(idx)
        result[scope] = {"dp_samples_per_s": samples / times["dp"], "non_dp_samples_per_s": samples / times["non_dp"],
                         "ratio": times["non_dp"] / times["dp"], "samples": samples}
    return result
