"""The encrypted inference engine: runs a compiled HE plan on CKKS ciphertexts, one round at a time.

No HTTP here. The service calls `start` with the client's encrypted embeddings and `resume` with each
refresh reply; between calls the engine keeps nothing: what it still needs travels in an authenticated
state blob that the service stores (any replica holding the same server secret can resume it).

Per encoder layer there are four rounds (see README, "Protocol"):
  1 scores   server sends Q+rQ, K+rK          client returns s(Q+rQ)(K+rK)^T and K+rK (token-major)
  2 context  server sends A+rA, V+rV          client returns (A+rA)(V+rV) and A+rA
  3 refresh  server sends h+rh                client re-encrypts it at the top level
  4 refresh  server sends y+ry                client re-encrypts it at the top level
The server removes the masks' contributions with plaintext kernels, so the client only ever decrypts
masked values, and every polynomial (the 2Quad square, the quadratic GELU) is evaluated under HE.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import multiprocessing
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from he_models.ckks import CKKSError, encode_vector, load_ciphertext, load_into, save_bytes, unpack_eval_keys
from he_models import protocol_spec
from he_models.errors import ClientInputError
from he_models.kernels import (
    Backend,
    EncodedMap,
    apply_map,
    build_map,
    build_map_fewest_rotations,
    encode_map,
    plan_map_fewest_rotations,
    subset_map,
)
from he_models.layout import CHUNK, PROTOCOL, Geometry, LayoutError
from he_models.plan import BABY_STEPS, HEPlan, PlanError, compile_plan
from he_models.wire import WireError, pack_frames, unpack_frames

STATE_FORMAT = "cipherbert-engine-state/1"
HEADROOM_BITS = 18  # base prime 55 bits - scale 36 bits - 1: |value| at the last level must stay below 2^18


class EngineError(ClientInputError):
    """Input the engine refuses: wrong parameters, level or count, secret keys, replays, too many tokens."""


@dataclass
class EvalContext:
    relin: seal.RelinKeys
    galois: seal.GaloisKeys
    fingerprint: str
    steps: list[int]
    nbytes: int
    raw: bytes = field(default=b"", repr=False)  # kept to hand the keys to the assistant process once


@dataclass
class StepOutput:
    inference_id: str
    round: int
    done: bool
    to_client: list[bytes]
    state: bytes | None
    kind: str
    meta: dict = field(default_factory=dict)


@dataclass
class _LayerMaps:
    qkv: EncodedMap  # one map, three outputs: the baby rotations of the input are shared
    x_res: EncodedMap | None
    o: EncodedMap
    n1: EncodedMap
    ffn1: EncodedMap
    ffn2: EncodedMap


def _fm_triplets(chunk: Geometry, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Triplets of x @ weight over one feature-major chunk (32 token slots)."""
    fin, fout = weight.shape
    t = np.arange(CHUNK)[:, None, None]
    i = np.arange(fin)[None, :, None]
    j = np.arange(fout)[None, None, :]
    shape = (CHUNK, fin, fout)
    out_slots = np.broadcast_to(chunk.fm_slot(t, j, fout), shape)
    in_slots = np.broadcast_to(chunk.fm_slot(t, i, fin), shape)
    weights = np.broadcast_to(weight[None], shape)
    return out_slots, in_slots, weights


