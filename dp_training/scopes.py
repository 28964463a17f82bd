"""Train-scope / learning-rate check: `python -m dp_training.scopes CFG_JSON ...`.

Each argument is a JSON object of FinetuneConfig overrides (e.g. '{"epsilon": 8, "train_scope": "all",
"lr": 0.05, "matrix_lr": 0.001}'); every run trains on the same SMS split from the same start (seed 0)
with dp_training.train.train_model and prints one JSON line: test spam F1, accuracy, and per epoch
(train loss, dev spam F1). `--results FILE` also collects the lines into a JSON file
(bench/results/dp_scopes.json holds the runs behind docs/dp.md's "Training every weight").
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def run(overrides: dict, prepared, common) -> dict:
    from dp_training.train import predict, train_model, utility

    model, _, _, enc, _ = prepared
    cfg = replace(common, **overrides)
    t0 = time.time()
    final, trained = train_model(cfg, model, enc["train"], dev=enc["dev"])
    logits, _ = predict(final, enc["test"])
    u = utility(logits, enc["test"].labels.numpy())
    return {
        "cfg": overrides,
        "test_f1": u["f1_label_1"],
        "acc": u["accuracy"],
        "hist": [(h["train_loss"], h["dev"].get("f1_label_1")) for h in trained.history],
        "sigma": trained.noise_multiplier,
        "sec": round(time.time() - t0),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from cipherbert.data import sms_spam_path
    from dp_training.train import FinetuneConfig, prepare

    argv = list(sys.argv[1:] if argv is None else argv)
    results = None
    if "--results" in argv:
        i = argv.index("--results")
        results, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    torch.set_num_threads(1)
    common = FinetuneConfig(data=str(sms_spam_path()), base="models/he-bert-tiny-rt", out="", progress=False)
    prepared = prepare(common)
    rows = []
    for arg in argv:
        rows.append(run(json.loads(arg), prepared, common))
        print(json.dumps(rows[-1]), flush=True)
    if results:
        Path(results).write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
