"""Label names for a DP fine-tune: the base model's when the data uses the same label set, else the data's.

Kept apart from train.py so the rule is one small function: a model fine-tuned on data labelled like its
base keeps the base's ids and names (so a kept head still means what it meant); data with another label
set gets its own names, and the run says so (stderr and privacy_report.json's data.labels).
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from cipherbert.data import Example, load_labelled
from he_models.config import HEConfig


@dataclass(frozen=True)
class LabelPlan:
    names: list[str]  # label names in id order, written to the fine-tuned model's config.json
    base_names: list[str]
    kept_base_names: bool
    note: str

    def as_dict(self) -> dict:
        return asdict(self)


def _unnamed(names: list[str]) -> bool:
    """HF's placeholder names (LABEL_0, LABEL_1, ...): a base that never named its labels."""
    return all(re.fullmatch(rf"LABEL_{i}", n) for i, n in enumerate(names))


def data_labels(data: str | Path, base: str | Path) -> tuple[list[Example], LabelPlan]:
    """(examples with ids, label plan) for `data` fine-tuned from the model directory `base`.

    The label sets match when the data's labels, as written, are exactly the base's names (integer labels
    match a base whose names are those integers); then the base's label2id is used. Otherwise the data's
    own map is used (names sorted, integers kept) and the note says which names replaced which.
    """
    base_cfg = HEConfig.load(base)
    base_names = base_cfg.labels
    examples, own = load_labelled(data)
    if set(own) == set(base_names):
        examples, _ = load_labelled(data, base_cfg.label2id)
        note = f"labels match the base model's: keeping its names and ids {base_names}"
        return examples, LabelPlan(base_names, base_names, True, note)
    names = sorted(own, key=lambda k: own[k])
    what = "has no label names" if _unnamed(base_names) else f"is labelled {base_names}"
    note = f"the data's labels {names} are not the base model's label set (the base {what}): the fine-tuned model uses the data's names"
    print(f"dp_training: {note}", file=sys.stderr)
    return examples, LabelPlan(names, base_names, False, note)
