"""The dataset interface on the shipped corpora and on bad user files."""

import json

import pytest

from cipherbert.data import (
    DatasetError,
    drop_overlap,
    grouped_split,
    load_examples,
    load_rotten_tomatoes,
    load_sst2_dev,
    normalize_text,
    sentiment_splits,
)


def test_rotten_tomatoes_drops_plot_and_duplicates():
    examples = load_rotten_tomatoes()
    assert 12_000 < len(examples) < 13_500
    assert len({ex.text for ex in examples}) == len(examples)
    assert {ex.label for ex in examples} == {0, 1}


def test_grouped_split_keeps_movies_apart():
    splits, removed = sentiment_splits(seed=13)
    groups = [{ex.group for ex in part} for part in (splits.train, splits.dev, splits.test)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    total = len(splits.train) + len(splits.dev) + len(splits.test) + removed
    assert abs(len(splits.dev) / total - 0.1) < 0.02
    sst2 = {normalize_text(ex.text) for ex in load_sst2_dev()}
    assert not any(normalize_text(ex.text) in sst2 for ex in splits.train)
    assert removed > 400


def test_grouped_split_is_deterministic():
    examples = load_rotten_tomatoes()[:2000]
    a, b = grouped_split(examples, seed=5), grouped_split(examples, seed=5)
    assert [ex.text for ex in a.dev] == [ex.text for ex in b.dev]


def test_sst2_dev_shipped():
    examples = load_sst2_dev()
    assert len(examples) == 872 and {ex.label for ex in examples} == {0, 1}


def test_drop_overlap_normalises():
    from cipherbert.data import Example
    kept, removed = drop_overlap([Example("It's GREAT!", 1), Example("bad", 0)], ["it 's great"])
    assert removed == 1 and kept[0].text == "bad"


def test_csv_and_jsonl_loaders(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('text,label\n"hello, world",1\nbye,0\n')
    assert [(e.text, e.label) for e in load_examples(csv_file)] == [("hello, world", 1), ("bye", 0)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "label": 1}) + "\n\n" + json.dumps({"text": "b", "label": 0}) + "\n")
    assert [e.label for e in load_examples(jsonl)] == [1, 0]


@pytest.mark.parametrize("content, message", [
    ("text,label\nok,1\nbad,yes\n", ":3: label 'yes'"),
    ("text,label\nok,1\n,0\n", ":3: empty 'text'"),
    ("words,label\nok,1\n", "no text column"),
    ("text,label\nok,1\nx,1,extra\n", ":3: more fields"),
])
def test_bad_csv_names_the_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        load_examples(path)


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DatasetError, match=":2: invalid JSON"):
        load_examples(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_examples(tmp_path / "nope.csv")
    other = tmp_path / "x.parquet"
    other.write_text("x")
    with pytest.raises(DatasetError, match="unsupported file type"):
        load_examples(other)
