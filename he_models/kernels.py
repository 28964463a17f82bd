"""Server-side CKKS kernels on packed ciphertexts.

Every linear map the engine applies — weight matrices over feature-major packing, the mask corrections
of the client-aided products, element-wise affine maps — is expressed as diagonals: y = sum_r d_r * rot(x, r).
`build_map` turns (output slot, input slot, weight) triplets into diagonals grouped for baby-step /
giant-step evaluation; `apply_map` evaluates them with baby steps taken one unit rotation at a time and
giant steps accumulated Horner-style, so a whole kernel needs Galois keys for three steps only
(unit, +giant, -giant) instead of one per diagonal.

Scales are kept exact: a map's plaintexts are encoded at q_last * out_scale / in_scale, so after the
single rescale the output carries exactly `out_scale`, whatever drift squaring introduced before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tenseal.sealapi as seal

from he_models.ckks import CKKSParams, encode_vector


class Backend:
    """One SEAL context with its encoder and evaluator, plus level bookkeeping."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self.context = params.seal_context()
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)
        self.slots = params.slots
        self._parms: dict[int, object] = {}
        self._last_prime: dict[int, float] = {}
        data = self.context.first_context_data()
        while data is not None:
            level = data.chain_index()
            self._parms[level] = data.parms_id()
            self._last_prime[level] = float(data.parms().coeff_modulus()[-1].value())
            data = data.next_context_data()
        self.top = max(self._parms)

    def parms_id(self, level: int):
        return self._parms[level]

    def level(self, ct: seal.Ciphertext) -> int:
        return self.context.get_context_data(ct.parms_id()).chain_index()

    def last_prime(self, level: int) -> float:
        return self._last_prime[level]

    # -- element-wise helpers (all return new ciphertexts) -----------------------------------
    def mod_to(self, ct: seal.Ciphertext, level: int) -> seal.Ciphertext:
        current = self.level(ct)
        if current < level:
            raise ValueError(f"ciphertext at level {current} cannot be raised to {level}")
        out = seal.Ciphertext()
        # Out-of-place mod switch; to the same level it is a plain copy (SEAL has no copy binding).
        self.evaluator.mod_switch_to(ct, self._parms[level], out)
        return out

    def copy(self, ct: seal.Ciphertext) -> seal.Ciphertext:
        return self.mod_to(ct, self.level(ct))

    def add(self, a: seal.Ciphertext, b: seal.Ciphertext) -> seal.Ciphertext:
        level = min(self.level(a), self.level(b))
        a, b = self.mod_to(a, level), self.mod_to(b, level)
        b.scale = a.scale  # equal by construction up to float rounding
        out = seal.Ciphertext()
        self.evaluator.add(a, b, out)
        return out

    def sub(self, a: seal.Ciphertext, b: seal.Ciphertext) -> seal.Ciphertext:
        level = min(self.level(a), self.level(b))
        a, b = self.mod_to(a, level), self.mod_to(b, level)
        b.scale = a.scale
        out = seal.Ciphertext()
        self.evaluator.sub(a, b, out)
        return out

    def add_plain(self, ct: seal.Ciphertext, values: np.ndarray) -> seal.Ciphertext:
        pt = encode_vector(self.encoder, values, ct.parms_id(), ct.scale)
        out = seal.Ciphertext()
        self.evaluator.add_plain(ct, pt, out)
        return out

    def sub_plain(self, ct: seal.Ciphertext, values: np.ndarray) -> seal.Ciphertext:
        return self.add_plain(ct, -np.asarray(values))

    def square(self, ct: seal.Ciphertext, relin: seal.RelinKeys) -> seal.Ciphertext:
        out = seal.Ciphertext()
        self.evaluator.square(ct, out)
        self.evaluator.relinearize_inplace(out, relin)
        self.evaluator.rescale_to_next_inplace(out)
        return out

    def rotate(self, ct: seal.Ciphertext, step: int, galois: seal.GaloisKeys) -> seal.Ciphertext:
        out = seal.Ciphertext()
        self.evaluator.rotate_vector(ct, step, galois, out)
        return out

    def sum_slots(self, ct: seal.Ciphertext, galois: seal.GaloisKeys) -> seal.Ciphertext:
        """Every slot ends up holding the sum of all slots (log2(slots) rotations)."""
        acc = ct
        step = self.slots // 2
        while step >= 1:
            rotated = self.rotate(acc, step, galois)
            acc = self.add(acc, rotated)
            step //= 2
        return acc


