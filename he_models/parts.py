"""The heavy halves of each round: run in this process or, split in two, half in the assistant.

Every part takes plain arguments and ciphertext lists, so the assistant process can run the same code
on ciphertexts that crossed a pipe as bytes. `RoundParts.run(ctx, name, kwargs)` is the one entry point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tenseal.sealapi as seal

from he_models.contracts import EvalContext
from he_models.corrections import CORRECTIONS, CorrectionKernels, correction_weights
from he_models.kernels import Backend, apply_map, subset_map
from he_models.layout import Geometry
from he_models.masks import Masks
from he_models.plan import HEPlan
from he_models.weights import WeightKernels

QKV_PARTS = {"qk": ("q", "k"), "v": ("v",), "all": ("q", "k", "v")}
CIPHERTEXT_ARGS = ("raw", "cts", "h_raw")  # the keyword arguments of parts that hold ciphertexts


class RoundParts:
    """QKV projections, mask corrections c1..c4 and FFN halves of one engine."""

    def __init__(
        self, plan: HEPlan, backend: Backend, weights: WeightKernels, corrections: CorrectionKernels, masks: Masks
    ) -> None:
        self.plan = plan
        self.backend = backend
        self.weights = weights
        self.corrections = corrections
        self.masks = masks

    def run(self, ctx: EvalContext, name: str, kwargs: dict[str, Any]) -> list[seal.Ciphertext]:
        """Run part `name` ("qkv", "ffn" or a correction "c1".."c4") with its keyword arguments."""
        if name in CORRECTIONS:
            return self.correction(ctx, name, **kwargs)
        if name == "qkv":
            return self.qkv(ctx, **kwargs)
        if name == "ffn":
            return self.ffn(ctx, **kwargs)
        raise KeyError(f"no engine part named {name!r}")

    def qkv(
        self, ctx: EvalContext, geo: Geometry, layer: int, raw: list[seal.Ciphertext], which: str
    ) -> list[seal.Ciphertext]:
        """Q and K, or V and the residual input (x_res), or all of them; each grouped chunk by chunk."""
        maps = self.weights.maps()[layer]
        L = self.plan.layers[layer]
        per = geo.per_chunk(geo.hidden)
        parts = QKV_PARTS[which]
        index = {"q": 0, "k": 1, "v": 2}
        outputs = [index[p] * per + j for p in parts for j in range(per)]
        chunks = self.weights.per_chunk(subset_map(maps.qkv, outputs=outputs), raw, ctx.galois)
        result = []
        for pos, name in enumerate(parts):
            cts = [ct for chunk in chunks for ct in chunk[pos * per : (pos + 1) * per]]
            result += self.weights.add_bias(cts, getattr(L, f"b{name}"), geo)
        if which == "qk":
            return result
        if maps.x_res is None or L.in_shift is None:
            return result + list(raw)
        return result + self.weights.add_bias(self.weights.chunked(maps.x_res, raw, ctx.galois), L.in_shift, geo)

    def correction(
        self, ctx: EvalContext, name: str, geo: Geometry, layer: int, inference: str, r: int, cts: list[seal.Ciphertext]
    ) -> list[seal.Ciphertext]:
        """Correction `name` (see he_models.corrections) with this round's masks, applied to `cts`."""
        weights = correction_weights(CORRECTIONS[name], self.plan, self.masks, geo, layer, inference, r)
        return apply_map(self.backend, self.corrections.build(name, geo, weights), cts, ctx.galois)

    def ffn(
        self, ctx: EvalContext, geo: Geometry, layer: int, h_raw: list[seal.Ciphertext], half: int | None
    ) -> list[seal.Ciphertext]:
        """One half of the FFN: its share of FFN1's outputs (in every chunk), squared, through its share
        of FFN2's inputs; half=None does all of it."""
        be = self.backend
        maps = self.weights.maps()[layer]
        L = self.plan.layers[layer]
        per = geo.per_chunk(geo.intermediate)
        cut = per // 2
        idx = list(range(per)) if half is None else (list(range(cut)) if half == 0 else list(range(cut, per)))
        bias = geo.pack_fm(np.broadcast_to(L.b1[None, :], (geo.n, len(L.b1))))
        ffn1, ffn2 = subset_map(maps.ffn1, outputs=idx), subset_map(maps.ffn2, inputs=idx)
        out = []
        for c, u in enumerate(self.weights.per_chunk(ffn1, h_raw, ctx.galois)):
            u = [be.add_plain(ct, bias[c * per + i]) for ct, i in zip(u, idx, strict=True)]
            g = [be.square(ct, ctx.relin) for ct in u]
            out += apply_map(be, ffn2, g, ctx.galois)
        return out
