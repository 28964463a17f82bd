"""Parsing what a client uploads: its evaluation keys and its fresh ciphertexts.

These are the engine's load points for untrusted bytes. Whatever SEAL or the framing throws on garbage
(RuntimeError, TypeError, ValueError, ...) leaves here as EngineError, a ClientInputError, so the
service answers it 4xx; anything else escaping the engine is a bug and answered 500.
"""

from __future__ import annotations

import hashlib
import math

import tenseal.sealapi as seal

from he_models.ckks import CKKSError, load_ciphertext, load_into, unpack_eval_keys
from he_models.contracts import EngineError, EvalContext
from he_models.kernels import Backend
from he_models.plan import HEPlan


def load_context(plan: HEPlan, backend: Backend, public_keys: bytes) -> EvalContext:
    """Parse a client's evaluation keys; refuse secret keys, other parameters or missing steps."""
    if not isinstance(public_keys, bytes | bytearray):
        raise EngineError(f"evaluation keys must be bytes, got {type(public_keys).__name__}")
    public_keys = bytes(public_keys)
    try:
        header, relin_bytes, galois_bytes = unpack_eval_keys(public_keys)
    except CKKSError as exc:
        raise EngineError(str(exc)) from None
    if header.params != plan.params.to_dict():
        raise EngineError(
            f"evaluation keys use CKKS parameters {header.params}; this model needs {plan.params.to_dict()}"
        )
    missing = sorted(set(plan.galois_steps) - set(header.galois_steps))
    if missing:
        raise EngineError(f"evaluation keys lack Galois keys for rotation steps {missing}")
    relin, galois = _load_keys(backend.context, relin_bytes, galois_bytes)
    _check_galois(backend.context, plan.galois_steps, galois)
    fingerprint = hashlib.sha256(public_keys).hexdigest()[:32]
    return EvalContext(
        relin=relin,
        galois=galois,
        fingerprint=fingerprint,
        steps=list(header.galois_steps),
        nbytes=len(public_keys),
        raw=public_keys,
    )


def _load_keys(
    context: seal.SEALContext, relin_bytes: bytes, galois_bytes: bytes
) -> tuple[seal.RelinKeys, seal.GaloisKeys]:
    try:
        relin = load_into(seal.RelinKeys(), context, relin_bytes, "relinearization keys")
        galois = load_into(seal.GaloisKeys(), context, galois_bytes, "Galois keys")
    except CKKSError as exc:
        raise EngineError(str(exc)) from None
    if relin.size() == 0:
        raise EngineError("relinearization keys are empty")
    return relin, galois


def _check_galois(context: seal.SEALContext, steps: list[int], galois: seal.GaloisKeys) -> None:
    tool = context.key_context_data().galois_tool()
    for step, elt in zip(steps, tool.get_elts_from_steps(steps), strict=True):
        try:
            present = galois.has_key(elt)
        except Exception:  # SEAL raises on keys whose shape does not fit the parameters
            present = False
        if not present:
            raise EngineError(f"Galois keys declare step {step} but do not contain it")


def load_fresh(backend: Backend, payloads: list[bytes], expected: int, what: str) -> list[seal.Ciphertext]:
    """Load `expected` client ciphertexts; each must be fresh: top level, exact scale, NTT form."""
    if not isinstance(payloads, list | tuple):
        raise EngineError(f"{what}: expected a list of ciphertexts, got {type(payloads).__name__}")
    if len(payloads) != expected:
        raise EngineError(f"{what}: expected {expected} ciphertexts, got {len(payloads)}")
    return [_load_one(backend, data, f"{what} ciphertext {i}") for i, data in enumerate(payloads)]


def _load_one(backend: Backend, data: bytes, what: str) -> seal.Ciphertext:
    if not isinstance(data, bytes | bytearray):
        raise EngineError(f"{what} must be bytes, got {type(data).__name__}")
    try:
        ct = load_ciphertext(backend.context, bytes(data), what)
        level = backend.level(ct)
    except CKKSError as exc:
        raise EngineError(str(exc)) from None
    except Exception as exc:  # SEAL accepted the bytes but they name no level of this context
        raise EngineError(f"{what} does not belong to these CKKS parameters ({type(exc).__name__})") from None
    if level != backend.top:
        raise EngineError(f"{what} is at level {level}; fresh ciphertexts at level {backend.top} are required")
    params = backend.params
    if abs(ct.scale / params.scale - 1) > 1e-9:
        shown = f"2^{math.log2(ct.scale):.2f}" if ct.scale > 0 else repr(ct.scale)
        raise EngineError(f"{what} has scale {shown}; expected 2^{params.scale_bits}")
    if ct.is_ntt_form() is False:
        raise EngineError(f"{what} is not in NTT form (not a CKKS ciphertext)")
    return ct
