"""Teacher-labelled augmented sentences: cheap word-level edits of the training sentences.

Each copy applies one of: word dropout, a swap of adjacent words, a contiguous sub-span, or replacing
a few words by words drawn from the training vocabulary. The labels come from the teacher's logits
(soft targets), never from the original label, so an edit that flips the sentiment is labelled as such.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def _words(text: str) -> list[str]:
    return text.split()


def augment_sentence(text: str, rng: random.Random, vocab: Sequence[str]) -> str:
    words = _words(text)
    if len(words) < 3:
        return text
    op = rng.choice(("dropout", "swap", "span", "replace"))
    if op == "dropout":
        kept = [w for w in words if rng.random() > 0.15]
        words = kept if len(kept) >= 2 else words
    elif op == "swap":
        for _ in range(max(1, len(words) // 8)):
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
    elif op == "span":
        n = len(words)
        size = max(2, int(n * rng.uniform(0.4, 0.85)))
        start = rng.randrange(0, n - size + 1)
        words = words[start:start + size]
    else:
        for _ in range(max(1, len(words) // 7)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
    return " ".join(words)


def augment(texts: Sequence[str], copies: int, seed: int) -> list[str]:
    """`copies` edited versions of each sentence, deterministic for a seed, exact duplicates removed."""
    if copies <= 0:
        return []
    rng = random.Random(seed)
    vocab = sorted({w for t in texts for w in _words(t) if w.isalpha()})
    if not vocab:
        vocab = ["the"]
    seen = set(texts)
    out: list[str] = []
    for _ in range(copies):
        for t in texts:
            a = augment_sentence(t, rng, vocab)
            if a not in seen:
                seen.add(a)
                out.append(a)
    return out
