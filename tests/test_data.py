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
    ("text,label\nok,1\nbad,-1\n", ":3: label -1 is negative"),
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


def test_string_labels_get_sorted_ids_and_integer_labels_keep_theirs(tmp_path):
    from cipherbert.data import load_labelled

    named = tmp_path / "q.csv"
    named.write_text("text,label\nhow many?,NUM\nwhere?,LOC\nwho?,HUM\nhow far?,NUM\n")
    examples, label2id = load_labelled(named)
    assert label2id == {"HUM": 0, "LOC": 1, "NUM": 2}
    assert [e.label for e in examples] == [2, 1, 0, 2]
    ints = tmp_path / "i.jsonl"
    ints.write_text("".join(json.dumps({"text": t, "label": v}) + "\n" for t, v in (("a", 2), ("b", 0), ("c", 2.0))))
    examples, label2id = load_labelled(ints)
    assert label2id == {"0": 0, "1": 1, "2": 2} and [e.label for e in examples] == [2, 0, 2]


def test_unknown_dev_label_names_the_line_and_the_known_names(tmp_path):
    dev = tmp_path / "dev.tsv"
    dev.write_text("text\tlabel\nwhere?\tLOC\nwhat colour?\tCOLOR\n")
    with pytest.raises(DatasetError, match=r"dev.tsv:3: unknown label 'COLOR' \(known names: \['HUM', 'LOC', 'NUM'\]\)"):
        load_examples(dev, {"HUM": 0, "LOC": 1, "NUM": 2})
    # integer ids are accepted against a named set (e.g. SST-2's 0/1 against negative/positive)
    ints = tmp_path / "ints.csv"
    ints.write_text("text,label\nbad,0\ngood,1\n")
    assert [e.label for e in load_examples(ints, {"negative": 0, "positive": 1})] == [0, 1]
    with pytest.raises(DatasetError, match=":3: unknown label '7'"):
        ints.write_text("text,label\nbad,0\ngood,7\n")
        load_examples(ints, {"negative": 0, "positive": 1})


def test_a_name_among_integer_labels_is_a_typo_with_its_line(tmp_path):
    mixed = tmp_path / "m.csv"
    mixed.write_text("text,label\nwin a prize,1\nsee you,0\nok then,maybe\n")
    with pytest.raises(DatasetError, match=r"m.csv:4: label 'maybe' is not an integer, unlike the labels above it"):
        load_examples(mixed)
    mixed.write_text("text,label\nhow many?,NUM\nwhere?,2\n")
    with pytest.raises(DatasetError, match=r"m.csv:3: label '2' is an integer, unlike the labels above it"):
        load_examples(mixed)


# ---- token classification (CoNLL / JSONL) ---------------------------------------------------------

def test_conll2003_shipped_splits_and_bio_tags():
    from cipherbert.data import load_conll2003, tag_names

    sizes = {s: len(load_conll2003(s)) for s in ("train", "dev", "test")}
    assert sizes == {"train": 14_041, "dev": 3_250, "test": 3_453}
    train = load_conll2003("train")
    assert tag_names(train) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert train[0].tokens[:3] == ("EU", "rejects", "German") and train[0].tags[:3] == ("B-ORG", "O", "B-MISC")
    for ex in train:  # BIO: an I- tag always continues a chunk of its own type
        for prev, tag in zip(("O",) + ex.tags[:-1], ex.tags, strict=True):
            assert not tag.startswith("I-") or prev[2:] == tag[2:]


def test_iob1_is_converted_to_bio():
    from cipherbert.data import to_bio

    assert to_bio(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    assert to_bio(["B-PER", "I-PER", "O"]) == ["B-PER", "I-PER", "O"]


def test_conll_and_jsonl_token_files(tmp_path):
    from cipherbert.data import load_token_examples

    conll = tmp_path / "a.conll"
    conll.write_text("-DOCSTART- -X- O\n\nJohn NNP I-PER\nlives VBZ O\nin IN O\nParis NNP I-LOC\n\nHi UH O\n")
    ex = load_token_examples(conll)
    assert [e.tokens for e in ex] == [("John", "lives", "in", "Paris"), ("Hi",)]
    assert ex[0].tags == ("B-PER", "O", "O", "B-LOC")  # IOB1 in, BIO out
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["Ann", "Lee"], "tags": ["B-PER", "I-PER"]}) + "\n")
    assert load_token_examples(jsonl)[0].tags == ("B-PER", "I-PER")


@pytest.mark.parametrize("name, content, message", [
    ("bad.conll", "John B-PER\nlives O\nthere X-LOC\n", r"bad.conll:3: tag 'X-LOC' is not"),
    ("bad.conll", "John B-PER\nalone\n", r"bad.conll:2: expected a word and a tag"),
    ("bad.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n',
     r"bad.jsonl:2: 'tags' must be a list with one tag per token"),
    ("bad.jsonl", '{"tokens": ["a"], "tags": ["PER"]}\n', r"bad.jsonl:1: tag 'PER' is not"),
])
def test_bad_token_file_names_the_line(tmp_path, name, content, message):
    from cipherbert.data import load_token_examples

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_token_examples(path)


def test_unknown_tag_in_dev_names_the_line_and_the_known_tags(tmp_path):
    from cipherbert.data import load_token_examples

    dev = tmp_path / "dev.txt"
    dev.write_text("Ann B-PER\n\nat O\nAcme B-ORG\nInc I-ORG\n")
    with pytest.raises(DatasetError, match=r"dev.txt:4: unknown tag 'B-ORG' \(known names: \['O', 'B-PER', 'I-PER'\]\)"):
        load_token_examples(dev, ["O", "B-PER", "I-PER"])