def _elementwise_triplets(chunk: Geometry, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = chunk.fm_index(len(scale))
    return idx, idx, np.broadcast_to(scale[None, :], idx.shape)


class EncryptedEngine:
    def __init__(self, plan: HEPlan, server_secret: bytes, model_id: str, model_dir: Path | None = None,
                 workers: int = 1) -> None:
        if len(server_secret) < 16:
            raise EngineError("server secret must be at least 16 bytes")
        self.plan = plan
        self.model_id = model_id
        self.model_dir = model_dir
        self._secret = server_secret
        self.backend = Backend(plan.params)
        self.slots = plan.params.slots
        self.cfg = plan.config
        self.max_tokens = self.cfg.max_position
        self._maps: list[_LayerMaps] | None = None
        self.mask_limits = self._mask_limits()
        self.workers = workers
        self._assistant: _Assistant | None = None
        self._layouts: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: str | Path, server_secret: bytes, mask_bits: int = 10,
             warm: tuple[int, ...] = (), workers: int = 1) -> "EncryptedEngine":
        """Compile and encode the model. workers=2 forks an assistant process that takes half of
        every round's work (both cores for one query); workers=1 keeps everything in this process."""
        model_dir = Path(model_dir)
        try:
            plan = compile_plan(model_dir, mask_bits=mask_bits)
        except (PlanError, FileNotFoundError) as exc:
            raise EngineError(f"cannot serve {model_dir}: {exc}") from None
        engine = cls(plan, server_secret, model_dir.name, model_dir, workers=workers)
        engine._layer_maps()  # `warm` is accepted for compatibility: one set of kernels serves every length
        if workers > 1:
            engine._assistant = _Assistant(engine)  # forked after warm-up: shares the encoded maps
        return engine

    def warm(self, n_tokens: int) -> None:
        """Encode the weight kernels for this sentence length's token block now (here and in the assistant)."""
        self.geometry(n_tokens)
        with self._lock:
            self._layer_maps()

    def close(self) -> None:
        if self._assistant is not None:
            self._assistant.close()
            self._assistant = None

    @property
    def model_hash(self) -> str:
        return self.plan.model_hash

    def _mask_limits(self) -> dict[str, tuple[float, float]]:
        """(mask half-width, bits of hiding) per masked tensor, capped by the last level's headroom."""
        limits = {}
        cap = 2.0 ** HEADROOM_BITS
        for name, rng in self.plan.ranges.items():
            width = min(rng * 2.0 ** self.plan.mask_bits, cap - rng)
            limits[name] = (width, math.log2(max(width / rng, 1.0)))
        return limits

    def chunk_geometry(self) -> Geometry:
        return Geometry(n=CHUNK, n_p=CHUNK, hidden=self.cfg.hidden_size, heads=self.cfg.num_heads,
                        intermediate=self.cfg.intermediate_size, slots=self.slots)

    def _layer_maps(self) -> list[_LayerMaps]:
        """Weight kernels for one 32-token chunk, encoded once at load; longer inputs apply them per chunk."""
        if self._maps is not None:
            return self._maps
        geo = self.chunk_geometry()
        be, s = self.backend, self.plan.params.scale
        top = be.top
        fm_h, fm_i = geo.fm_cts(geo.hidden), geo.fm_cts(geo.intermediate)
        square_scale_l2 = s * s / be.last_prime(2)
        babies = self.plan.block_babies(CHUNK)

        def linear(weight: np.ndarray, n_in: int, n_out: int, level: int, in_scale: float) -> EncodedMap:
            dmap = build_map_fewest_rotations(*_fm_triplets(geo, weight), n_in, n_out, self.slots, CHUNK, babies)
            return encode_map(be, dmap, level, in_scale, s)

        def stacked(weights: list[np.ndarray], level: int) -> EncodedMap:
            """Several maps of the same input, each output in its own ciphertexts, sharing baby steps."""
            parts = [_fm_triplets(geo, w) for w in weights]
            out = np.concatenate([(p[0] + i * fm_h * self.slots).ravel() for i, p in enumerate(parts)])
            inp = np.concatenate([p[1].ravel() for p in parts])
            wts = np.concatenate([p[2].ravel() for p in parts])
            dmap = build_map_fewest_rotations(out, inp, wts, fm_h, len(weights) * fm_h, self.slots, CHUNK, babies)
            return encode_map(be, dmap, level, s, s)

        def elementwise(scale: np.ndarray, level: int) -> EncodedMap:
            dmap = build_map(*_elementwise_triplets(geo, scale), fm_h, fm_h, self.slots, CHUNK, BABY_STEPS)
            return encode_map(be, dmap, level, s, s)

        maps = []
        for layer in self.plan.layers:
            maps.append(_LayerMaps(
                qkv=stacked([layer.wq, layer.wk, layer.wv], top),
                x_res=None if layer.in_scale is None else elementwise(layer.in_scale, top),
                o=linear(layer.wo, fm_h, fm_h, 1, s),
                n1=elementwise(layer.n1_scale, top),
                ffn1=linear(layer.w1, fm_h, fm_i, top, s),
                ffn2=linear(layer.w2, fm_i, fm_h, 1, square_scale_l2),
            ))
        self._maps = maps
        return maps

    def _per_chunk(self, emap: EncodedMap, cts: list[seal.Ciphertext],
                   ctx: EvalContext) -> list[list[seal.Ciphertext]]:
        """Apply a one-chunk kernel to each chunk's ciphertexts; outputs grouped by chunk."""
        n_in = emap.dmap.n_in
        if len(cts) % n_in:
            raise EngineError(f"{len(cts)} ciphertexts do not split into chunks of {n_in}")
        return [apply_map(self.backend, emap, cts[c:c + n_in], ctx.galois) for c in range(0, len(cts), n_in)]

    def _chunked(self, emap: EncodedMap, cts: list[seal.Ciphertext], ctx: EvalContext) -> list[seal.Ciphertext]:
        return [ct for chunk in self._per_chunk(emap, cts, ctx) for ct in chunk]

    # -- bundle and keys -----------------------------------------------------------------------
    def client_bundle(self) -> dict:
        cfg = self.cfg
        return {
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "protocol": PROTOCOL,
            "ckks": self.plan.params.to_dict(),
            "galois_steps": self.plan.galois_steps,
            "hidden_size": cfg.hidden_size,
            "num_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size,
            "max_tokens": self.max_tokens,
            "num_labels": cfg.num_labels,
            "labels": self._labels(),
            "rounds": self.plan.rounds,
            **protocol_spec.bundle_protocol_fields(len(self.plan.layers), list(self.plan.params.coeff_mod_bit_sizes),
                                                   self.plan.params.scale_bits),
            "files": sorted(self.client_bundle_files()),
        }

    def _labels(self) -> list[str]:
        if self.model_dir is not None and (self.model_dir / "labels.json").exists():
            return list(json.loads((self.model_dir / "labels.json").read_text()))
        if self.cfg.num_labels == 2:
            return ["negative", "positive"]
        return [str(i) for i in range(self.cfg.num_labels)]

    def client_bundle_files(self) -> dict[str, Path]:
        """Tokenizer and embedding tables: what the client needs to embed locally."""
        if self.model_dir is None:
            return {}
        files = {}
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            if (self.model_dir / name).exists():
                files[name] = self.model_dir / name
        files["embeddings.safetensors"] = self._embedding_file()
        return files

    def _embedding_file(self) -> Path:
        from safetensors.numpy import load_file, save_file

        from he_models.client import EMBEDDING_TENSORS

        assert self.model_dir is not None
        # Outside the model directory, which may be read-only (a container image) or a git checkout.
        root = os.environ.get("CIPHERBERT_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cipherbert")
        cache = Path(root) / "bundles"
        target = cache / f"embeddings-{self.model_hash[:16]}.safetensors"
        if not target.exists():
            cache.mkdir(parents=True, exist_ok=True)
            state = load_file(str(self.model_dir / "model.safetensors"))
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            save_file({k: state[k] for k in EMBEDDING_TENSORS}, str(tmp))
            os.replace(tmp, target)
        return target

    def load_context(self, public_keys: bytes) -> EvalContext:
        """Parse a client's evaluation keys; refuse secret keys, other parameters or missing steps."""
        try:
            header, relin_bytes, galois_bytes = unpack_eval_keys(public_keys)
        except CKKSError as exc:
            raise EngineError(str(exc)) from None
        if header.params != self.plan.params.to_dict():
            raise EngineError(f"evaluation keys use CKKS parameters {header.params}; this model needs "
                              f"{self.plan.params.to_dict()}")
        missing = sorted(set(self.plan.galois_steps) - set(header.galois_steps))
        if missing:
            raise EngineError(f"evaluation keys lack Galois keys for rotation steps {missing}")
        context = self.backend.context
        try:
            relin = load_into(seal.RelinKeys(), context, relin_bytes, "relinearization keys")
            galois = load_into(seal.GaloisKeys(), context, galois_bytes, "Galois keys")
        except CKKSError as exc:
            raise EngineError(str(exc)) from None
        if relin.size() == 0:
            raise EngineError("relinearization keys are empty")
        tool = context.key_context_data().galois_tool()
        for step, elt in zip(self.plan.galois_steps, tool.get_elts_from_steps(self.plan.galois_steps)):
            if not galois.has_key(elt):
                raise EngineError(f"Galois keys declare step {step} but do not contain it")
        fingerprint = hashlib.sha256(public_keys).hexdigest()[:32]
        return EvalContext(relin=relin, galois=galois, fingerprint=fingerprint,
                           steps=list(header.galois_steps), nbytes=len(public_keys), raw=public_keys)

    # -- protocol ------------------------------------------------------------------------------
    def geometry(self, n_tokens: int) -> Geometry:
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise EngineError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        if n_tokens > self.max_tokens:
            raise EngineError(f"{n_tokens} tokens exceed this model's maximum of {self.max_tokens}")
        try:
            return Geometry.for_tokens(n_tokens, self.cfg.hidden_size, self.cfg.num_heads,
                                       self.cfg.intermediate_size, self.slots)
        except LayoutError as exc:
            raise EngineError(str(exc)) from None

    def start(self, ctx: EvalContext, inference_id: str, n_tokens: int, inputs: list[bytes]) -> StepOutput:
        with self._lock:
            return self._start(ctx, inference_id, n_tokens, inputs)

    def resume(self, ctx: EvalContext, state: bytes, replies: list[bytes], *,
               inference_id: str | None = None, round_no: int | None = None) -> StepOutput:
        with self._lock:
            return self._resume(ctx, state, replies, inference_id=inference_id, round_no=round_no)

    def _start(self, ctx: EvalContext, inference_id: str, n_tokens: int, inputs: list[bytes]) -> StepOutput:
        if not inference_id or len(inference_id) > 128:
            raise EngineError("inference id must be 1..128 characters")
        geo = self.geometry(n_tokens)
        raw = self._load_replies(inputs, geo.fm_cts(geo.hidden), "input")
        return self._begin_layer(ctx, inference_id, geo, 0, raw, round_no=1)

    def _resume(self, ctx: EvalContext, state: bytes, replies: list[bytes], *,
                inference_id: str | None = None, round_no: int | None = None) -> StepOutput:
        header, saved = self._open_state(state)
        if inference_id is not None and inference_id != header["inference_id"]:
            raise EngineError(f"reply for inference {inference_id!r} does not match the stored "
                              f"inference {header['inference_id']!r}")
        if round_no is not None and round_no != header["round"]:
            raise EngineError(f"reply to round {round_no} but inference {header['inference_id']!r} "
                              f"awaits round {header['round']} (replayed or out-of-order round)")
        if header["key"] != ctx.fingerprint:
            raise EngineError("reply uses different evaluation keys than the inference started with")
        geo = Geometry.from_dict(header["geometry"])
        layer, kind_index = divmod(header["round"] - 1, 4)
        inference = header["inference_id"]
        r = header["round"]
        if kind_index == 0:
            return self._after_scores(ctx, inference, geo, layer, r, saved, replies)
        if kind_index == 1:
            return self._after_context(ctx, inference, geo, layer, r, saved, replies)
        if kind_index == 2:
            return self._after_attention_refresh(ctx, inference, geo, layer, r, replies)
        return self._after_ffn_refresh(ctx, inference, geo, layer, r, replies)

    # -- rounds --------------------------------------------------------------------------------
    def _begin_layer(self, ctx: EvalContext, inference: str, geo: Geometry, layer: int,
                     raw: list[seal.Ciphertext], round_no: int) -> StepOutput:
        def whole():
            both = self._part_qkv(ctx, geo, layer, raw, "all")
            return both[:2 * len(raw)], both[2 * len(raw):]

        (q_k, v_x) = self._split(ctx, ("qkv", {"geo": geo, "layer": layer, "raw": raw, "which": "v"}),
                                 lambda: self._part_qkv(ctx, geo, layer, raw, "qk"), whole)
        n_fm = len(raw)
        q, k = q_k[:n_fm], q_k[n_fm:]
        v, x_res = v_x[:n_fm], v_x[n_fm:]
        rq = self._mask(inference, round_no, f"{layer}.q", len(q))
        rk = self._mask(inference, round_no, f"{layer}.k", len(k))
        to_client = [self._masked_out(c, m) for c, m in zip(q, rq)] + [self._masked_out(c, m) for c, m in zip(k, rk)]
        return self._emit(ctx, inference, geo, round_no, "scores", to_client,
                          {"x_res": x_res, "q": q, "v": v},
                          {"sigma": self.plan.layers[layer].score_factor(geo.n)})

    def _after_scores(self, ctx, inference, geo, layer, r, saved, replies) -> StepOutput:
        be = self.backend
        n_sl = geo.sl_cts
        fresh = self._load_replies(replies, 2 * n_sl, "scores reply")
        s_client, z = fresh[:n_sl], fresh[n_sl:]
        task = {"geo": geo, "layer": layer, "inference": inference, "r": r, "z": z}
        c1_out, c2_out = self._split(ctx, ("c2", task),
                                     lambda: self._part_c1(ctx, geo, layer, inference, r, saved["q"]))
        shift = self.plan.layers[layer].shift(geo.n)
        shift_sl = geo.pack_sl(np.broadcast_to(shift[:, None, None], (geo.heads, geo.n, geo.n)))
        a = []
        for idx in range(n_sl):
            scores = be.sub(be.sub(s_client[idx], c1_out[idx]), c2_out[idx])
            scores = be.add_plain(scores, shift_sl[idx])
            a.append(be.square(scores, ctx.relin))
        ra = self._mask(inference, r + 1, f"{layer}.a", n_sl)
        rv = self._mask(inference, r + 1, f"{layer}.v", len(saved["v"]))
        to_client = [self._masked_out(c, m) for c, m in zip(a, ra)] + \
                    [self._masked_out(c, m) for c, m in zip(saved["v"], rv)]
        return self._emit(ctx, inference, geo, r + 1, "context", to_client,
                          {"x_res": saved["x_res"], "v": saved["v"]},
                          {"context_scale": 1.0 / self.plan.layers[layer].a_gain})

    def _after_context(self, ctx, inference, geo, layer, r, saved, replies) -> StepOutput:
        be = self.backend
        n_fm, n_sl = geo.fm_cts(geo.hidden), geo.sl_cts
        fresh = self._load_replies(replies, n_fm + n_sl, "context reply")
        av_client, a_masked = fresh[:n_fm], fresh[n_fm:]
        task = {"geo": geo, "layer": layer, "inference": inference, "r": r, "v": saved["v"]}
        c3_out, c4_out = self._split(ctx, ("c4", task),
                                     lambda: self._part_c3(ctx, geo, layer, inference, r, a_masked))
        context = [be.sub(be.sub(av_client[i], c3_out[i]), c4_out[i]) for i in range(n_fm)]
        maps = self._layer_maps()[layer]
        L = self.plan.layers[layer]
        out = self._add_bias(self._chunked(maps.o, context, ctx), L.bo, geo)
        h_raw = [be.add(x, o) for x, o in zip(saved["x_res"], out)]
        rh = self._mask(inference, r + 1, f"{layer}.h", n_fm)
        to_client = [self._masked_out(c, m) for c, m in zip(h_raw, rh)]
        return self._emit(ctx, inference, geo, r + 1, "refresh", to_client, {})

    def _after_attention_refresh(self, ctx, inference, geo, layer, r, replies) -> StepOutput:
        be = self.backend
        n_fm = geo.fm_cts(geo.hidden)
        h_raw = self._unmask_refresh(replies, inference, r, f"{layer}.h", geo)
        maps = self._layer_maps()[layer]
        L = self.plan.layers[layer]

        def local_half():
            h_res = self._add_bias(self._chunked(maps.n1, h_raw, ctx), L.n1_shift, geo)
            return h_res + self._part_ffn(ctx, geo, layer, h_raw, 0)

        if geo.per_chunk(geo.intermediate) < 2:  # one intermediate ciphertext per chunk: nothing to split
            h_res = self._add_bias(self._chunked(maps.n1, h_raw, ctx), L.n1_shift, geo)
            f = self._part_ffn(ctx, geo, layer, h_raw, None)
        else:
            def whole():
                h_res = self._add_bias(self._chunked(maps.n1, h_raw, ctx), L.n1_shift, geo)
                return h_res + self._part_ffn(ctx, geo, layer, h_raw, None), None

            local, f_remote = self._split(
                ctx, ("ffn", {"geo": geo, "layer": layer, "h_raw": h_raw, "half": 1}), local_half, whole)
            h_res, f_local = local[:n_fm], local[n_fm:]
            f = f_local if f_remote is None else [be.add(a, b) for a, b in zip(f_local, f_remote)]
        f = self._add_bias(f, L.b2, geo)
        y_raw = [be.add(a, b) for a, b in zip(h_res, f)]
        ry = self._mask(inference, r + 1, f"{layer}.y", n_fm)
        to_client = [self._masked_out(c, m) for c, m in zip(y_raw, ry)]
        return self._emit(ctx, inference, geo, r + 1, "refresh", to_client, {})

    def _split(self, ctx: EvalContext, remote: tuple[str, dict], local, whole=None):
        """Run `local()` here and the named half in the assistant; without an assistant, `whole()`
        (the unsplit computation, which shares rotations the halves would each repeat) if given."""
        name, kwargs = remote
        if self._assistant is None and whole is not None:
            return whole()
        if self._assistant is not None:
            try:
                pending = self._assistant.submit(ctx, name, kwargs)
            except (OSError, EOFError, BrokenPipeError):
                self._assistant = None  # the assistant died: carry on alone
            else:
                mine = local()
                try:
                    return mine, pending()
                except (OSError, EOFError):
                    self._assistant = None
                    return mine, self._run_part(ctx, name, kwargs)
        mine = local()
        return mine, self._run_part(ctx, name, kwargs)

    def _run_part(self, ctx: EvalContext, name: str, kwargs: dict) -> list[seal.Ciphertext]:
        return getattr(self, f"_part_{name}")(ctx, **kwargs)

    # -- halves of the work, run here or in the assistant process --------------------------------
    def _part_qkv(self, ctx, geo, layer, raw, which) -> list[seal.Ciphertext]:
        """Q and K, or V and the residual input (x_res), or all of them; each grouped chunk by chunk."""
        maps = self._layer_maps()[layer]
        L = self.plan.layers[layer]
        per = geo.per_chunk(geo.hidden)
        parts = {"qk": ("q", "k"), "v": ("v",), "all": ("q", "k", "v")}[which]
        index = {"q": 0, "k": 1, "v": 2}
        outputs = [index[p] * per + j for p in parts for j in range(per)]
        chunks = self._per_chunk(subset_map(maps.qkv, outputs=outputs), raw, ctx)
        result = []
        for pos, name in enumerate(parts):
            cts = [ct for chunk in chunks for ct in chunk[pos * per:(pos + 1) * per]]
            result += self._add_bias(cts, getattr(L, f"b{name}"), geo)
        if which == "qk":
            return result
        if maps.x_res is None:
            return result + list(raw)
        return result + self._add_bias(self._chunked(maps.x_res, raw, ctx), L.in_shift, geo)

    def _part_c1(self, ctx, geo, layer, inference, r, q) -> list[seal.Ciphertext]:
        """sigma * Q rK^T, from the server's Q (level 2) to level 1."""
        sigma = self.plan.layers[layer].score_factor(geo.n)
        rk = geo.unpack_fm(self._mask(inference, r, f"{layer}.k", geo.fm_cts(geo.hidden)), geo.hidden)
        c1 = self._request_map("c1", geo, self._c1_triplets(geo, sigma * rk), geo.fm_cts(geo.hidden), geo.sl_cts,
                               CHUNK, 2, self.plan.block_babies(CHUNK))
        return apply_map(self.backend, c1, q, ctx.galois)

    def _part_c2(self, ctx, geo, layer, inference, r, z) -> list[seal.Ciphertext]:
        """sigma * rQ (K+rK)^T from the client's fresh token-major K+rK, run one level down."""
        sigma = self.plan.layers[layer].score_factor(geo.n)
        rq = geo.unpack_fm(self._mask(inference, r, f"{layer}.q", geo.fm_cts(geo.hidden)), geo.hidden)
        c2 = self._request_map("c2", geo, self._c2_triplets(geo, sigma * rq), geo.sl_cts, geo.sl_cts, 1, 2)
        return apply_map(self.backend, c2, z, ctx.galois)

    def _part_c3(self, ctx, geo, layer, inference, r, a_masked) -> list[seal.Ciphertext]:
        """(A+rA) rV from the client's fresh A+rA."""
        rv = geo.unpack_fm(self._mask(inference, r, f"{layer}.v", geo.fm_cts(geo.hidden)), geo.hidden)
        rv = rv / self.plan.layers[layer].a_gain
        c3 = self._request_map("c3", geo, self._c3_triplets(geo, rv), geo.sl_cts, geo.fm_cts(geo.hidden), CHUNK, 2,
                               self.plan.block_babies(CHUNK))
        return apply_map(self.backend, c3, a_masked, ctx.galois)

    def _part_c4(self, ctx, geo, layer, inference, r, v) -> list[seal.Ciphertext]:
        """rA V from the server's V (level 2)."""
        ra = geo.unpack_sl(self._mask(inference, r, f"{layer}.a", geo.sl_cts)) / self.plan.layers[layer].a_gain
        n_fm = geo.fm_cts(geo.hidden)
        c4 = self._request_map("c4", geo, self._c4_triplets(geo, ra), n_fm, n_fm, 1, 2)
        return apply_map(self.backend, c4, v, ctx.galois)

    def _part_ffn(self, ctx, geo, layer, h_raw, half) -> list[seal.Ciphertext]:
        """One half of the FFN: its share of FFN1's outputs (in every chunk), squared, through its share
        of FFN2's inputs; half=None does all of it."""
        be = self.backend
        maps = self._layer_maps()[layer]
        L = self.plan.layers[layer]
        per = geo.per_chunk(geo.intermediate)
        cut = per // 2
        idx = list(range(per)) if half is None else (list(range(cut)) if half == 0 else list(range(cut, per)))
        bias = geo.pack_fm(np.broadcast_to(L.b1[None, :], (geo.n, len(L.b1))))
        ffn1, ffn2 = subset_map(maps.ffn1, outputs=idx), subset_map(maps.ffn2, inputs=idx)
        out = []
        for c, u in enumerate(self._per_chunk(ffn1, h_raw, ctx)):
            u = [be.add_plain(ct, bias[c * per + i]) for ct, i in zip(u, idx)]
            g = [be.square(ct, ctx.relin) for ct in u]
            out += apply_map(be, ffn2, g, ctx.galois)
        return out

    def _after_ffn_refresh(self, ctx, inference, geo, layer, r, replies) -> StepOutput:
        y_raw = self._unmask_refresh(replies, inference, r, f"{layer}.y", geo)
        if layer + 1 < len(self.plan.layers):
            return self._begin_layer(ctx, inference, geo, layer + 1, y_raw, r + 1)
        return self._logits(ctx, inference, geo, y_raw, r)

    def _logits(self, ctx, inference, geo, y_raw, r) -> StepOutput:
        be = self.backend
        n_fm = geo.fm_cts(geo.hidden)
        pool = np.zeros((geo.n, 1))
        if self.cfg.pooling == "mean":
            pool[:, 0] = 1.0 / geo.n
        else:
            pool[0, 0] = 1.0
        outputs = []
        for c in range(self.cfg.num_labels):
            weights = geo.pack_fm(pool * self.plan.head_w[:, c][None, :])
            terms = []
            for idx in range(n_fm):
                pt_scale = be.last_prime(be.top)
                pt = encode_vector(be.encoder, weights[idx], y_raw[idx].parms_id(), pt_scale)
                prod = seal.Ciphertext()
                be.evaluator.multiply_plain(y_raw[idx], pt, prod)
                be.evaluator.rescale_to_next_inplace(prod)
                prod.scale = self.plan.params.scale
                terms.append(prod)
            total = terms[0]
            for t in terms[1:]:
                total = be.add(total, t)
            total = be.sum_slots(total, ctx.galois)
            total = be.add_plain(total, np.full(self.slots, self.plan.head_b[c]))
            outputs.append(save_bytes(be.mod_to(total, 0)))
        return StepOutput(inference_id=inference, round=r + 1, done=True, to_client=outputs, state=None,
                          kind="logits", meta={"num_labels": self.cfg.num_labels, "labels": self._labels(),
                                               "protocol": PROTOCOL})

    # -- mask correction kernels (built per request: the masks are fresh) -----------------------
    def _request_map(self, kind: str, geo: Geometry, triplets, n_in, n_out, unit, level,
                     babies=(BABY_STEPS,)) -> EncodedMap:
        """Encode a mask-correction map; where its weights land depends only on the geometry (cached)."""
        key = (kind, geo.n, geo.n_p)
        layout = self._layouts.get(key)
        if layout is None:
            layout = plan_map_fewest_rotations(triplets[0], triplets[1], n_in, n_out, self.slots, unit, babies)
            self._layouts[key] = layout
            while len(self._layouts) > 512:
                self._layouts.popitem(last=False)
        s = self.plan.params.scale
        return encode_map(self.backend, layout.fill(triplets[2]), level, s, s)

    @staticmethod
    def _head_grid(geo: Geometry):
        h = np.arange(geo.heads)[:, None, None, None]
        k = np.arange(geo.n)[None, :, None, None]
        i = np.arange(geo.n)[None, None, :, None]
        d = np.arange(geo.head_dim)[None, None, None, :]
        return h, k, i, d

    def _c1_triplets(self, geo, w_rk):
        """sigma * Q rK^T: FM(i, f) -> SL(h, k, i), weight sigma*rK[k, f], f = h*dh + d."""
        h, k, i, d = self._head_grid(geo)
        f = h * geo.head_dim + d
        shape = (geo.heads, geo.n, geo.n, geo.head_dim)
        out = np.broadcast_to(geo.sl_slot(h, k, i), shape)
        inp = np.broadcast_to(geo.fm_slot(i, f, geo.hidden), shape)
        return out, inp, np.broadcast_to(w_rk[k, f], shape)

    def _c2_triplets(self, geo, w_rq):
        """sigma * rQ (K+rK)^T: TM(h, k, d) -> SL(h, k, i), weight sigma*rQ[i, f]."""
        h, k, i, d = self._head_grid(geo)
        f = h * geo.head_dim + d
        shape = (geo.heads, geo.n, geo.n, geo.head_dim)
        out = np.broadcast_to(geo.sl_slot(h, k, i), shape)
        inp = np.broadcast_to(geo.sl_slot(h, k, d), shape)
        return out, inp, np.broadcast_to(w_rq[i, f], shape)

    def _c3_triplets(self, geo, rv):
        """(A+rA) rV: SL(h, k, i) -> FM(i, f), weight rV[k, f], f = h*dh + e."""
        h, k, i, e = self._head_grid(geo)
        f = h * geo.head_dim + e
        shape = (geo.heads, geo.n, geo.n, geo.head_dim)
        out = np.broadcast_to(geo.fm_slot(i, f, geo.hidden), shape)
        inp = np.broadcast_to(geo.sl_slot(h, k, i), shape)
        return out, inp, np.broadcast_to(rv[k, f], shape)

    def _c4_triplets(self, geo, ra):
        """rA V: FM(k, f) -> FM(i, f), weight rA[h, k, i]."""
        h, k, i, e = self._head_grid(geo)
        f = h * geo.head_dim + e
        shape = (geo.heads, geo.n, geo.n, geo.head_dim)
        out = np.broadcast_to(geo.fm_slot(i, f, geo.hidden), shape)
        inp = np.broadcast_to(geo.fm_slot(k, f, geo.hidden), shape)
        return out, inp, np.broadcast_to(ra[h, k, i], shape)

    # -- helpers -------------------------------------------------------------------------------
    def _add_bias(self, cts: list[seal.Ciphertext], bias: np.ndarray, geo: Geometry) -> list[seal.Ciphertext]:
        vectors = geo.pack_fm(np.broadcast_to(bias[None, :], (geo.n, len(bias))))
        return [self.backend.add_plain(c, v) for c, v in zip(cts, vectors)]

    def _mask(self, inference: str, round_no: int, name: str, n_cts: int) -> list[np.ndarray]:
        """Uniform mask from a PRF of (server secret, inference, round, tensor): any replica re-derives it."""
        width = self.mask_limits[name][0]
        digest = hmac.new(self._secret, f"mask|{inference}|{round_no}|{name}".encode(), hashlib.sha256).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "big"))
        flat = rng.uniform(-width, width, size=n_cts * self.slots)
        return [flat[i * self.slots:(i + 1) * self.slots] for i in range(n_cts)]

    def _masked_out(self, ct: seal.Ciphertext, mask: np.ndarray) -> bytes:
        masked = self.backend.add_plain(ct, mask)
        return save_bytes(self.backend.mod_to(masked, 0))

    def _unmask_refresh(self, replies, inference, r, name, geo) -> list[seal.Ciphertext]:
        n_fm = geo.fm_cts(geo.hidden)
        fresh = self._load_replies(replies, n_fm, "refresh reply")
        mask = self._mask(inference, r, name, n_fm)
        valid = geo.fm_valid(geo.hidden)
        return [self.backend.sub_plain(c, m * v) for c, m, v in zip(fresh, mask, valid)]

    def _load_replies(self, payloads: list[bytes], expected: int, what: str) -> list[seal.Ciphertext]:
        if len(payloads) != expected:
            raise EngineError(f"{what}: expected {expected} ciphertexts, got {len(payloads)}")
        out = []
        for i, data in enumerate(payloads):
            try:
                ct = load_ciphertext(self.backend.context, data, f"{what} ciphertext {i}")
            except CKKSError as exc:
                raise EngineError(str(exc)) from None
            level = self.backend.level(ct)
            if level != self.backend.top:
                raise EngineError(f"{what} ciphertext {i} is at level {level}; fresh ciphertexts at "
                                  f"level {self.backend.top} are required")
            if abs(ct.scale / self.plan.params.scale - 1) > 1e-9:
                raise EngineError(f"{what} ciphertext {i} has scale 2^{math.log2(ct.scale):.2f}; "
                                  f"expected 2^{self.plan.params.scale_bits}")
            if ct.is_ntt_form() is False:
                raise EngineError(f"{what} ciphertext {i} is not in NTT form (not a CKKS ciphertext)")
            out.append(ct)
        return out

    def _emit(self, ctx, inference, geo, round_no, kind, to_client, keep: dict[str, list],
              extra_meta: dict | None = None) -> StepOutput:
        header = {"format": STATE_FORMAT, "inference_id": inference, "round": round_no, "kind": kind,
                  "geometry": geo.to_dict(), "key": ctx.fingerprint, "model": self.model_hash,
                  "tensors": {name: len(cts) for name, cts in keep.items()}}
        frames = [json.dumps(header).encode()]
        for name in keep:
            frames.extend(save_bytes(ct) for ct in keep[name])
        body = pack_frames(frames)
        tag = hmac.new(self._secret, body, hashlib.sha256).digest()
        meta = {"geometry": geo.to_dict(), "protocol": PROTOCOL,
                "tensors": protocol_spec.round_tensors(kind, geo.to_dict()), **(extra_meta or {})}
        return StepOutput(inference_id=inference, round=round_no, done=False, to_client=to_client,
                          state=tag + body, kind=kind, meta=meta)

    def _open_state(self, state: bytes) -> tuple[dict, dict[str, list[seal.Ciphertext]]]:
        if not isinstance(state, (bytes, bytearray)) or len(state) < 40:
            raise EngineError("engine state is missing or truncated")
        tag, body = state[:32], bytes(state[32:])
        if not hmac.compare_digest(tag, hmac.new(self._secret, body, hashlib.sha256).digest()):
            raise EngineError("engine state failed authentication (forged, corrupted or from another server)")
        try:
            frames = unpack_frames(body, max_frames=256, max_bytes=1 << 31)
            header = json.loads(frames[0])
        except (WireError, ValueError):
            raise EngineError("engine state is malformed") from None
        if header.get("format") != STATE_FORMAT or header.get("model") != self.model_hash:
            raise EngineError("engine state belongs to another model or format")
        saved: dict[str, list[seal.Ciphertext]] = {}
        pos = 1
        for name, count in header["tensors"].items():
            saved[name] = [load_ciphertext(self.backend.context, frames[pos + j]) for j in range(count)]
            pos += count
        return header, saved


