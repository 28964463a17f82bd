"""What the SDK refuses to take on trust from a server: weak parameters, a changed bundle, odd rounds.

- `check_security(ckks)`: CKKS parameters must give 128-bit classical security (HomomorphicEncryption.org
  table); the server chooses them, so a weak choice is refused before any key is made.
- `BundlePins`: like ssh's known_hosts. The first bundle seen from a (server, model) is pinned (model
  hash, every file's sha256, CKKS parameters, protocol); a later change fails loudly until the user
  accepts it (`forget`).
- `RoundGuard`: rounds must come in order, with the kinds and the count the bundle announced, for one
  inference, then exactly one logits envelope (`token_logits` for a token-classification model).

Depends on he_models.protocol_spec (the protocol's tables) and the standard library only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from he_models import protocol_spec

PINS_FORMAT = "cipherbert-bundle-pins/1"


class TrustError(RuntimeError):
    """The server's answer is not one this client may use; `code` says which check refused it."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def check_security(ckks: dict) -> None:
    """Refuse CKKS parameters below 128-bit security (or that do not describe a CKKS chain at all)."""
    try:
        degree = int(ckks["poly_modulus_degree"])
        bits = [int(b) for b in ckks["coeff_mod_bit_sizes"]]
        scale = int(ckks["scale_bits"])
    except (KeyError, TypeError, ValueError):
        raise TrustError(f"the bundle's CKKS parameters are malformed: {ckks!r}", "weak_parameters") from None
    bound = protocol_spec.MAX_BITS_128.get(degree)
    if bound is None:
        raise TrustError(
            f"the server asks for ring degree {degree}; 128-bit security is tabulated for "
            f"{sorted(protocol_spec.MAX_BITS_128)} only",
            "weak_parameters",
        )
    if not protocol_spec.security_bits_ok(degree, bits):
        raise TrustError(
            f"the server asks for a {sum(bits)}-bit modulus at N={degree}: above {bound} bits "
            f"that is below 128-bit security; refusing to make keys",
            "weak_parameters",
        )
    if len(bits) < 3 or not 0 < scale < bits[0]:
        raise TrustError(f"the server's CKKS chain {bits} with scale 2^{scale} is not usable", "weak_parameters")


def pin_of(bundle: dict) -> dict:
    """The pinned identity of a bundle: what must not change silently between two uses."""
    return {
        "model_hash": bundle.get("model_hash"),
        "protocol": bundle.get("protocol"),
        "ckks": bundle.get("ckks"),
        "files": {f["name"]: f["sha256"] for f in bundle.get("files", [])},
    }


class BundlePins:
    """A 0600 JSON file of pinned bundles, keyed by server and model id."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict:
        if not self.path.exists():
            return {"format": PINS_FORMAT, "pins": {}}
        data = json.loads(self.path.read_text())
        if data.get("format") != PINS_FORMAT:
            raise TrustError(f"{self.path} is not a cipherbert pin file", "bad_pin_file")
        return data

    def _save(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, self.path)

    def check(self, server: str, bundle: dict) -> bool:
        """Pin on first use (returns True), pass if unchanged (False), raise TrustError if changed."""
        key = f"{server}|{bundle.get('model_id')}"
        data = self._load()
        mine = pin_of(bundle)
        pinned = data["pins"].get(key)
        if pinned is None:
            data["pins"][key] = {**mine, "pinned_at": time.time()}
            self._save(data)
            return True
        changed = sorted(k for k in mine if pinned.get(k) != mine[k])
        if changed:
            raise TrustError(
                f"the bundle of model {bundle.get('model_id')!r} at {server} changed since it was pinned "
                f"({', '.join(changed)} differ). If the operator really deployed a new model, remove the pin "
                f"(Client.forget_bundle or delete the entry in {self.path}); otherwise do not trust this "
                f"server",
                "bundle_changed",
            )
        return False

    def forget(self, server: str, model_id: str) -> None:
        data = self._load()
        if data["pins"].pop(f"{server}|{model_id}", None) is not None:
            self._save(data)


class RoundGuard:
    """The round sequence of one inference, as the bundle announces it."""

    def __init__(self, bundle: dict) -> None:
        self.rounds = int(bundle.get("rounds", 0))
        kinds = bundle.get("round_kinds")
        if kinds is None and bundle.get("protocol") and self.rounds:
            kinds = [protocol_spec.round_kind(r, self.rounds // 4) for r in range(1, self.rounds + 1)]
        self.kinds: list[str] | None = list(kinds) if kinds is not None else None
        if self.kinds is not None and len(self.kinds) != self.rounds:
            raise TrustError(f"the bundle announces {self.rounds} rounds but {len(self.kinds)} kinds", "bad_bundle")
        # The final envelope's kind follows the bundle's task (bundles before tasks: text classification).
        try:
            self.final_kind = protocol_spec.final_kind(str(bundle.get("task", "text-classification")))
        except ValueError as exc:
            raise TrustError(f"the bundle's task: {exc}", "bad_bundle") from None
        # One logit per ciphertext is he_models' protocol for text models; another client half may pack them
        # together, and token logits depend on the sentence's length (the client half counts those).
        self.num_labels = int(bundle.get("num_labels", 0)) or None if bundle.get("protocol") else None
        if self.final_kind != "logits":
            self.num_labels = None
        self.inference_id: str | None = None
        self.expected = 1
        self.finished = False

    def step(self, header: dict, frames: int) -> None:
        """Check one envelope header (and its frame count) before the client touches its ciphertexts."""
        if self.finished:
            raise TrustError("the server kept talking after the logits", "round_order")
        iid = header.get("inference_id")
        if self.inference_id is None:
            self.inference_id = iid
        elif iid != self.inference_id:
            raise TrustError(f"round for inference {iid!r} inside inference {self.inference_id!r}", "round_order")
        rnd, kind, done = header.get("round"), header.get("kind"), header.get("done")
        if rnd != self.expected:
            raise TrustError(f"the server sent round {rnd!r}; round {self.expected} was due", "round_order")
        if self.rounds and rnd > self.rounds + 1:
            raise TrustError(
                f"the server asks for round {rnd}, beyond the bundle's {self.rounds} rounds", "too_many_rounds"
            )
        if done:
            if self.rounds and rnd != self.rounds + 1:
                raise TrustError(f"logits after {rnd - 1} rounds; the bundle announces {self.rounds}", "round_order")
            if kind != self.final_kind:
                raise TrustError(f"the final envelope has kind {kind!r}, not {self.final_kind!r}", "round_kind")
            if self.num_labels is not None and frames != self.num_labels:
                raise TrustError(f"{frames} logit ciphertexts for {self.num_labels} labels", "frame_count")
            self.finished = True
            return
        if self.rounds and rnd > self.rounds:
            raise TrustError(
                f"the server asks for round {rnd}, beyond the bundle's {self.rounds} rounds", "too_many_rounds"
            )
        if self.kinds is not None and kind != self.kinds[rnd - 1]:
            raise TrustError(
                f"round {rnd} has kind {kind!r}; the bundle's round {rnd} is {self.kinds[rnd - 1]!r}", "round_kind"
            )
        if not header.get("round_token"):
            raise TrustError(f"round {rnd} comes without a round token", "round_order")
        self.expected += 1
