"""The model's weight kernels: every plaintext linear map of every layer, encoded once at load.

They are built for one 32-token chunk of the feature-major layout; a longer sentence applies the same
kernels chunk by chunk, so one set of encoded maps serves every length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from he_models.contracts import EngineError
from he_models.kernels import Backend, EncodedMap, apply_map, build_map, build_map_fewest_rotations, encode_map
from he_models.layout import CHUNK, Geometry
from he_models.plan import BABY_STEPS, HEPlan, LayerPlan

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass
class LayerMaps:
    qkv: EncodedMap  # one map, three outputs: the baby rotations of the input are shared
    x_res: EncodedMap | None
    o: EncodedMap
    n1: EncodedMap
    ffn1: EncodedMap
    ffn2: EncodedMap


def fm_triplets(chunk: Geometry, weight: np.ndarray) -> Triplets:
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


def elementwise_triplets(chunk: Geometry, scale: np.ndarray) -> Triplets:
    """Triplets of x * scale (per feature) over one feature-major chunk."""
    idx = chunk.fm_index(len(scale))
    return idx, idx, np.broadcast_to(scale[None, :], idx.shape)


class WeightKernels:
    """Builds (lazily, once) and applies the encoded weight maps of every layer."""

    def __init__(self, plan: HEPlan, backend: Backend) -> None:
        self.plan = plan
        self.backend = backend
        self.slots = plan.params.slots
        self._maps: list[LayerMaps] | None = None
        self._token_head: EncodedMap | None = None

    def chunk_geometry(self) -> Geometry:
        cfg = self.plan.config
        return Geometry(
            n=CHUNK,
            n_p=CHUNK,
            hidden=cfg.hidden_size,
            heads=cfg.num_heads,
            intermediate=cfg.intermediate_size,
            slots=self.slots,
        )

    def maps(self) -> list[LayerMaps]:
        """Weight kernels for one 32-token chunk, encoded once; longer inputs apply them per chunk."""
        if self._maps is None:
            self._maps = [self._encode_layer(layer) for layer in self.plan.layers]
        return self._maps

    def token_head(self) -> EncodedMap:
        """The per-token classifier of a token-classification model: hidden -> labels, feature-major in and
        out (label c of token t lands where feature c would), applied to the fresh last hidden state."""
        if self._token_head is None:
            geo = self.chunk_geometry()
            n_out = geo.per_chunk(self.plan.config.num_labels)
            s = self.plan.params.scale
            self._token_head = self._linear(geo, self.plan.head_w, geo.fm_cts(geo.hidden), n_out, self.backend.top, s)
        return self._token_head

    def _encode_layer(self, layer: LayerPlan) -> LayerMaps:
        geo = self.chunk_geometry()
        be, s = self.backend, self.plan.params.scale
        top = be.top
        fm_h, fm_i = geo.fm_cts(geo.hidden), geo.fm_cts(geo.intermediate)
        return LayerMaps(
            qkv=self._stacked(geo, [layer.wq, layer.wk, layer.wv], top),
            x_res=None if layer.in_scale is None else self._elementwise(geo, layer.in_scale, top),
            o=self._linear(geo, layer.wo, fm_h, fm_h, 1, s),
            n1=self._elementwise(geo, layer.n1_scale, top),
            ffn1=self._linear(geo, layer.w1, fm_h, fm_i, top, s),
            ffn2=self._linear(geo, layer.w2, fm_i, fm_h, 1, s * s / be.last_prime(2)),
        )

    def _linear(
        self, geo: Geometry, weight: np.ndarray, n_in: int, n_out: int, level: int, in_scale: float
    ) -> EncodedMap:
        babies = self.plan.block_babies(CHUNK)
        dmap = build_map_fewest_rotations(*fm_triplets(geo, weight), n_in, n_out, self.slots, CHUNK, babies)
        return encode_map(self.backend, dmap, level, in_scale, self.plan.params.scale)

    def _stacked(self, geo: Geometry, weights: list[np.ndarray], level: int) -> EncodedMap:
        """Several maps of the same input, each output in its own ciphertexts, sharing baby steps."""
        fm_h = geo.fm_cts(geo.hidden)
        parts = [fm_triplets(geo, w) for w in weights]
        out = np.concatenate([(p[0] + i * fm_h * self.slots).ravel() for i, p in enumerate(parts)])
        inp = np.concatenate([p[1].ravel() for p in parts])
        wts = np.concatenate([p[2].ravel() for p in parts])
        babies = self.plan.block_babies(CHUNK)
        dmap = build_map_fewest_rotations(out, inp, wts, fm_h, len(weights) * fm_h, self.slots, CHUNK, babies)
        s = self.plan.params.scale
        return encode_map(self.backend, dmap, level, s, s)

    def _elementwise(self, geo: Geometry, scale: np.ndarray, level: int) -> EncodedMap:
        fm_h = geo.fm_cts(geo.hidden)
        dmap = build_map(*elementwise_triplets(geo, scale), fm_h, fm_h, self.slots, CHUNK, BABY_STEPS)
        s = self.plan.params.scale
        return encode_map(self.backend, dmap, level, s, s)

    def per_chunk(
        self, emap: EncodedMap, cts: list[seal.Ciphertext], galois: seal.GaloisKeys
    ) -> list[list[seal.Ciphertext]]:
        """Apply a one-chunk kernel to each chunk's ciphertexts; outputs grouped by chunk."""
        n_in = emap.dmap.n_in
        if len(cts) % n_in:
            raise EngineError(f"{len(cts)} ciphertexts do not split into chunks of {n_in}")
        return [apply_map(self.backend, emap, cts[c : c + n_in], galois) for c in range(0, len(cts), n_in)]

    def chunked(self, emap: EncodedMap, cts: list[seal.Ciphertext], galois: seal.GaloisKeys) -> list[seal.Ciphertext]:
        """Apply a one-chunk kernel to every chunk; outputs concatenated in chunk order."""
        return [ct for chunk in self.per_chunk(emap, cts, galois) for ct in chunk]

    def add_bias(self, cts: list[seal.Ciphertext], bias: np.ndarray, geo: Geometry) -> list[seal.Ciphertext]:
        """Add a per-feature bias to the valid tokens of a feature-major tensor (padding stays zero)."""
        vectors = geo.pack_fm(np.broadcast_to(bias[None, :], (geo.n, len(bias))))
        return [self.backend.add_plain(c, v) for c, v in zip(cts, vectors, strict=False)]
