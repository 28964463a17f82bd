"""The encrypted inference engine: runs a compiled HE plan on CKKS ciphertexts, one round at a time.

No HTTP here. The service calls `start` with the client's encrypted embeddings and `resume` with each
refresh reply; between calls the engine keeps nothing: what it still needs travels in an authenticated
state blob that the service stores (any replica holding the same server secret can resume it).

This module is the facade; the work is split by job:
  he_models.weights      the model's weight kernels, encoded once at load
  he_models.corrections  the per-request mask-correction kernels (one table, one builder)
  he_models.masks        PRF masks and their limits
  he_models.state        the HMAC-authenticated state blob
  he_models.inputs       parsing client uploads (evaluation keys, fresh ciphertexts)
  he_models.bundle       the client bundle and its embedding-table cache
  he_models.parts        the heavy halves of each round
  he_models.assistant    the forked assistant process that runs one half
  he_models.rounds       the round state machine (see there for the four rounds per layer)
The server removes the masks' contributions with plaintext kernels, so the client only ever decrypts
masked values, and every polynomial (the 2Quad square, the quadratic GELU) is evaluated under HE.
"""

from __future__ import annotations

import threading
from pathlib import Path

from he_models import bundle
from he_models.assistant import Assistant, Splitter
from he_models.contracts import EngineError, EvalContext, StepOutput
from he_models.corrections import CorrectionKernels
from he_models.inputs import load_context
from he_models.kernels import Backend
from he_models.layout import Geometry, LayoutError
from he_models.masks import HEADROOM_BITS, MaskLimits, Masks, mask_limits
from he_models.parts import RoundParts
from he_models.plan import HEPlan, PlanError, compile_plan
from he_models.rounds import RoundMachine
from he_models.state import STATE_FORMAT, StateSealer
from he_models.weights import LayerMaps, WeightKernels

__all__ = ["HEADROOM_BITS", "STATE_FORMAT", "EncryptedEngine", "EngineError", "EvalContext", "StepOutput"]

MIN_SECRET_BYTES = 16


class EncryptedEngine:
    """One compiled model, served to any number of clients; start/resume are serialised by a lock."""

    def __init__(
        self, plan: HEPlan, server_secret: bytes, model_id: str, model_dir: Path | None = None, workers: int = 1
    ) -> None:
        if len(server_secret) < MIN_SECRET_BYTES:
            raise EngineError(f"server secret must be at least {MIN_SECRET_BYTES} bytes")
        self.plan = plan
        self.model_id = model_id
        self.model_dir = model_dir
        self.backend = Backend(plan.params)
        self.slots = plan.params.slots
        self.cfg = plan.config
        self.max_tokens = self.cfg.max_position
        self.workers = workers
        self.masks = Masks(server_secret, self.backend, mask_limits(plan.ranges, plan.mask_bits))
        self.kernels = WeightKernels(plan, self.backend)
        self.parts = RoundParts(plan, self.backend, self.kernels, CorrectionKernels(plan, self.backend), self.masks)
        self.splitter = Splitter(self.parts)
        sealer = StateSealer(server_secret, plan.model_hash, self.backend.context)
        self.rounds = RoundMachine(
            plan, self.backend, self.kernels, self.masks, sealer, self.splitter, self.geometry, self._labels
        )
        self._lock = threading.Lock()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        server_secret: bytes,
        mask_bits: int = 10,
        warm: tuple[int, ...] = (),
        workers: int = 1,
    ) -> EncryptedEngine:
        """Compile and encode the model. workers=2 forks an assistant process that takes half of
        every round's work (both cores for one query); workers=1 keeps everything in this process."""
        model_dir = Path(model_dir)
        try:
            plan = compile_plan(model_dir, mask_bits=mask_bits)
        except (PlanError, FileNotFoundError) as exc:
            raise EngineError(f"cannot serve {model_dir}: {exc}") from None
        engine = cls(plan, server_secret, model_dir.name, model_dir, workers=workers)
        engine.layer_maps()  # `warm` is accepted for compatibility: one set of kernels serves every length
        if workers > 1:  # forked after warm-up: shares the encoded maps
            engine.splitter.assistant = Assistant(engine.parts, engine.load_context)
        return engine

    def warm(self, n_tokens: int) -> None:
        """Encode the weight kernels for this sentence length's token block now (here and in the assistant)."""
        self.geometry(n_tokens)
        with self._lock:
            self.layer_maps()

    def close(self) -> None:
        """Stop the assistant process, if any; the engine keeps working alone."""
        self.splitter.close()

    @property
    def model_hash(self) -> str:
        return self.plan.model_hash

    @property
    def has_assistant(self) -> bool:
        """True while a forked assistant takes half of each round."""
        return self.splitter.assistant is not None

    @property
    def mask_limits(self) -> MaskLimits:
        """(mask half-width, bits of hiding) per masked tensor."""
        return self.masks.limits

    def set_mask_bits(self, bits: int) -> None:
        """Change the masks' width (2^bits times each tensor's range, capped by the headroom)."""
        self.plan.mask_bits = bits
        self.masks.limits = mask_limits(self.plan.ranges, bits)

    def layer_maps(self) -> list[LayerMaps]:
        """The encoded weight kernels of every layer (built on first use)."""
        return self.kernels.maps()

    def chunk_geometry(self) -> Geometry:
        return self.kernels.chunk_geometry()

    # -- bundle and keys -----------------------------------------------------------------------
    def client_bundle(self) -> dict:
        """JSON-able description for the client (see docs/engine_api.md)."""
        return bundle.client_bundle(self.plan, self.model_id, self.model_dir)

    def client_bundle_files(self) -> dict[str, Path]:
        """Tokenizer and embedding tables: what the client needs to embed locally."""
        return bundle.client_bundle_files(self.plan, self.model_dir)

    def _labels(self) -> list[str]:
        return bundle.labels(self.plan, self.model_dir)

    def load_context(self, public_keys: bytes) -> EvalContext:
        """Parse a client's evaluation keys; refuse secret keys, other parameters or missing steps."""
        return load_context(self.plan, self.backend, public_keys)

    # -- protocol ------------------------------------------------------------------------------
    def geometry(self, n_tokens: int) -> Geometry:
        """The packing for a sentence of n_tokens; EngineError for 0, non-integers or too many."""
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
            raise EngineError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        if n_tokens > self.max_tokens:
            raise EngineError(f"{n_tokens} tokens exceed this model's maximum of {self.max_tokens}")
        try:
            return Geometry.for_tokens(
                n_tokens, self.cfg.hidden_size, self.cfg.num_heads, self.cfg.intermediate_size, self.slots
            )
        except LayoutError as exc:
            raise EngineError(str(exc)) from None

    def start(self, ctx: EvalContext, inference_id: str, n_tokens: int, inputs: list[bytes]) -> StepOutput:
        """Round 1 from the client's encrypted embeddings (fresh, feature-major, one per chunk)."""
        with self._lock:
            return self.rounds.start(ctx, inference_id, n_tokens, inputs)

    def resume(
        self,
        ctx: EvalContext,
        state: bytes,
        replies: list[bytes],
        *,
        inference_id: str | None = None,
        round_no: int | None = None,
    ) -> StepOutput:
        """The next round from the state of the last one and the client's replies to it."""
        with self._lock:
            return self.rounds.resume(ctx, state, replies, inference_id=inference_id, round_no=round_no)
