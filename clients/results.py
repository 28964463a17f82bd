"""What every encrypted run reports besides its answer: the cost, the rounds and where it ran."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(kw_only=True)
class RunStats:
    """Shared by Result (classify) and TagResult (tag), so both report cost the same way."""

    latency_s: float
    upload_bytes: int
    download_bytes: int
    rounds: int
    n_tokens: int
    inference_id: str
    model_id: str
    replicas: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    restarts: int = 0  # inferences started again because the server could no longer resume one

    def to_dict(self) -> dict:
        """The answer's fields first (label, entities, ...), then these."""
        shared = [f.name for f in fields(RunStats)]
        names = [f.name for f in fields(self) if f.name not in shared] + shared
        return {k: getattr(self, k) for k in names}
