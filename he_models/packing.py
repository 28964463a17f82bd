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


def score_weights(segments: Sequence[int]) -> np.ndarray:
    """(n, n) [k, i]: what turns the client's scores, scaled for n tokens, into per-sentence scores.

    Zero between tokens of different sentences (block-diagonal attention), sqrt(n / n_s) inside
    sentence s: 2Quad's 1/sqrt(length) belongs to the sentence, not to the packed chunk.
    """
    n = sum(segments)
    lengths = per_token(segments, segments)
    return same_segment(segments) * np.sqrt(n / lengths)[None, :]


def segment_lengths(segments: Sequence[int]) -> np.ndarray:
    """Length of each token's sentence."""
    return per_token(segments, segments)


# Between packed sentences the attention weights are 0 by construction; their mask only has to flood
# the CKKS noise there (about 1e-10), not hide a value, so it is 2^-10 of the usual width. The client's
# context product and the server's corrections then carry that much less mask across sentences, and
# a packed sentence is as precise as the same sentence alone.
CROSS_MASK_FACTOR = 2.0**-10


def attention_mask_factor(segments: Sequence[int]) -> np.ndarray:
    """(n, n) [k, i]: 1 inside a sentence, CROSS_MASK_FACTOR between sentences."""
    return np.where(same_segment(segments), 1.0, CROSS_MASK_FACTOR)
