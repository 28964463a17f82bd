"""Counts the CKKS operations the engine performs, so speed work is judged by counts, not noisy times.

`CountingEvaluator` and `CountingEncoder` wrap a SEAL evaluator and encoder and forward every call; a
`Counter` (the one in use is selected with `counting(...)`) records how many rotations, plaintext
multiplications, ciphertext multiplications, encodings and additions ran, and how long each kind
took, per named section (a round, a correction kernel). Nothing is counted when no counter is active,
so a serving engine pays one attribute lookup per call.

`multiply_plain_floor` is the least number of plaintext multiplications the model's linear maps need
when every multiplication uses all slots: the yardstick the engine's own count is reported against.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

KINDS = ("rotations", "multiply_plain", "multiply", "encodes", "additions", "rescales", "relins", "mod_switches")
REPORTED = ("rotations", "multiply_plain", "multiply", "encodes", "additions")
OFF_PATH = "precompute"  # work done while the client is busy: counted, but not on the critical path

# SEAL method name -> the kind it counts as
_EVALUATOR_KINDS = {
    "rotate_vector": "rotations",
    "rotate_vector_inplace": "rotations",
    "rotate_rows": "rotations",
    "rotate_rows_inplace": "rotations",
    "multiply_plain": "multiply_plain",
    "multiply_plain_inplace": "multiply_plain",
    "multiply": "multiply",
    "multiply_inplace": "multiply",
    "square": "multiply",
    "square_inplace": "multiply",
    "add": "additions",
    "add_inplace": "additions",
    "sub": "additions",
    "sub_inplace": "additions",
    "add_plain": "additions",
    "add_plain_inplace": "additions",
    "sub_plain": "additions",
    "sub_plain_inplace": "additions",
    "rescale_to_next": "rescales",
    "rescale_to_next_inplace": "rescales",
    "relinearize": "relins",
    "relinearize_inplace": "relins",
    "mod_switch_to": "mod_switches",
    "mod_switch_to_inplace": "mod_switches",
}


@dataclass
class Counter:
    """Operation counts and seconds per kind, overall and per section."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    sections: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: dict.fromkeys(KINDS, 0)))
    _stack: list[str] = field(default_factory=list)

    def record(self, kind: str, seconds: float) -> None:
        """One operation of `kind`, attributed to every section open around it (a round and its parts)."""
        self.counts[kind] += 1
        self.seconds[kind] += seconds
        for name in dict.fromkeys(self._stack):
            self.sections[name][kind] += 1

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    def add(self, other: Counter) -> None:
        """Fold another process's counts (the assistant's) into this one."""
        for k in KINDS:
            self.counts[k] += other.counts[k]
            self.seconds[k] += other.seconds[k]
        for name, counts in other.sections.items():
            for k in KINDS:
                self.sections[name][k] += counts[k]

    def summary(self, section: str | None = None) -> dict:
        """The five reported kinds, as plain ints: overall, or of one section."""
        counts = self.counts if section is None else self.sections.get(section, dict.fromkeys(KINDS, 0))
        return {k: int(counts[k]) for k in REPORTED}

    def critical(self, off_path: tuple[str, ...] = (OFF_PATH,)) -> dict:
        """The reported kinds minus the operations of sections off the critical path (precomputation)."""
        total = self.summary()
        for name in off_path:
            for k, v in self.summary(name).items():
                total[k] -= v
        return total

    def to_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "seconds": {k: round(v, 6) for k, v in self.seconds.items()},
            "sections": {k: dict(v) for k, v in self.sections.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Counter:
        c = cls()
        c.counts.update(d.get("counts", {}))
        c.seconds.update(d.get("seconds", {}))
        for name, counts in d.get("sections", {}).items():
            c.sections[name].update(counts)
        return c


_local = threading.local()


def active() -> Counter | None:
    return getattr(_local, "counter", None)


@contextlib.contextmanager
def counting(counter: Counter | None = None) -> Iterator[Counter]:
    """Count every operation of the wrapped evaluators/encoders in this thread while the block runs."""
    counter = counter if counter is not None else Counter()
    previous = active()
    _local.counter = counter
    try:
        yield counter
    finally:
        _local.counter = previous


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Attribute the operations of the block to `name` (no-op when nothing is being counted)."""
    counter = active()
    if counter is None:
        yield
        return
    with counter.section(name):
        yield


def sectioned(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is a section `name`."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with section(name):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


class _Counting:
    """Forwards attribute access to the wrapped SEAL object, timing and counting the calls it knows."""

    _kinds: dict[str, str] = {}

    def __init__(self, inner) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        kind = self._kinds.get(name)
        if kind is None:
            return attr

        def call(*args, **kwargs):
            counter = active()
            if counter is None:
                return attr(*args, **kwargs)
            start = time.perf_counter()
            out = attr(*args, **kwargs)
            counter.record(kind, time.perf_counter() - start)
            return out

        return call


class CountingEvaluator(_Counting):
    _kinds = _EVALUATOR_KINDS


class CountingEncoder(_Counting):
    _kinds = {"encode": "encodes"}


def install(backend) -> None:
    """Wrap a Backend's evaluator and encoder so that counting() sees their calls (idempotent)."""
    if not isinstance(backend.evaluator, CountingEvaluator):
        backend.evaluator = CountingEvaluator(backend.evaluator)
    if not isinstance(backend.encoder, CountingEncoder):
        backend.encoder = CountingEncoder(backend.encoder)


def multiply_plain_floor(plan, n_tokens: int, corrections: bool = True) -> int:
    """Fewest slot-filling plaintext multiplications for one n-token inference.

    Each weight matrix (fin x fout) applied to n tokens is n * fin * fout scalar products; one plaintext
    multiplication performs `slots` of them at full slot use. With `corrections`, the attention
    products' mask corrections count the same way (heads * n * n * head_dim products each, two per
    client-aided product, two products per layer). The classifier head adds one per label.
    """
    cfg = plan.config
    slots = plan.params.slots
    hidden, heads = cfg.hidden_size, cfg.num_heads
    dh = hidden // heads
    total = 0
    for layer in plan.layers:
        for weight in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2):
            fin, fout = weight.shape
            total += math.ceil(n_tokens * fin * fout / slots)
        if corrections:
            total += 4 * math.ceil(heads * n_tokens * n_tokens * dh / slots)
    total += cfg.num_labels * math.ceil(n_tokens * hidden / slots)
    return total
