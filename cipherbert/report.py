"""Print the README's result tables from the committed JSON files: `python -m cipherbert.report`.

Every number in the README's tables comes from here, and every number here from a script's JSON
(models/*/metrics.json, bench/results/*.json); rerun the scripts to refresh them.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def accuracy_table(model: str = "he-bert-tiny-rt") -> str:
    m = _load(ROOT / "models" / model / "metrics.json")
    if m is None:
        return "(no metrics.json)"
    rows = [
        (
            "teacher (MiniLM-L6-H384, fine-tuned)",
            m.get("teacher_accuracy"),
            m.get("teacher_test_accuracy"),
            m.get("teacher_sst2_accuracy"),
        ),
        (
            "tiny_exact (BERT-Tiny shape, exact ops, same distillation)",
            m.get("tiny_exact_accuracy"),
            m.get("tiny_exact_test_accuracy"),
            m.get("tiny_exact_sst2_accuracy"),
        ),
        (
            "**HE-friendly student (shipped)**",
            m.get("he_friendly_accuracy"),
            m.get("he_friendly_test_accuracy"),
            m.get("he_friendly_sst2_accuracy"),
        ),
    ]
    out = ["| model | RT dev | RT test | SST-2 dev |", "|---|---|---|---|"]
    out += [f"| {name} | {_pct(a)} | {_pct(b)} | {_pct(c)} |" for name, a, b, c in rows]
    out.append(
        f"\nRotten Tomatoes grouped split: dev {m.get('dev_size')}, test {m.get('test_size')} sentences; "
        f"SST-2 dev {m.get('sst2_dev_size', 872)} sentences ({model}/metrics.json)."
    )
    return "\n".join(out)


def engine_table() -> str:
    e = _load(RESULTS / "engine.json")
    if e is None:
        return "(no engine.json)"
    out = [
        "| tokens | e2e p50 | e2e p95 | server p50 | plaintext PyTorch | rounds | upload | download | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in e["results"]:
        out.append(
            f"| {r['tokens']} | {r['e2e_p50_s']:.2f} s | {r['e2e_p95_s']:.2f} s | {r['server_p50_s']:.2f} s | "
            f"{r['plaintext_s'] * 1e3:.1f} ms | {r['rounds']} | {r['upload_bytes'] / 1e6:.2f} MB | "
            f"{r['download_bytes'] / 1e6:.2f} MB | {r['peak_rss_bytes'] / 2**30:.2f} GiB |"
        )
    par = e.get("parallel")
    if par:
        two = [k for k in par if k.startswith("workers_") and not k.startswith("workers_1_")][0]
        out.append(
            f"\nBoth cores for one query (engine assistant process): 32-token e2e p50 "
            f"{par['workers_1_e2e_p50_s']:.2f} s in one process, {par[two]:.2f} s with two "
            f"({par['speedup']:.2f}x)."
        )
    n = e["naive"]
    machine = e["machine"]
    out.append(
        f"\nEvaluation keys {e['eval_key_bytes'] / 1e6:.1f} MB (once per client). Naive TenSEAL baseline "
        f"(one CKKSVector per token, matmul/polyval) on layer 0's projections: "
        f"{n['naive_per_token_s'] * 1e3:.0f} ms per token against the engine's "
        f"{n['engine_per_token_s'] * 1e3:.1f} ms per token: **{n['speedup']:.0f}x** "
        f"({n['tokens']} tokens, same run). Engine workers: {e.get('engine_workers', 1)}; "
        f"machine: {machine['cores']} cores, {machine['cpu']}, TenSEAL {machine['tenseal']} "
        f"(bench/results/engine.json)."
    )
    return "\n".join(out)


def agreement_line() -> str:
    a = _load(RESULTS / "agreement.json")
    if a is None:
        return "(no agreement.json)"
    return (
        f"Encrypted vs plaintext on {a['n']} dev sentences: label agreement {100 * a['label_agreement']:.1f}%, "
        f"mean |logit error| {a['mean_abs_logit_err']:.1e}, max {a['max_abs_logit_err']:.1e} "
        f"(bench/results/agreement.json)."
    )


def load_line() -> str:
    d = _load(RESULTS / "load.json")
    if d is None:
        return "(no load.json)"
    return (
        f"Service under load ({d.get('topology', '')}): {d['clients']} clients for {d['duration_s']:.0f} s, "
        f"{d['completed']} completed, throughput {d['throughput_rps']:.2f}/s, p50 {d['p50_s']:.1f} s, "
        f"p95 {d['p95_s']:.1f} s, errors {d['errors']}, lost {d['lost']}, crossed {d['crossed']}, "
        f"5xx {d['status_5xx']} (bench/results/load.json)."
    )


def dp_table() -> str:
    d = _load(RESULTS / "dp.json")
    if d is None:
        return "(no dp.json)"
    out = ["| epsilon | accuracy | spam F1 | membership AUC | samples/s |", "|---|---|---|---|---|"]
    for r in d["runs"]:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:g}"
        out.append(
            f"| {eps} | {_pct(r['accuracy'])} | {_pct(r['spam_f1'])} | {r['mia_auc']:.3f} | {r['samples_per_s']:.0f} |"
        )
    out.append(f"\ndelta = {d['delta']:.1e} (bench/results/dp.json).")
    return "\n".join(out)


def main() -> int:
    for title, body in (
        ("Accuracy", accuracy_table()),
        ("Engine", engine_table()),
        ("Agreement", agreement_line()),
        ("Load", load_line()),
        ("DP", dp_table()),
    ):
        print(f"### {title}\n\n{body}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
