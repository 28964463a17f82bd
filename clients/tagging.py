"""From per-token logits to what a Hugging Face user expects of token classification.

The model labels word pieces. `pieces_of` reads a `tokenizers.Encoding` (ids, piece strings, character
offsets into the input text); `aggregate` then groups them exactly as transformers'
TokenClassificationPipeline does (tests/test_tagging.py compares the two on the same scores):

- "simple": every non-special piece is labelled by its argmax; adjacent pieces with the same entity type
  are grouped unless the next one is a B- tag;
- "first": each word (a piece and the continuation pieces that follow it) takes the label and score of
  its first piece, as the model was trained (labels on the first word piece), then "simple" grouping;
- "none": one entry per piece, ungrouped.

Entities are [{"entity_group", "word", "start", "end", "score"}] with character offsets into the text;
"O" is dropped, as the pipeline drops it. No torch, no transformers: numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.results import RunStats

STRATEGIES = ("simple", "first", "none")
SUBWORD_PREFIX = "##"
Join = Callable[[list[str]], str]  # pieces -> text: the tokenizer's decoder, as convert_tokens_to_string


@dataclass(frozen=True)
class Piece:
    """One word piece: its position in the model's input, its string and its characters in the text."""

    index: int
    token: str
    start: int
    end: int
    special: bool
    unknown: bool = False


def pieces_of(encoding: Any, unk_token: str = "[UNK]") -> list[Piece]:
    """Pieces of a `tokenizers.Encoding` (the same truncation the embedding used)."""
    return [
        Piece(i, tok, int(start), int(end), bool(special), tok == unk_token)
        for i, (tok, (start, end), special) in enumerate(
            zip(encoding.tokens, encoding.offsets, encoding.special_tokens_mask, strict=True)
        )
    ]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed as the pipeline does (max subtracted)."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def join_pieces(tokens: list[str]) -> str:
    """Slow WordPiece's convert_tokens_to_string: pieces joined by spaces, continuation prefixes removed.
    (A fast tokenizer's decoder also removes the space before punctuation: pass `tokenizer.decoder.decode`.)"""
    return " ".join(tokens).replace(f" {SUBWORD_PREFIX}", "").strip()


def is_subword(piece: Piece, text: str) -> bool:
    """The pipeline's rule for word-aware tokenizers: a piece whose string is longer than its characters
    in the text carries a continuation prefix ('##ing' for 'ing'); an unknown piece starts a word."""
    return not piece.unknown and len(piece.token) != len(text[piece.start : piece.end])


def _piece_word(piece: Piece, text: str) -> str:
    return text[piece.start : piece.end] if piece.unknown else piece.token


def token_entries(pieces: Sequence[Piece], scores: np.ndarray, labels: Sequence[str], text: str) -> list[dict]:
    """Per non-special piece: {"entity", "score", "index", "word", "start", "end"} (strategy "none")."""
    out = []
    for p in pieces:
        if p.special:
            continue
        best = int(np.argmax(scores[p.index]))
        out.append(
            {
                "entity": labels[best],
                "score": float(scores[p.index][best]),
                "index": p.index,
                "word": _piece_word(p, text),
                "start": p.start,
                "end": p.end,
            }
        )
    return out


def word_entries(
    pieces: Sequence[Piece], scores: np.ndarray, labels: Sequence[str], text: str, join: Join = join_pieces
) -> list[dict]:
    """Per word: the first piece's label and score, the word's pieces joined, its characters' span."""
    groups: list[list[Piece]] = []
    for p in pieces:
        if p.special:
            continue
        if groups and is_subword(p, text):
            groups[-1].append(p)
        else:
            groups.append([p])
    out = []
    for group in groups:
        first = scores[group[0].index]
        best = int(np.argmax(first))
        out.append(
            {
                "entity": labels[best],
                "score": float(first[best]),
                "word": join([_piece_word(p, text) for p in group]),
                "start": group[0].start,
                "end": group[-1].end,
            }
        )
    return out


def split_tag(label: str) -> tuple[str, str]:
    """("B"|"I", type); a label without a B-/I- prefix counts as a continuation of its own type."""
    if label.startswith("B-") or label.startswith("I-"):
        return label[0], label[2:]
    return "I", label


def group_entities(entries: Sequence[dict], join: Join = join_pieces) -> list[dict]:
    """Adjacent entries of one type form an entity unless the next is a B- tag (the pipeline's rule)."""
    groups: list[list[dict]] = []
    for entry in entries:
        bi, kind = split_tag(entry["entity"])
        if groups and kind == split_tag(groups[-1][-1]["entity"])[1] and bi != "B":
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return [
        {
            "entity_group": split_tag(g[0]["entity"])[1],
            "score": float(np.mean([e["score"] for e in g])),
            "word": join([e["word"] for e in g]),
            "start": g[0]["start"],
            "end": g[-1]["end"],
        }
        for g in groups
    ]


def aggregate(
    pieces: Sequence[Piece],
    logits: np.ndarray,
    labels: Sequence[str],
    text: str,
    strategy: str = "simple",
    ignore: Sequence[str] = ("O",),
    join: Join = join_pieces,
) -> list[dict]:
    """Entities of one text from its (n, labels) logits, grouped by `strategy`; `ignore` labels dropped."""
    if strategy not in STRATEGIES:
        raise ValueError(f"aggregation strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    scores = softmax(np.asarray(logits, dtype=np.float64))
    if strategy == "none":
        return [e for e in token_entries(pieces, scores, labels, text) if e["entity"] not in ignore]
    if strategy == "simple":
        entries = token_entries(pieces, scores, labels, text)
    else:
        entries = word_entries(pieces, scores, labels, text, join)
    return [e for e in group_entities(entries, join) if e["entity_group"] not in ignore]


@dataclass
class TagResult(RunStats):
    """What `Client.tag` returns: entities as the NER pipeline gives them, plus per-piece and per-word labels.

    tokens: one entry per non-special word piece {"entity", "score", "index", "word", "start", "end"} ("O"
    included, as the pipeline's strategy "none" before it drops "O"); words: one per word, labelled by its
    first piece {"entity", "score", "word", "start", "end"}; logits: (n_tokens, num_labels), [CLS]/[SEP] too.
    """

    entities: list[dict]
    tokens: list[dict]
    words: list[dict]
    logits: list[list[float]]
    labels: list[str]
    aggregation_strategy: str


def tag_views(
    pieces: Sequence[Piece], logits: np.ndarray, labels: Sequence[str], text: str, strategy: str, join: Join
) -> tuple[list[dict], list[dict], list[dict]]:
    """(entities, per-piece labels, per-word labels) of one text."""
    scores = softmax(np.asarray(logits, dtype=np.float64))
    entities = aggregate(pieces, logits, labels, text, strategy, join=join)
    return entities, token_entries(pieces, scores, labels, text), word_entries(pieces, scores, labels, text, join)