@dataclass
class DiagonalMap:
    """A linear map between lists of ciphertexts, as pre-rotated diagonals grouped for BSGS."""

    n_in: int
    n_out: int
    unit: int
    baby: int
    # out ct -> list of (in ct, giant index g, baby index b, pre-rotated diagonal)
    groups: dict[int, list[tuple[int, int, int, np.ndarray]]] = field(default_factory=dict)

    @property
    def giant(self) -> int:
        return self.unit * self.baby

    @property
    def diagonals(self) -> int:
        return sum(len(v) for v in self.groups.values())

    def steps(self) -> set[int]:
        return {self.unit, self.giant, -self.giant}

    def rotations(self) -> int:
        """Rotations one evaluation costs: baby chains per input plus Horner giant steps per output."""
        babies: dict[int, int] = {}
        total = 0
        for entries in self.groups.values():
            giants = [g for _, g, _, _ in entries]
            total += max(giants + [0]) - min(giants + [0])
            for ci, _, b, _ in entries:
                babies[ci] = max(babies.get(ci, 0), b)
        return total + sum(babies.values())


@dataclass
class MapLayout:
    """Where each triplet's weight lands among the diagonals: depends on the slots, not the weights,
    so maps whose weights change per request (mask corrections) reuse it."""

    n_in: int
    n_out: int
    unit: int
    baby: int
    slots: int
    row: np.ndarray  # diagonal index of each triplet
    col: np.ndarray  # slot within the (pre-rotated) diagonal
    entries: list[tuple[int, int, int, int]]  # per diagonal: (out ct, in ct, g, b)

    def fill(self, weights: np.ndarray) -> DiagonalMap:
        diags = np.zeros((len(self.entries), self.slots))
        diags[self.row, self.col] = np.asarray(weights, dtype=np.float64).ravel()
        dmap = DiagonalMap(n_in=self.n_in, n_out=self.n_out, unit=self.unit, baby=self.baby)
        for idx, (cout, cin, gg, bb) in enumerate(self.entries):
            dmap.groups.setdefault(cout, []).append((cin, gg, bb, diags[idx]))
        return dmap

    def rotations(self) -> int:
        return self.fill(np.zeros(len(self.row))).rotations()


