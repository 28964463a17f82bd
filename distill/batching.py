"""Tokenised datasets, length-bucketed batches and dynamic padding (shared by teacher and student)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """Token ids of a list of sentences (no padding) with their labels and optional soft targets."""

    ids: list[list[int]]
    labels: list[int]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_len: int) -> Encoded:
    out = tokenizer(list(texts), truncation=True, max_length=max_len, add_special_tokens=True)
    return Encoded(ids=[list(x) for x in out["input_ids"]], labels=list(labels), texts=list(texts))


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                     pool: int = 50) -> list[list[int]]:
    """Index batches of similar length: shuffle, sort within pools of `pool` batches, shuffle batches."""
    idx = list(range(len(lengths)))
    if not shuffle:
        idx.sort(key=lambda i: lengths[i])
        return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(idx)
    batches: list[list[int]] = []
    chunk = batch_size * pool
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start:start + chunk], key=lambda i: lengths[i])
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def iterate(data: Encoded, batches: list[list[int]], pad_id: int = 0
            ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    for b in batches:
        ids, mask = pad([data.ids[i] for i in b], pad_id)
        yield b, ids, mask, torch.tensor([data.labels[i] for i in b], dtype=torch.long)


class ThreadGovernor:
    """Picks one or `max_threads` torch threads by measuring, because the CPU is shared.

    With OpenMP, two threads on two cores that other processes also use can run 5-10x slower than one
    thread (each barrier waits for a descheduled thread). Every `probe_every` steps the other thread
    count is tried for one window of `window` steps, and the faster one is kept.
    """

    def __init__(self, max_threads: int, window: int = 8, probe_every: int = 80) -> None:
        import time as _time

        self._time = _time
        self.max_threads = max(1, int(max_threads))
        self.window, self.probe_every = window, probe_every
        self.threads = self.max_threads
        torch.set_num_threads(self.threads)
        self.recent: dict[int, float] = {}
        self.steps = 0
        self.probing_from: int | None = None
        self.since_probe = 0
        self.t0 = _time.time()

    def step(self) -> None:
        if self.max_threads == 1:
            return
        self.steps += 1
        if self.steps % self.window:
            return
        now = self._time.time()
        self.recent[self.threads] = (now - self.t0) / self.window
        self.t0 = now
        self.since_probe += self.window
        if self.probing_from is not None:
            other = self.probing_from
            self.probing_from = None
            best = min(self.recent, key=self.recent.get)
            if best != self.threads:
                self._set(other if best == other else best)
        elif self.since_probe >= self.probe_every or len(self.recent) < 2:
            self.probing_from = self.threads
            self.since_probe = 0
            self._set(1 if self.threads != 1 else self.max_threads)

    def _set(self, n: int) -> None:
        self.threads = n
        torch.set_num_threads(n)
