"""Several short sentences of one client in one inference, with block-diagonal attention.

A sentence of 10 word pieces fills a third of a 32-token chunk, and an inference costs about the same
for 10 tokens as for 32 (the linear maps work chunk by chunk). So a batch of short sentences is packed
into groups of at most one chunk each; a group is one inference whose sentences ("segments") sit one
after another in the token axis. Attention stays inside each segment: score entries between tokens
of different segments are zero on both sides (the client leaves them out of its products, the server
leaves them out of its corrections and of the 2Quad shift), so each sentence sees only itself and the
logits are pooled per segment. Pure numpy; shared by the engine and the client half.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from he_models.layout import CHUNK


def pack(lengths: Sequence[int], capacity: int = CHUNK) -> list[list[int]]:
    """Indices of the sentences grouped so that each group's lengths sum to at most `capacity`.

    First-fit decreasing: close to the fewest groups for short sentences. A sentence longer than the
    capacity gets a group of its own (it then runs as an ordinary inference).
    """
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n < 1:
            raise ValueError("a sentence needs at least one token")
        for g, free in enumerate(room):
            if n <= free:
                groups[g].append(i)
                room[g] -= n
                break
        else:
            groups.append([i])
            room.append(capacity - n)
    for group in groups:
        group.sort()
    groups.sort(key=lambda g: g[0])
    return groups


def check_segments(segments: Sequence[int], n: int) -> tuple[int, ...]:
    """The segment lengths as a tuple; they must be positive and sum to the token count n."""
    segs = tuple(int(s) for s in segments)
    if not segs or any(s < 1 for s in segs) or sum(segs) != n:
        raise ValueError(f"segments {list(segs)} must be positive lengths summing to {n} tokens")
    return segs


def segment_of(segments: Sequence[int]) -> np.ndarray:
    """Segment index of each token."""
    return np.repeat(np.arange(len(segments)), np.asarray(segments, dtype=np.int64))


def same_segment(segments: Sequence[int]) -> np.ndarray:
    """(n, n) bool: whether tokens k and i belong to the same sentence (attention may connect them)."""
    seg = segment_of(segments)
    return seg[:, None] == seg[None, :]


def per_token(segments: Sequence[int], per_segment: Sequence[float]) -> np.ndarray:
    """Expand one value per segment to one value per token."""
    return np.asarray(per_segment, dtype=np.float64)[segment_of(segments)]


def pooling(segments: Sequence[int], mean: bool) -> np.ndarray:
    """(n, segments) pooling weights: the mean over each sentence's tokens, or its first token."""
    n = sum(segments)
    pool = np.zeros((n, len(segments)))
    start = 0
    for s, length in enumerate(segments):
        if mean:
            pool[start : start + length, s] = 1.0 / length
        else:
            pool[start, s] = 1.0
        start += length
    return pool
