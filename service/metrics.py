"""Prometheus metrics of one API process (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
ENGINE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "cipherbert_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "cipherbert_http_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.rounds = Counter(
            "cipherbert_rounds_total", "engine steps served (start + every round)", ["model", "kind"], registry=r
        )
        self.inferences = Counter(
            "cipherbert_inferences_total", "inferences by outcome", ["model", "outcome"], registry=r
        )
        self.bytes = Counter("cipherbert_bytes_total", "ciphertext/context bytes", ["direction", "what"], registry=r)
        self.errors = Counter("cipherbert_errors_total", "error responses by code", ["code"], registry=r)
        self.engine = Histogram(
            "cipherbert_engine_seconds", "time in the engine pool", ["op"], buckets=ENGINE_BUCKETS, registry=r
        )
        self.inflight = Gauge("cipherbert_inflight", "engine jobs queued or running", registry=r)
        self.ctx_loads = Counter("cipherbert_context_loads_total", "evaluation contexts loaded by workers", registry=r)