# ---------------------------------------------------------------------------------------------
# The assistant: a forked copy of the engine that takes one half of each round. sealapi holds the
# GIL, so threads would not help; a process gets the second core. Ciphertexts cross the pipe as bytes.

_CT_ARGS = ("raw", "z", "v", "h_raw", "q", "a_masked")


class _Assistant:
    def __init__(self, engine: "EncryptedEngine") -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_assistant_main, args=(engine, child), daemon=True,
                                     name="cipherbert-engine-assistant")
        self._proc.start()
        child.close()
        self._keys: set[str] = set()
        self._engine_context = engine.backend.context

    def submit(self, ctx: EvalContext, name: str, kwargs: dict):
        if ctx.fingerprint not in self._keys:
            self._conn.send(("keys", ctx.raw))
            self._keys.add(ctx.fingerprint)
        wire = {k: ([save_bytes(c) for c in v] if k in _CT_ARGS else v) for k, v in kwargs.items()}
        wire["geo"] = wire["geo"].to_dict()
        self._conn.send(("part", (ctx.fingerprint, name, wire)))

        def result() -> list[seal.Ciphertext]:
            ok, value = self._conn.recv()
            if not ok:
                raise EngineError(f"engine assistant failed: {value}")
            return [load_ciphertext(self._engine_context, b) for b in value]

        return result

    def close(self) -> None:
        try:
            self._conn.send(("stop", None))
        except (OSError, BrokenPipeError):
            pass
        self._proc.join(timeout=2)
        if self._proc.is_alive():
            self._proc.kill()


def _assistant_main(engine: "EncryptedEngine", conn) -> None:
    engine._assistant = None
    contexts: OrderedDict[str, EvalContext] = OrderedDict()
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        if kind == "keys":
            ctx = engine.load_context(payload)
            contexts[ctx.fingerprint] = ctx
            while len(contexts) > 8:
                contexts.popitem(last=False)
            continue
        fingerprint, name, wire = payload
        try:
            ctx = contexts[fingerprint]
            wire["geo"] = Geometry.from_dict(wire["geo"])
            for key in _CT_ARGS:
                if key in wire:
                    wire[key] = [load_ciphertext(engine.backend.context, b) for b in wire[key]]
            out = engine._run_part(ctx, name, wire)
            conn.send((True, [save_bytes(c) for c in out]))
        except Exception as exc:  # reported to the caller, which raises it
            conn.send((False, f"{type(exc).__name__}: {exc}"))
