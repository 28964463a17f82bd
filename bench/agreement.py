"""Encrypted vs plaintext agreement: `python -m bench.agreement --n 200 [--workers 2]`.

Runs dev sentences (the grouped Rotten Tomatoes dev split) through the full encrypted protocol and
through the plaintext HE-friendly PyTorch model, and writes bench/results/agreement.json with the label
agreement and the logit error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from bench.engine import DEFAULT_MODEL, RESULTS, encrypted_run, machine_info

_worker: dict = {}


def _init(model_dir: str) -> None:
    """One engine, key set, embedder and plaintext model per pool process (also bench.ner_agreement's)."""
    import torch

    from he_models.client import ClientKeys, Embedder
    from he_models.engine import EncryptedEngine
    from he_models.model import HEFriendlyBert

    torch.set_num_threads(1)
    engine = EncryptedEngine.load(model_dir, os.urandom(32))
    bundle = engine.client_bundle()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    _worker.update(engine=engine, keys=keys, ctx=engine.load_context(keys.public_keys_bytes()),
                   embedder=Embedder.from_model_dir(model_dir), model=HEFriendlyBert.from_pretrained(model_dir),
                   labels=bundle["labels"])


def _one(item: tuple[int, str, int]) -> dict:
    import torch

    index, text, label = item
    emb = _worker["embedder"].embed(text)
    run = encrypted_run(_worker["engine"], _worker["keys"], _worker["ctx"], emb, f"agree-{index}")
    with torch.no_grad():
        plain = _worker["model"].forward_embedded(
            torch.tensor(emb, dtype=torch.float32)[None], torch.ones(1, emb.shape[0])).logits[0].numpy()
    return {"index": index, "label": label, "tokens": int(emb.shape[0]), "he": run["logits"].tolist(),
            "plain": plain.tolist(), "e2e_s": run["e2e"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=RESULTS / "agreement.json")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from cipherbert.data import sentiment_splits

    splits, _ = sentiment_splits()
    items = [(i, ex.text, ex.label) for i, ex in enumerate(splits.dev[: args.n])]
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers, initializer=_init, initargs=(str(args.model),)) as pool:
        rows = list(tqdm(pool.imap_unordered(_one, items), total=len(items), desc="encrypted inferences"))
    rows.sort(key=lambda r: r["index"])
    he = np.array([r["he"] for r in rows])
    plain = np.array([r["plain"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    err = np.abs(he - plain)
    report = {
        "n": len(rows),
        "label_agreement": float((he.argmax(1) == plain.argmax(1)).mean()),
        "mean_abs_logit_err": float(err.mean()),
        "max_abs_logit_err": float(err.max()),
        "encrypted_accuracy": float((he.argmax(1) == labels).mean()),
        "plaintext_accuracy": float((plain.argmax(1) == labels).mean()),
        "tokens_max": int(max(r["tokens"] for r in rows)),
        "mean_e2e_s": float(np.mean([r["e2e_s"] for r in rows])),
        "wall_s": time.perf_counter() - start,
        "workers": args.workers,
        "dataset": "rotten tomatoes grouped dev split (cipherbert.data.sentiment_splits)",
        "model": args.model.name,
        "machine": machine_info(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("n", "label_agreement", "mean_abs_logit_err", "max_abs_logit_err",
                                             "encrypted_accuracy", "plaintext_accuracy")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
