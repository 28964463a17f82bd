"""DP fine-tuning keeps the base model's label names when the data uses the same label set, and says so
when it does not (issue 10, part 1)."""

from __future__ import annotations

import json
import random

import pytest

from cipherbert.data import load_sms_spam
from he_models.config import HEConfig

pytest.importorskip("opacus")

from dp_training.__main__ import main  # noqa: E402
from dp_training.labels import data_labels  # noqa: E402
from tests.support.dp_fixtures import make_random_base  # noqa: E402

# base ids deliberately not in sorted order: keeping the base's map is visible in the ids
BASE_NAMES = {0: "spam", 1: "ham"}


@pytest.fixture(scope="module")
def named_base(tmp_path_factory):
    texts = [e.text for e in load_sms_spam()[:400]]
    return make_random_base(
        tmp_path_factory.mktemp("named-base"),
        texts=texts,
        vocab_size=300,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        max_position=32,
        num_layers=2,
        id2label=BASE_NAMES,
    )


def write_rows(path, names: dict[int, str], n: int = 40):
    rng = random.Random(0)
    rows = rng.sample(load_sms_spam(), n)
    path.write_text("".join(json.dumps({"text": e.text, "label": names[e.label]}) + "\n" for e in rows))
    return path, rows


def test_matching_label_set_keeps_the_base_names_and_ids(tmp_path, named_base):
    path, rows = write_rows(tmp_path / "d.jsonl", {0: "ham", 1: "spam"})
    examples, plan = data_labels(path, named_base)
    assert plan.kept_base_names and plan.names == ["spam", "ham"]
    # the file's "spam" rows get the base's id for "spam" (0), not the sorted-order id (1)
    assert [ex.label for ex in examples] == [1 - r.label for r in rows]


def test_other_label_set_uses_the_data_names_and_says_so(tmp_path, named_base, capsys):
    path, rows = write_rows(tmp_path / "d.jsonl", {0: "normal", 1: "junk"})
    examples, plan = data_labels(path, named_base)
    assert not plan.kept_base_names and plan.names == ["junk", "normal"]
    assert plan.base_names == ["spam", "ham"]
    assert [ex.label for ex in examples] == [1 - r.label for r in rows]  # sorted: junk=0, normal=1
    err = capsys.readouterr().err
    assert "['junk', 'normal']" in err and "['spam', 'ham']" in err


def test_integer_labels_on_a_named_base_are_not_given_its_names(tmp_path, named_base):
    path, _ = write_rows(tmp_path / "d.jsonl", {0: 0, 1: 1})
    _, plan = data_labels(path, named_base)
    assert not plan.kept_base_names and plan.names == ["0", "1"]


def test_dp_finetune_writes_the_kept_names_to_config_json(tmp_path, named_base):
    path, _ = write_rows(tmp_path / "d.jsonl", {0: "ham", 1: "spam"}, n=48)
    out = tmp_path / "dp-model"
    rc = main(
        [
            "--data",
            str(path),
            "--base",
            str(named_base),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--quiet",
            "--max-length",
            "24",
            "--no-dp",
            "--batch-size",
            "16",
            "--keep-head",
        ]
    )
    assert rc == 0
    cfg = HEConfig.load(out)
    assert cfg.id2label == BASE_NAMES and cfg.label2id == {"spam": 0, "ham": 1}
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "spam", "1": "ham"}  # HF's JSON form: string keys
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["data"]["labels"]["kept_base_names"] is True
    assert report["head_reinitialised"] is False
