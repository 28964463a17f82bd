"""`python -m distill --config FILE` (also `cipherbert distill ...`): the whole distillation run.

Without a config file: `cipherbert distill --train F --dev F [--test F] --out DIR [--teacher HF_DIR]`
distils a student for your own CSV/TSV/JSONL files with the shipped model's settings
(distill/configs/he-bert-tiny-rt.json); with `--config`, that file's settings are used instead, and the
flags given still win over it.

Stages: fine-tune the teacher, cache its outputs, distil the HE-friendly student (shipped to
output_dir as soon as it is trained), the tiny_exact baseline, then the ablation. Rerunning the same
command after a kill continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHIPPED_CONFIG = Path(__file__).resolve().parent / "configs" / "he-bert-tiny-rt.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cipherbert distill", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="JSON or TOML run configuration (see distill/configs/); default: the "
                                    "shipped model's settings, with --train/--dev/--out")
    p.add_argument("--train", help="training file: CSV/TSV/JSONL with text and label (names or integers)")
    p.add_argument("--dev", help="dev file (its labels must be among the training file's)")
    p.add_argument("--test", help="test file (optional)")
    p.add_argument("--out", "--output-dir", dest="output_dir", help="the model directory to write")
    p.add_argument("--teacher", help="local Hugging Face BERT-family checkpoint directory (default: MiniLM-L6)")
    p.add_argument("--work-dir", help="checkpoints and cached teacher outputs (default: OUT.work)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--skip-ablation", action="store_true", help="train only the shipped model and tiny_exact")
    p.add_argument("--finish", metavar="STUDENT",
                   help="stop STUDENT (e.g. tiny_exact) at its last checkpoint, keep its best dev epoch, "
                        "evaluate it and mark it done (when time runs out)")
    p.add_argument("--ablation-only", action="store_true",
                   help="run only the ablation students (e.g. in a second process beside the main run)")
    return p


def config_from_args(args: argparse.Namespace) -> dict:
    """The run configuration: --config (or the shipped settings), then the flags on top."""
    from distill.config import from_dict, load_config, validate
    from he_models.config import ConfigError

    if args.config:
        cfg = load_config(args.config)
    else:
        if not (args.train and args.dev and args.output_dir):
            raise ConfigError("give --train, --dev and --out (or --config FILE)")
        shipped = json.loads(SHIPPED_CONFIG.read_text())
        shipped["data"].update(task="files", sst2_dev=False, train=args.train, dev=args.dev, test=args.test)
        cfg = from_dict(shipped)
    if args.train or args.dev or args.test:
        cfg["data"].update(task="files", sst2_dev=False)
        for key in ("train", "dev", "test"):
            if getattr(args, key):
                cfg["data"][key] = getattr(args, key)
    if args.output_dir:
        cfg["output_dir"] = args.output_dir
        if not args.config:
            cfg["name"] = Path(args.output_dir).name
            cfg["work_dir"] = str(Path(args.output_dir).with_name(Path(args.output_dir).name + ".work"))
    if args.teacher:
        cfg["teacher"]["path"] = args.teacher
    if args.work_dir:
        cfg["work_dir"] = args.work_dir
    if args.no_progress:
        cfg["progress"] = False
    if args.skip_ablation:
        cfg["ablation"]["enabled"] = False
    if args.ablation_only:
        cfg["_ablation_only"] = True
    if args.finish:
        cfg["_finish"] = args.finish
    return validate(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cipherbert.data import DatasetError
    from distill.teacher import TeacherError
    from he_models.config import ConfigError

    try:
        cfg = config_from_args(args)
        from distill.pipeline import run

        metrics = run(cfg)
    except (ConfigError, DatasetError, TeacherError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    summary = {k: metrics.get(k) for k in ("teacher_accuracy", "tiny_exact_accuracy", "he_friendly_accuracy",
                                           "he_friendly_test_accuracy", "he_friendly_sst2_accuracy")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
