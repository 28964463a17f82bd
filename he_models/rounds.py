"""The round state machine: what the server computes between two client replies.

Per encoder layer there are four rounds (round r = 4 * layer + kind + 1):
  kind 0 scores   server sends Q+rQ, K+rK          client returns s(Q+rQ)(K+rK)^T and K+rK (token-major)
  kind 1 context  server sends A+rA, V+rV          client returns (A+rA)(V+rV) and A+rA
  kind 2 refresh  server sends h+rh                client re-encrypts it at the top level
  kind 3 refresh  server sends y+ry                client re-encrypts it at the top level
After the last layer the server sends the encrypted logits. Each step opens the state blob of the
round just answered, checks it against the caller's (inference, round), and seals the next one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tenseal.sealapi as seal

from he_models import opcount, protocol_spec
from he_models.assistant import Splitter
from he_models.ckks import encode_vector, save_bytes
from he_models.contracts import EngineError, EvalContext, StepOutput
from he_models.inputs import load_fresh
from he_models.kernels import Backend
from he_models.layout import PROTOCOL, Geometry
from he_models.masks import Masks
from he_models.packing import (
    attention_mask_factor,
    check_segments,
    pooling,
    same_segment,
    score_weights,
    segment_lengths,
)
from he_models.plan import HEPlan
from he_models.state import RoundHeader, StateSealer
from he_models.weights import WeightKernels

ROUNDS_PER_LAYER = 4
MAX_INFERENCE_ID = 128
Saved = dict[str, list[seal.Ciphertext]]


class RoundMachine:
    """start() and resume() of the protocol, for one engine's plan, kernels, masks and state sealer."""

    def __init__(
        self,
        plan: HEPlan,
        backend: Backend,
        weights: WeightKernels,
        masks: Masks,
        sealer: StateSealer,
        splitter: Splitter,
        geometry: Callable[[int], Geometry],
        labels: Callable[[], list[str]],
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.weights = weights
        self.masks = masks
        self.sealer = sealer
        self.splitter = splitter
        self.geometry = geometry
        self.labels = labels

    # -- entry points --------------------------------------------------------------------------
    def start(
        self,
        ctx: EvalContext,
        inference_id: str,
        n_tokens: int,
        inputs: list[bytes],
        segments: list[int] | tuple[int, ...] | None = None,
    ) -> StepOutput:
        if not isinstance(inference_id, str) or not inference_id or len(inference_id) > MAX_INFERENCE_ID:
            raise EngineError(f"inference id must be 1..{MAX_INFERENCE_ID} characters")
        geo = self.geometry(n_tokens)
        segs = self.check_segments(segments, geo)
        if segs and self.plan.config.task == "token-classification":
            raise EngineError("packed sentences are for text classification; tag one sentence per inference")
        with opcount.section("start"):
            raw = load_fresh(self.backend, inputs, geo.fm_cts(geo.hidden), "input")
            return self.begin_layer(ctx, inference_id, geo, 0, raw, 1, segs)

    @staticmethod
    def check_segments(segments: list[int] | tuple[int, ...] | None, geo: Geometry) -> tuple[int, ...]:
        """() for one sentence; the lengths of packed sentences, which must fill the n tokens exactly."""
        if segments is None or len(segments) <= 1:
            if segments is not None and len(segments) == 1 and int(segments[0]) != geo.n:
                raise EngineError(f"segment {list(segments)} does not cover the {geo.n} tokens")
            return ()
        try:
            return check_segments(segments, geo.n)
        except (TypeError, ValueError) as exc:
            raise EngineError(str(exc)) from None

    def resume(
        self,
        ctx: EvalContext,
        state: bytes,
        replies: list[bytes],
        *,
        inference_id: str | None = None,
        round_no: int | None = None,
    ) -> StepOutput:
        header, saved = self.sealer.open_blob(state)
        if inference_id is not None and inference_id != header.inference_id:
            raise EngineError(
                f"reply for inference {inference_id!r} does not match the stored inference {header.inference_id!r}"
            )
        if round_no is not None and round_no != header.round:
            raise EngineError(
                f"reply to round {round_no} but inference {header.inference_id!r} "
                f"awaits round {header.round} (replayed or out-of-order round)"
            )
        if header.key != ctx.fingerprint:
            raise EngineError("reply uses different evaluation keys than the inference started with")
        with opcount.section(f"r{header.round}:{header.kind}"):
            return self.step(ctx, header, saved, replies)

    def step(self, ctx: EvalContext, header: RoundHeader, saved: Saved, replies: list[bytes]) -> StepOutput:
        """The server's work between the reply to round `header.round` and the next message."""
        geo = Geometry.from_dict(header.geometry)
        layer, kind_index = divmod(header.round - 1, ROUNDS_PER_LAYER)
        inference, r, segs = header.inference_id, header.round, header.segments
        if kind_index == 0:
            return self.after_scores(ctx, inference, geo, layer, r, saved, replies, segs)
        if kind_index == 1:
            return self.after_context(ctx, inference, geo, layer, r, saved, replies, segs)
        if kind_index == 2:
            return self.after_attention_refresh(ctx, inference, geo, layer, r, replies, segs)
        return self.after_ffn_refresh(ctx, inference, geo, layer, r, replies, segs)

    def emit(
        self,
        ctx: EvalContext,
        inference: str,
        geo: Geometry,
        round_no: int,
        kind: str,
        to_client: list[bytes],
        keep: Saved,
        extra_meta: dict | None = None,
        segments: tuple[int, ...] = (),
    ) -> StepOutput:
        """The StepOutput of a round the client must answer, with the sealed state it resumes from."""
        header = RoundHeader(
            inference_id=inference,
            round=round_no,
            kind=kind,
            geometry=geo.to_dict(),
            key=ctx.fingerprint,
            segments=segments,
        )
        meta = {
            "geometry": geo.to_dict(),
            "protocol": PROTOCOL,
            "tensors": protocol_spec.round_tensors(kind, geo.to_dict()),
            **(extra_meta or {}),
        }
        return StepOutput(
            inference_id=inference,
            round=round_no,
            done=False,
            to_client=to_client,
            state=self.sealer.seal_blob(header, keep),
            kind=kind,
            meta=meta,
        )

    # -- the rounds ----------------------------------------------------------------------------
    def begin_layer(
        self,
        ctx: EvalContext,
        inference: str,
        geo: Geometry,
        layer: int,
        raw: list[seal.Ciphertext],
        round_no: int,
        segs: tuple[int, ...] = (),
    ) -> StepOutput:
        """Q, K (sent masked), V and the residual (kept): the scores round."""
        parts = self.splitter.parts

        def whole() -> tuple[list[seal.Ciphertext], list[seal.Ciphertext]]:
            both = parts.qkv(ctx, geo, layer, raw, "all")
            return both[: 2 * len(raw)], both[2 * len(raw) :]

        remote = ("qkv", {"geo": geo, "layer": layer, "raw": raw, "which": "v"})
        q_k, v_x = self.splitter.split(ctx, remote, lambda: parts.qkv(ctx, geo, layer, raw, "qk"), whole)
        n_fm = len(raw)
        q, k = q_k[:n_fm], q_k[n_fm:]
        v, x_res = v_x[:n_fm], v_x[n_fm:]
        to_client = self.masks.mask_all(q, inference, round_no, f"{layer}.q") + self.masks.mask_all(
            k, inference, round_no, f"{layer}.k"
        )
        return self.emit(
            ctx,
            inference,
            geo,
            round_no,
            "scores",
            to_client,
            {"x_res": x_res, "q": q, "v": v},
            {"sigma": self.plan.layers[layer].score_factor(geo.n)},
            segs,
        )

    def after_scores(
        self,
        ctx: EvalContext,
        inference: str,
        geo: Geometry,
        layer: int,
        r: int,
        saved: Saved,
        replies: list[bytes],
        segs: tuple[int, ...] = (),
    ) -> StepOutput:
        """Scores minus the corrections c1, c2, shifted and squared (2Quad): the context round.

        Packed sentences (segs): the client's scores are multiplied by packing.score_weights (zero
        between sentences, each sentence's own 1/sqrt(length)), the corrections likewise, and the
        shift is added inside each sentence's block only, so attention stays within each sentence."""
        be = self.backend
        n_sl = geo.sl_cts
        fresh = load_fresh(be, replies, 2 * n_sl, "scores reply")
        s_client, z = fresh[:n_sl], fresh[n_sl:]
        task = {"geo": geo, "layer": layer, "inference": inference, "r": r, "cts": z, "segments": segs}
        c1_out, c2_out = self.splitter.split(
            ctx,
            ("c2", task),
            lambda: self.splitter.parts.correction(ctx, "c1", geo, layer, inference, r, saved["q"], segs),
        )
        shift_sl = geo.pack_sl(self.score_shift(geo, layer, segs))
        if segs:
            weights = geo.pack_sl(np.broadcast_to(score_weights(segs)[None], (geo.heads, geo.n, geo.n)))
            s_client = [self.times_plain(ct, w) for ct, w in zip(s_client, weights, strict=True)]
        a = []
        for idx in range(n_sl):
            scores = be.sub(be.sub(s_client[idx], c1_out[idx]), c2_out[idx])
            scores = be.add_plain(scores, shift_sl[idx])
            a.append(be.square(scores, ctx.relin))
        to_client = self.mask_attention(a, inference, r + 1, layer, geo, segs) + self.masks.mask_all(
            saved["v"], inference, r + 1, f"{layer}.v"
        )
        return self.emit(
            ctx,
            inference,
            geo,
            r + 1,
            "context",
            to_client,
            {"x_res": saved["x_res"], "v": saved["v"]},
            {"context_scale": 1.0 / self.plan.layers[layer].a_gain},
            segs,
        )

    def mask_attention(
        self, a: list[seal.Ciphertext], inference: str, r: int, layer: int, geo: Geometry, segs: tuple[int, ...]
    ) -> list[bytes]:
        """A + rA for the client; between packed sentences rA is narrower (packing.attention_mask_factor)."""
        masks = self.masks.draw(inference, r, f"{layer}.a", len(a))
        if segs:
            factor = np.ones(len(a) * geo.slots)
            factor[geo.sl_index().ravel()] = np.broadcast_to(
                attention_mask_factor(segs)[None], (geo.heads, geo.n, geo.n)
            ).ravel()
            masks = [m * factor[c * geo.slots : (c + 1) * geo.slots] for c, m in enumerate(masks)]
        return [self.masks.masked_out(c, m) for c, m in zip(a, masks, strict=True)]

    def score_shift(self, geo: Geometry, layer: int, segs: tuple[int, ...]) -> np.ndarray:
        """2Quad's shift [h, k, i]: c / sqrt(z n) everywhere, or per sentence inside its block only."""
        L = self.plan.layers[layer]
        if not segs:
            return np.broadcast_to(L.shift(geo.n)[:, None, None], (geo.heads, geo.n, geo.n))
        lengths = segment_lengths(segs)  # of each query's sentence
        per_query = np.stack([L.shift(int(m)) for m in lengths], axis=1)  # [h, i]
        return same_segment(segs)[None] * per_query[:, None, :]

    def times_plain(self, ct: seal.Ciphertext, values: np.ndarray) -> seal.Ciphertext:
        """ct * values (slot-wise), rescaled, with the scale it came with."""
        be = self.backend
        scale = ct.scale
        pt = encode_vector(be.encoder, values, ct.parms_id(), be.last_prime(be.level(ct)))
        out = seal.Ciphertext()
        be.evaluator.multiply_plain(ct, pt, out)
        be.evaluator.rescale_to_next_inplace(out)
        out.scale = scale
        return out

    def after_context(
        self,
        ctx: EvalContext,
        inference: str,
        geo: Geometry,
        layer: int,
        r: int,
        saved: Saved,
        replies: list[bytes],
        segs: tuple[int, ...] = (),
    ) -> StepOutput:
        """Context minus c3, c4, through the output projection plus the residual: h, sent for refresh."""
        be = self.backend
        n_fm, n_sl = geo.fm_cts(geo.hidden), geo.sl_cts
        fresh = load_fresh(be, replies, n_fm + n_sl, "context reply")
        av_client, a_masked = fresh[:n_fm], fresh[n_fm:]
        task = {"geo": geo, "layer": layer, "inference": inference, "r": r, "cts": saved["v"], "segments": segs}
        c3_out, c4_out = self.splitter.split(
            ctx, ("c4", task), lambda: self.splitter.parts.correction(ctx, "c3", geo, layer, inference, r, a_masked)
        )
        context = [be.sub(be.sub(av_client[i], c3_out[i]), c4_out[i]) for i in range(n_fm)]
        maps = self.weights.maps()[layer]
        out = self.weights.add_bias(self.weights.chunked(maps.o, context, ctx.galois), self.plan.layers[layer].bo, geo)
        h_raw = [be.add(x, o) for x, o in zip(saved["x_res"], out, strict=True)]
        to_client = self.masks.mask_all(h_raw, inference, r + 1, f"{layer}.h")
        return self.emit(ctx, inference, geo, r + 1, "refresh", to_client, {}, None, segs)

    def after_attention_refresh(
        self,
        ctx: EvalContext,
        inference: str,
        geo: Geometry,
        layer: int,
        r: int,
        replies: list[bytes],
        segs: tuple[int, ...] = (),
    ) -> StepOutput:
        """The norm and the FFN on the refreshed h (the FFN split in halves): y, sent for refresh."""
        be = self.backend
        n_fm = geo.fm_cts(geo.hidden)
        h_raw = self.masks.unmask(load_fresh(be, replies, n_fm, "refresh reply"), inference, r, f"{layer}.h", geo)
        maps = self.weights.maps()[layer]
        L = self.plan.layers[layer]
        parts = self.splitter.parts

        def norm() -> list[seal.Ciphertext]:
            return self.weights.add_bias(self.weights.chunked(maps.n1, h_raw, ctx.galois), L.n1_shift, geo)

        if geo.per_chunk(geo.intermediate) < 2:  # one intermediate ciphertext per chunk: nothing to split
            h_res = norm()
            f = parts.ffn(ctx, geo, layer, h_raw, None)
        else:
            local, f_remote = self.splitter.split(
                ctx,
                ("ffn", {"geo": geo, "layer": layer, "h_raw": h_raw, "half": 1}),
                lambda: norm() + parts.ffn(ctx, geo, layer, h_raw, 0),
                lambda: (norm() + parts.ffn(ctx, geo, layer, h_raw, None), None),
            )
            h_res, f_local = local[:n_fm], local[n_fm:]
            f = f_local if f_remote is None else [be.add(a, b) for a, b in zip(f_local, f_remote, strict=True)]
        f = self.weights.add_bias(f, L.b2, geo)
        y_raw = [be.add(a, b) for a, b in zip(h_res, f, strict=True)]
        to_client = self.masks.mask_all(y_raw, inference, r + 1, f"{layer}.y")
        return self.emit(ctx, inference, geo, r + 1, "refresh", to_client, {}, None, segs)

    def after_ffn_refresh(
        self,
        ctx: EvalContext,
        inference: str,
        geo: Geometry,
        layer: int,
        r: int,
        replies: list[bytes],
        segs: tuple[int, ...] = (),
    ) -> StepOutput:
        """The refreshed y starts the next layer, or after the last one gives the logits."""
        n_fm = geo.fm_cts(geo.hidden)
        y_raw = self.masks.unmask(
            load_fresh(self.backend, replies, n_fm, "refresh reply"), inference, r, f"{layer}.y", geo
        )
        if layer + 1 < len(self.plan.layers):
            return self.begin_layer(ctx, inference, geo, layer + 1, y_raw, r + 1, segs)
        if self.plan.config.task == "token-classification":
            return self.token_logits(ctx, inference, geo, y_raw, r)
        if segs:
            return self.segment_logits(ctx, inference, geo, y_raw, r, segs)
        return self.logits(ctx, inference, geo, y_raw, r)

    def token_logits(
        self, ctx: EvalContext, inference: str, geo: Geometry, y_raw: list[seal.Ciphertext], r: int
    ) -> StepOutput:
        """The per-token classifier, no pooling: logits (n, labels) feature-major (label c where feature c
        would be), one kernel per chunk on the fresh last hidden state, dropped to the last level."""
        cfg = self.plan.config
        out = self.weights.chunked(self.weights.token_head(), y_raw, ctx.galois)
        out = self.weights.add_bias(out, self.plan.head_b, geo)
        kind = protocol_spec.final_kind(cfg.task)
        return StepOutput(
            inference_id=inference,
            round=r + 1,
            done=True,
            to_client=[save_bytes(self.backend.mod_to(ct, 0)) for ct in out],
            state=None,
            kind=kind,
            meta={
                "num_labels": cfg.num_labels,
                "labels": self.labels(),
                "protocol": PROTOCOL,
                "geometry": geo.to_dict(),
                "tensors": protocol_spec.round_tensors(kind, geo.to_dict(), cfg.num_labels),
            },
        )

    def logits(
        self, ctx: EvalContext, inference: str, geo: Geometry, y_raw: list[seal.Ciphertext], r: int
    ) -> StepOutput:
        """Pooling and the classifier head, one ciphertext per label (its value in every slot)."""
        cfg = self.plan.config
        pool = np.zeros((geo.n, 1))
        if cfg.pooling == "mean":
            pool[:, 0] = 1.0 / geo.n
        else:
            pool[0, 0] = 1.0
        outputs = []
        for c in range(cfg.num_labels):
            weights = geo.pack_fm(pool * self.plan.head_w[:, c][None, :])
            outputs.append(save_bytes(self._label_logit(ctx, y_raw, weights, self.plan.head_b[c])))
        return StepOutput(
            inference_id=inference,
            round=r + 1,
            done=True,
            to_client=outputs,
            state=None,
            kind="logits",
            meta={"num_labels": cfg.num_labels, "labels": self.labels(), "protocol": PROTOCOL},
        )

    def _label_logit(
        self,
        ctx: EvalContext,
        y_raw: list[seal.Ciphertext],
        weights: list[np.ndarray],
        bias: float,
        keep_level: bool = False,
    ) -> seal.Ciphertext:
        be = self.backend
        terms = []
        for idx in range(len(y_raw)):
            pt = encode_vector(be.encoder, weights[idx], y_raw[idx].parms_id(), be.last_prime(be.top))
            prod = seal.Ciphertext()
            be.evaluator.multiply_plain(y_raw[idx], pt, prod)
            be.evaluator.rescale_to_next_inplace(prod)
            prod.scale = self.plan.params.scale
            terms.append(prod)
        total = terms[0]
        for t in terms[1:]:
            total = be.add(total, t)
        total = be.sum_slots(total, ctx.galois)
        total = be.add_plain(total, np.full(be.slots, bias))
        return total if keep_level else be.mod_to(total, 0)

    def segment_logits(
        self, ctx: EvalContext, inference: str, geo: Geometry, y_raw: list[seal.Ciphertext], r: int, segs: tuple
    ) -> StepOutput:
        """Packed sentences: one ciphertext per label whose slot s holds sentence s's logit."""
        be = self.backend
        cfg = self.plan.config
        pool = pooling(segs, mean=cfg.pooling == "mean")
        outputs = []
        for c in range(cfg.num_labels):
            total = None
            for s in range(len(segs)):
                weights = geo.pack_fm(pool[:, s : s + 1] * self.plan.head_w[:, c][None, :])
                every = self._label_logit(ctx, y_raw, weights, self.plan.head_b[c], keep_level=True)
                one_hot = np.zeros(be.slots)
                one_hot[s] = 1.0
                picked = self.times_plain(every, one_hot)
                total = picked if total is None else be.add(total, picked)
            assert total is not None
            outputs.append(save_bytes(be.mod_to(total, 0)))
        meta = {"num_labels": cfg.num_labels, "labels": self.labels(), "protocol": PROTOCOL, "segments": list(segs)}
        return StepOutput(
            inference_id=inference, round=r + 1, done=True, to_client=outputs, state=None, kind="logits", meta=meta
        )
