"""`python -m dp_training --data FILE --base models/<name> --epsilon E [--delta D] --epochs K --out DIR`.

Also reached as `cipherbert dp-finetune ...` (cipherbert/cli.py dispatches here).
"""

from __future__ import annotations

import argparse
import json
import sys

from cipherbert.data import DatasetError
from he_models.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cipherbert dp-finetune",
        description="Fine-tune an HE-friendly model on private labelled text with DP-SGD (Opacus); "
                    "writes a model directory the encrypted engine serves unchanged, plus privacy_report.json.")
    p.add_argument("--data", required=True, help="CSV/TSV/JSONL with a text column and a label column")
    p.add_argument("--base", required=True, help="base model directory (e.g. models/he-bert-tiny-rt)")
    p.add_argument("--out", required=True, help="output model directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--epsilon", type=float, help="target epsilon of the (epsilon, delta)-DP guarantee")
    g.add_argument("--no-dp", action="store_true", help="train without DP (the non-private baseline)")
    p.add_argument("--delta", type=float, default=None,
                   help="target delta (default: largest power of ten <= 1/(10 n_train), e.g. 1e-5)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--accountant", choices=("rdp", "prv"), default="rdp")
    p.add_argument("--batch-size", type=int, default=256, help="expected logical batch (Poisson sampling)")
    p.add_argument("--physical-batch-size", type=int, default=64, help="BatchMemoryManager's physical batch bound")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping bound C")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default depends on --train-scope: all 5e-2, bitfit 5e-2, top 2e-3, head 2e-2)")
    p.add_argument("--matrix-lr", type=float, default=None,
                   help="learning rate of the encoder's weight matrices under --train-scope all/top "
                        "(default: all 1e-3, top 2e-3)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (longer texts are truncated)")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction (half dev, half test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=13)
    p.add_argument("--keep-head", action="store_true",
                   help="keep the base classifier head when label counts match (default: re-initialise)")
    p.add_argument("--train-scope", choices=("all", "bitfit", "top", "head"), default="bitfit",
                   help="what DP-SGD trains besides the frozen embeddings: bitfit (default: every bias, the "
                        "AffineNorm scales/shifts, attention log_z, the classifier head), all (every encoder "
                        "weight too), top (last layer + head), head (classifier only)")
    p.add_argument("--range-data", default=None,
                   help="public text file to record polynomial input ranges on (default: SST-2 dev)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/last.pt")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared machine more threads thrash)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dp_training.train import DPTrainingError, FinetuneConfig, finetune

    cfg = FinetuneConfig(
        data=args.data, base=args.base, out=args.out, epsilon=None if args.no_dp else args.epsilon,
        delta=args.delta, epochs=args.epochs, accountant=args.accountant, batch_size=args.batch_size,
        physical_batch_size=args.physical_batch_size, max_grad_norm=args.max_grad_norm, lr=args.lr,
        max_length=args.max_length, seed=args.seed, split_seed=args.split_seed, holdout=args.holdout,
        reinit_head=not args.keep_head, progress=not args.quiet, keep_checkpoints=args.keep_checkpoints,
        resume=args.resume, range_data=args.range_data, threads=args.threads,
        train_scope=args.train_scope, matrix_lr=args.matrix_lr)
    try:
        report = finetune(cfg)
    except (DatasetError, ConfigError, DPTrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: report[k] for k in ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate",
                                      "steps", "epochs", "dataset_size")}
    summary["utility"] = report["utility"]
    summary["membership_inference_auc"] = report["membership_inference_auc"]
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} (model directory + privacy_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
