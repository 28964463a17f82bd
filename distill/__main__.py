"""`python -m distill --config FILE` (also `cipherbert distill --config FILE`): the whole distillation run.

Stages: fine-tune the teacher, cache its outputs, distil the HE-friendly student (shipped to
output_dir as soon as it is trained), the tiny_exact baseline, then the ablation. Rerunning the same
command after a kill continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cipherbert distill", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="JSON or TOML run configuration (see distill/configs/)")
    p.add_argument("--output-dir", help="override output_dir (the shipped model directory)")
    p.add_argument("--work-dir", help="override work_dir (checkpoints and cached teacher outputs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--skip-ablation", action="store_true", help="train only the shipped model and tiny_exact")
    p.add_argument("--finish", metavar="STUDENT",
                   help="stop STUDENT (e.g. tiny_exact) at its last checkpoint, keep its best dev epoch, "
                        "evaluate it and mark it done (when time runs out)")
    p.add_argument("--ablation-only", action="store_true",
                   help="run only the ablation students (e.g. in a second process beside the main run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cipherbert.data import DatasetError
    from distill.config import load_config
    from distill.teacher import TeacherError
    from he_models.config import ConfigError

    try:
        cfg = load_config(args.config)
        if args.output_dir:
            cfg["output_dir"] = args.output_dir
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
