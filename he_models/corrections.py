"""Per-request mask-correction kernels: the plaintext maps that remove the masks' cross terms.

The client multiplies masked tensors, so its products carry cross terms with the masks, e.g.
(Q + rQ)(K + rK)^T = QK^T + Q rK^T + rQ (K + rK)^T. The server subtracts them with four linear maps
whose weights are the (fresh) masks, applied to ciphertexts it holds:

  c1  sigma Q rK^T          FM(i, f)   -> SL(h, k, i)   weight sigma rK[k, f]   on the server's Q
  c2  sigma rQ (K+rK)^T     TM(h, k, d) -> SL(h, k, i)  weight sigma rQ[i, f]   on the client's K+rK
  c3  (A+rA) rV             SL(h, k, i) -> FM(i, f)     weight rV[k, f]         on the client's A+rA
  c4  rA V                  FM(k, f)   -> FM(i, f)      weight rA[h, k, i]      on the server's V

with f = h * head_dim + d. Each is one row of CORRECTIONS; one function turns a row into (output slot,
input slot, weight) triplets over the grid (h, k, i, d). Where the weights land depends only on the
geometry, so the layout is planned once per sentence length and cached; the weights are encoded per
request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from he_models.kernels import Backend, EncodedMap, MapLayout, encode_map, plan_map_fewest_rotations
from he_models.layout import CHUNK, Geometry
from he_models.masks import Masks
from he_models.plan import BABY_STEPS, HEPlan

CORRECTION_LEVEL = 2  # every correction map runs on level-2 inputs
LAYOUT_CACHE_SIZE = 512

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class CorrectionSpec:
    """One correction map. Slots are ("fm", token axis) or ("sl", head, key, position) over the grid
    axes h, k, i, d (f, the feature, is h * head_dim + d); `weight` names the weight array's axes."""

    out: tuple[str, ...]
    inp: tuple[str, ...]
    weight: tuple[str, ...]
    unit: int  # CHUNK: rotations within 32-token chunks (FM side); 1: within one block
    mask: str  # the masked tensor whose mask gives the weights: "q", "k", "v" (feature-major) or "a" (SL)
    by_score_factor: bool  # weights = sigma * mask (scores), else mask / a_gain (context)

    def n_cts(self, layout: tuple[str, ...], geo: Geometry) -> int:
        return geo.sl_cts if layout[0] == "sl" else geo.fm_cts(geo.hidden)

    def babies(self, plan: HEPlan) -> tuple[int, ...]:
        return plan.block_babies(CHUNK) if self.unit == CHUNK else (BABY_STEPS,)


CORRECTIONS: dict[str, CorrectionSpec] = {
    "c1": CorrectionSpec(
        out=("sl", "h", "k", "i"), inp=("fm", "i"), weight=("k", "f"), unit=CHUNK, mask="k", by_score_factor=True
    ),
    "c2": CorrectionSpec(
        out=("sl", "h", "k", "i"), inp=("sl", "h", "k", "d"), weight=("i", "f"), unit=1, mask="q", by_score_factor=True
    ),
    "c3": CorrectionSpec(
        out=("fm", "i"), inp=("sl", "h", "k", "i"), weight=("k", "f"), unit=CHUNK, mask="v", by_score_factor=False
    ),
    "c4": CorrectionSpec(
        out=("fm", "i"), inp=("fm", "k"), weight=("h", "k", "i"), unit=1, mask="a", by_score_factor=False
    ),
}


def correction_weights(
    spec: CorrectionSpec, plan: HEPlan, masks: Masks, geo: Geometry, layer: int, inference: str, round_no: int
) -> np.ndarray:
    """The weight array of a correction: the round's mask of spec.mask, unpacked and scaled."""
    name = f"{layer}.{spec.mask}"
    if spec.mask == "a":
        mask = geo.unpack_sl(masks.draw(inference, round_no, name, geo.sl_cts))
    else:
        mask = geo.unpack_fm(masks.draw(inference, round_no, name, geo.fm_cts(geo.hidden)), geo.hidden)
    if spec.by_score_factor:
        return plan.layers[layer].score_factor(geo.n) * mask
    return mask / plan.layers[layer].a_gain


def _grid(geo: Geometry) -> dict[str, np.ndarray]:
    h = np.arange(geo.heads)[:, None, None, None]
    k = np.arange(geo.n)[None, :, None, None]
    i = np.arange(geo.n)[None, None, :, None]
    d = np.arange(geo.head_dim)[None, None, None, :]
    return {"h": h, "k": k, "i": i, "d": d, "f": h * geo.head_dim + d}


def _slots(geo: Geometry, grid: dict[str, np.ndarray], layout: tuple[str, ...]) -> np.ndarray:
    if layout[0] == "fm":
        return geo.fm_slot(grid[layout[1]], grid["f"], geo.hidden)
    return geo.sl_slot(*(grid[axis] for axis in layout[1:]))


def correction_triplets(spec: CorrectionSpec, geo: Geometry, weights: np.ndarray) -> Triplets:
    """(output slot, input slot, weight) over the grid (heads, n, n, head_dim) for one spec."""
    grid = _grid(geo)
    shape = (geo.heads, geo.n, geo.n, geo.head_dim)
    out = np.broadcast_to(_slots(geo, grid, spec.out), shape)
    inp = np.broadcast_to(_slots(geo, grid, spec.inp), shape)
    return out, inp, np.broadcast_to(weights[tuple(grid[axis] for axis in spec.weight)], shape)


class CorrectionKernels:
    """Builds correction maps for one engine, caching their layouts per (map, geometry)."""

    def __init__(self, plan: HEPlan, backend: Backend) -> None:
        self.plan = plan
        self.backend = backend
        self._layouts: OrderedDict[tuple[str, int, int], MapLayout] = OrderedDict()

    def layout(self, name: str, geo: Geometry, out: np.ndarray, inp: np.ndarray) -> MapLayout:
        """The diagonal layout of map `name` at this geometry (its slots `out`, `inp`), planned once."""
        key = (name, geo.n, geo.n_p)
        cached = self._layouts.get(key)
        if cached is not None:
            return cached
        spec = CORRECTIONS[name]
        layout = plan_map_fewest_rotations(
            out,
            inp,
            spec.n_cts(spec.inp, geo),
            spec.n_cts(spec.out, geo),
            self.backend.slots,
            spec.unit,
            spec.babies(self.plan),
        )
        self._layouts[key] = layout
        while len(self._layouts) > LAYOUT_CACHE_SIZE:
            self._layouts.popitem(last=False)
        return layout

    def build(self, name: str, geo: Geometry, weights: np.ndarray) -> EncodedMap:
        """The correction map `name` with these weights (a mask, scaled), encoded at level 2."""
        out, inp, values = correction_triplets(CORRECTIONS[name], geo, weights)
        s = self.plan.params.scale
        layout = self.layout(name, geo, out, inp)
        return encode_map(self.backend, layout.fill(values), CORRECTION_LEVEL, s, s)
