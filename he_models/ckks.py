"""CKKS parameters, SEAL objects and their serialization; shared by the engine and the client half.

Uses TenSEAL's `sealapi` bindings directly: they expose what the high-level API hides and the engine
needs (levels, exact scales, Galois keys for chosen steps only, seeded symmetric ciphertexts that are
half the size of ordinary ones). Depends on tenseal and numpy only.
"""

from __future__ import annotations

import atexit
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
import tenseal.sealapi as seal

from he_models.errors import ClientInputError
from he_models.wire import WireError, pack_frames, unpack_frames

# Largest total coefficient-modulus bits for 128-bit classical security (HomomorphicEncryption.org
# standard, as enforced by SEAL's CoeffModulus.MaxBitCount).
MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

KEYS_FORMAT = "cipherbert-eval-keys/1"


class CKKSError(ClientInputError):
    """Bad parameters, or serialized data that does not belong to these parameters."""


@dataclass(frozen=True)
class CKKSParams:
    """One parameter set: ring degree, modulus chain (first = base prime, last = special prime), scale."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (55, 36, 36, 36, 55)
    scale_bits: int = 36

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        self.validate()

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def levels(self) -> int:
        """Rescales available to a fresh ciphertext."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def validate(self) -> None:
        n = self.poly_modulus_degree
        if n not in MAX_BITS_128:
            raise CKKSError(f"poly_modulus_degree {n} is not one of {sorted(MAX_BITS_128)}")
        total = sum(self.coeff_mod_bit_sizes)
        if total > MAX_BITS_128[n]:
            raise CKKSError(
                f"coefficient modulus of {total} bits exceeds {MAX_BITS_128[n]} bits, the 128-bit "
                f"security bound for N={n}"
            )
        if len(self.coeff_mod_bit_sizes) < 3:
            raise CKKSError("the modulus chain needs a base prime, one level and a special prime")
        if any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise CKKSError("every prime must have 20..60 bits")
        base = self.coeff_mod_bit_sizes[0]
        if base - self.scale_bits < 10:
            raise CKKSError(f"base prime of {base} bits leaves under 10 bits above the scale 2^{self.scale_bits}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CKKSParams:
        try:
            return cls(int(d["poly_modulus_degree"]), tuple(d["coeff_mod_bit_sizes"]), int(d["scale_bits"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CKKSError(f"bad CKKS parameter description: {exc}") from None

    def seal_context(self) -> seal.SEALContext:
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.poly_modulus_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(self.poly_modulus_degree, list(self.coeff_mod_bit_sizes)))
        ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not ctx.parameters_set():
            raise CKKSError(f"SEAL rejected the parameters: {ctx.parameters_error_message()}")
        return ctx


# ---------------------------------------------------------------------------------------------
# Serialization. SEAL's Python bindings save and load through file paths only; a per-thread file
# in shared memory keeps that cheap (about 2 ms for a ciphertext).

_tls = threading.local()
_scratch_files: set[tuple[int, str]] = set()


def _remove_scratch_files() -> None:
    for pid, path in list(_scratch_files):
        if pid == os.getpid():
            try:
                os.unlink(path)
            except OSError:
                pass


atexit.register(_remove_scratch_files)


def _scratch_path() -> str:
    path = getattr(_tls, "path", None)
    if path is None or getattr(_tls, "pid", None) != os.getpid():  # a forked child gets its own file
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="cipherbert-", suffix=".seal", dir=base)
        os.close(fd)
        _tls.path, _tls.pid = path, os.getpid()
        _scratch_files.add((os.getpid(), path))
    return path


def save_bytes(obj) -> bytes:
    """Serialize a SEAL object (Ciphertext, keys, or a Serializable from symmetric encryption)."""
    path = _scratch_path()
    obj.save(path)
    with open(path, "rb") as fh:
        return fh.read()


def load_into(obj, context: seal.SEALContext, data: bytes, what: str):
    """Load bytes into a fresh SEAL object; SEAL validates them against the parameters."""
    if not data:
        raise CKKSError(f"empty {what}")
    path = _scratch_path()
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        obj.load(context, path)
    except Exception as exc:  # SEAL raises ValueError/RuntimeError/IOError variants
        raise CKKSError(f"{what} is not valid for these CKKS parameters ({exc})") from None
    return obj


def load_ciphertext(context: seal.SEALContext, data: bytes, what: str = "ciphertext") -> seal.Ciphertext:
    ct = load_into(seal.Ciphertext(), context, data, what)
    if ct.size() != 2:
        raise CKKSError(f"{what} has {ct.size()} polynomials; expected 2 (relinearized)")
    return ct


# ---------------------------------------------------------------------------------------------
# Evaluation keys as uploaded by a client: a small JSON header, relinearization keys, Galois keys.


@dataclass
class EvalKeyHeader:
    params: dict
    galois_steps: list[int]
    format: str = KEYS_FORMAT
    parts: list[str] = field(default_factory=lambda: ["relin_keys", "galois_keys"])


def pack_eval_keys(params: CKKSParams, galois_steps: list[int], relin: bytes, galois: bytes) -> bytes:
    header = EvalKeyHeader(params=params.to_dict(), galois_steps=sorted(galois_steps))
    return pack_frames([json.dumps(asdict(header)).encode(), relin, galois])


# The key header's schema (docs/protocol.md, section 5): field -> required; anything else is refused.
KEY_HEADER_FIELDS = {"params": True, "galois_steps": True, "format": False, "parts": False}
CKKS_PARAM_FIELDS = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits")


def parse_key_header(frame: bytes) -> EvalKeyHeader:
    """The first frame of a key upload, checked field by field, so a wrong guess gets a useful answer."""
    try:
        raw = json.loads(frame.decode())
    except (UnicodeDecodeError, ValueError):
        raise CKKSError(
            "evaluation keys: the first frame must be a UTF-8 JSON object "
            '{"params": <bundle ckks>, "galois_steps": [...]}'
        ) from None
    if not isinstance(raw, dict):
        raise CKKSError("evaluation keys: the header must be a JSON object")
    parts = raw.get("parts")
    if isinstance(parts, list) and any("secret" in str(p).lower() for p in parts):
        raise CKKSError("refused: the upload carries a secret key; only public evaluation keys may be sent")
    unknown = sorted(set(raw) - set(KEY_HEADER_FIELDS))
    missing = [k for k, required in KEY_HEADER_FIELDS.items() if required and k not in raw]
    if unknown or missing:
        raise CKKSError(
            f"evaluation keys: header fields {sorted(raw)} refused (unknown: {unknown}, missing: "
            f"{missing}); allowed: {list(KEY_HEADER_FIELDS)}"
        )
    params, steps = raw["params"], raw["galois_steps"]
    if not isinstance(params, dict) or sorted(params) != sorted(CKKS_PARAM_FIELDS):
        raise CKKSError(f"evaluation keys: params must hold exactly {list(CKKS_PARAM_FIELDS)} (the bundle's ckks)")
    if (
        not isinstance(steps, list)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps)
        or len(set(steps)) != len(steps)
    ):
        raise CKKSError("evaluation keys: galois_steps must be a list of distinct integer rotation steps")
    for name in ("format", "parts"):
        if name in raw and not isinstance(raw[name], str if name == "format" else list):
            raise CKKSError(f"evaluation keys: header field {name!r} has the wrong type")
    return EvalKeyHeader(**raw)


def unpack_eval_keys(data: bytes) -> tuple[EvalKeyHeader, bytes, bytes]:
    """Split an upload into header, relin and Galois key bytes; refuse anything carrying a secret key."""
    if not isinstance(data, bytes | bytearray):
        raise CKKSError(f"evaluation keys must be bytes, got {type(data).__name__}")
    if data[:4] != b"CBF1":
        _refuse_tenseal_context(data)
        raise CKKSError("evaluation keys must be a cipherbert key bundle (framed header, relin, galois)")
    try:
        frames = unpack_frames(data, max_frames=8)
    except WireError as exc:
        raise CKKSError(f"evaluation keys: {exc}") from None
    header = parse_key_header(frames[0])
    if header.format != KEYS_FORMAT:
        raise CKKSError(f"evaluation keys: unknown format {header.format!r}")
    lowered = [p.lower() for p in header.parts]
    if any("secret" in p for p in lowered):
        raise CKKSError("refused: the upload carries a secret key; only public evaluation keys may be sent")
    if lowered != ["relin_keys", "galois_keys"] or len(frames) != 3:
        raise CKKSError(
            f"evaluation keys must hold exactly relin_keys and galois_keys, got parts {header.parts} "
            f"in {len(frames) - 1} frames"
        )
    return header, frames[1], frames[2]


def _header_types_ok(header: EvalKeyHeader) -> bool:
    """params a dict, galois_steps a list of ints, parts a list of strings, format a string."""
    return (
        isinstance(header.params, dict)
        and isinstance(header.format, str)
        and isinstance(header.galois_steps, list)
        and all(isinstance(s, int) and not isinstance(s, bool) for s in header.galois_steps)
        and isinstance(header.parts, list)
        and all(isinstance(p, str) for p in header.parts)
    )


def _refuse_tenseal_context(data: bytes) -> None:
    """A TenSEAL-serialized context may hold a secret key: say so rather than 'bad format'."""
    try:
        import tenseal as ts

        ctx = ts.context_from(data)
    except Exception:
        return
    if ctx.has_secret_key():
        raise CKKSError("refused: the upload is a TenSEAL context that carries a secret key")


def encode_vector(encoder: seal.CKKSEncoder, values: np.ndarray, parms_id, scale: float) -> seal.Plaintext:
    pt = seal.Plaintext()
    encoder.encode(np.ascontiguousarray(values, dtype=np.float64), parms_id, scale, pt)
    return pt