def plan_map(
    out_slots: np.ndarray, in_slots: np.ndarray, n_in: int, n_out: int, slots: int, unit: int, baby: int
) -> MapLayout:
    """Group triplet positions (global out slot, global in slot) into BSGS diagonals.

    The rotation that brings input slot si to output slot so within one ciphertext is r = si - so (mod
    slots), taken signed so short shifts both ways stay short; r = (g * baby + b) * unit. Each diagonal
    is stored pre-rotated by -g*giant, so the giant rotation can follow the sum over baby steps.
    """
    out_slots = np.asarray(out_slots, dtype=np.int64).ravel()
    in_slots = np.asarray(in_slots, dtype=np.int64).ravel()
    co, so = np.divmod(out_slots, slots)
    ci, si = np.divmod(in_slots, slots)
    r = (si - so) % slots
    r = np.where(r > slots // 2, r - slots, r)
    if np.any(r % unit):
        raise ValueError(f"a diagonal offset is not a multiple of the unit {unit}")
    q = r // unit
    g = np.floor_divide(q, baby)
    b = q - g * baby
    g_min = int(g.min(initial=0))
    g_span = int(g.max(initial=0)) - g_min + 1
    key = ((co * n_in + ci) * g_span + (g - g_min)) * baby + b
    uniq, inverse = np.unique(key, return_inverse=True)
    giant = unit * baby
    entries = []
    for k in uniq.tolist():
        bb = k % baby
        rest = k // baby
        gg = rest % g_span + g_min
        rest //= g_span
        entries.append((int(rest // n_in), int(rest % n_in), int(gg), int(bb)))
    col = (so + g * giant) % slots
    return MapLayout(n_in=n_in, n_out=n_out, unit=unit, baby=baby, slots=slots, row=inverse, col=col, entries=entries)


def plan_map_fewest_rotations(
    out_slots, in_slots, n_in: int, n_out: int, slots: int, unit: int, babies: tuple[int, ...]
) -> MapLayout:
    """Try each baby-step count the Galois keys allow and keep the layout that rotates least."""
    layouts = [plan_map(out_slots, in_slots, n_in, n_out, slots, unit, baby) for baby in babies]
    return min(layouts, key=lambda layout: layout.rotations())


def build_map(
    out_slots: np.ndarray,
    in_slots: np.ndarray,
    weights: np.ndarray,
    n_in: int,
    n_out: int,
    slots: int,
    unit: int,
    baby: int,
) -> DiagonalMap:
    """Diagonals of the map given as triplets (global out slot, global in slot, weight)."""
    return build_map_fewest_rotations(out_slots, in_slots, weights, n_in, n_out, slots, unit, (baby,))


def build_map_fewest_rotations(
    out_slots, in_slots, weights, n_in: int, n_out: int, slots: int, unit: int, babies: tuple[int, ...]
) -> DiagonalMap:
    weights = np.asarray(weights, dtype=np.float64).ravel()
    keep = weights != 0
    out_slots = np.asarray(out_slots).ravel()[keep]
    in_slots = np.asarray(in_slots).ravel()[keep]
    layout = plan_map_fewest_rotations(out_slots, in_slots, n_in, n_out, slots, unit, babies)
    return layout.fill(weights[keep])


@dataclass
class EncodedMap:
    """A DiagonalMap with its plaintexts encoded at one level and scale (done once for weights)."""

    dmap: DiagonalMap
    level: int
    in_scale: float
    out_scale: float
    plaintexts: dict[int, list[tuple[int, int, int, seal.Plaintext]]]


def subset_map(emap: EncodedMap, outputs: list[int] | None = None, inputs: list[int] | None = None) -> EncodedMap:
    """The part of a map that produces some outputs or reads some inputs (no re-encoding).

    Used to split one kernel between two processes: output subsets for maps with several output
    ciphertexts, input subsets for maps whose partial results are summed afterwards.
    """
    out_index = {co: i for i, co in enumerate(outputs)} if outputs is not None else None
    in_index = {ci: i for i, ci in enumerate(inputs)} if inputs is not None else None
    plaintexts: dict[int, list] = {}
    for co, entries in emap.plaintexts.items():
        if out_index is not None and co not in out_index:
            continue
        kept = [
            (in_index[ci] if in_index is not None else ci, g, b, pt)
            for ci, g, b, pt in entries
            if in_index is None or ci in in_index
        ]
        if kept:
            plaintexts[out_index[co] if out_index is not None else co] = kept
    d = emap.dmap
    dmap = DiagonalMap(
        n_in=len(inputs) if inputs is not None else d.n_in,
        n_out=len(outputs) if outputs is not None else d.n_out,
        unit=d.unit,
        baby=d.baby,
    )
    return EncodedMap(
        dmap=dmap, level=emap.level, in_scale=emap.in_scale, out_scale=emap.out_scale, plaintexts=plaintexts
    )


def encode_map(backend: Backend, dmap: DiagonalMap, level: int, in_scale: float, out_scale: float) -> EncodedMap:
    pt_scale = backend.last_prime(level) * out_scale / in_scale
    parms = backend.parms_id(level)
    plaintexts = {
        co: [(ci, g, b, encode_vector(backend.encoder, diag, parms, pt_scale)) for ci, g, b, diag in entries]
        for co, entries in dmap.groups.items()
    }
    return EncodedMap(dmap=dmap, level=level, in_scale=in_scale, out_scale=out_scale, plaintexts=plaintexts)


def apply_map(
    backend: Backend, emap: EncodedMap, inputs: list[seal.Ciphertext], galois: seal.GaloisKeys
) -> list[seal.Ciphertext]:
    """Evaluate a map: baby rotations per input ciphertext, Horner giant steps per output, one rescale."""
    ev = backend.evaluator
    dmap = emap.dmap
    if len(inputs) != dmap.n_in:
        raise ValueError(f"map expects {dmap.n_in} input ciphertexts, got {len(inputs)}")
    inputs = [backend.mod_to(ct, emap.level) for ct in inputs]
    for ct in inputs:
        if abs(ct.scale / emap.in_scale - 1) > 1e-6:
            raise ValueError(f"input scale {ct.scale} does not match the map's {emap.in_scale}")
        ct.scale = emap.in_scale
    max_baby: dict[int, int] = {}
    for entries in emap.plaintexts.values():
        for ci, _, b, _ in entries:
            max_baby[ci] = max(max_baby.get(ci, 0), b)
    babies: dict[int, list[seal.Ciphertext]] = {}
    for ci, top in max_baby.items():
        chain = [inputs[ci]]
        for _ in range(top):
            chain.append(backend.rotate(chain[-1], dmap.unit, galois))
        babies[ci] = chain
    outputs: list[seal.Ciphertext] = []
    for co in range(dmap.n_out):
        plain = emap.plaintexts.get(co)
        if not plain:
            raise ValueError(f"output ciphertext {co} of the map has no diagonals")
        partial: dict[int, seal.Ciphertext] = {}
        tmp = seal.Ciphertext()
        for ci, g, b, pt in plain:
            if g in partial:
                ev.multiply_plain(babies[ci][b], pt, tmp)
                ev.add_inplace(partial[g], tmp)
            else:
                partial[g] = seal.Ciphertext()
                ev.multiply_plain(babies[ci][b], pt, partial[g])
        result = partial.get(0)
        for sign in (1, -1):
            giants = sorted((g for g in partial if g * sign > 0), key=abs, reverse=True)
            if not giants:
                continue
            acc = None
            for g in range(giants[0], 0, -sign):
                if g in partial:
                    if acc is None:
                        acc = partial[g]
                    else:
                        ev.add_inplace(acc, partial[g])
                if acc is not None:
                    acc = backend.rotate(acc, sign * dmap.giant, galois)
            if result is None:
                result = acc
            else:
                ev.add_inplace(result, acc)
        assert result is not None  # plain is not empty: some giant step holds a diagonal
        ev.rescale_to_next_inplace(result)
        result.scale = emap.out_scale
        outputs.append(result)
    return outputs
