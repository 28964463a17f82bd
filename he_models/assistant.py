"""The assistant: a forked copy of the engine that takes one half of each round.

sealapi holds the GIL, so threads would not help; a process gets the second core. It is forked after
the weight kernels are encoded, so it shares them copy-on-write. Ciphertexts cross the pipe as bytes;
evaluation keys cross once per key fingerprint. If the assistant dies, the engine carries on alone.
"""

from __future__ import annotations

import multiprocessing
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import tenseal.sealapi as seal

from he_models.ckks import load_ciphertext, save_bytes
from he_models.contracts import EngineError, EvalContext
from he_models.layout import Geometry
from he_models.parts import CIPHERTEXT_ARGS, RoundParts

KEY_CACHE_SIZE = 8
Part = tuple[str, dict[str, Any]]  # (part name, keyword arguments)
LoadContext = Callable[[bytes], EvalContext]


def to_wire(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A part's arguments as picklable values: ciphertexts as bytes, the geometry as a dict."""
    wire = {k: ([save_bytes(c) for c in v] if k in CIPHERTEXT_ARGS else v) for k, v in kwargs.items()}
    wire["geo"] = kwargs["geo"].to_dict()
    return wire


def from_wire(context: seal.SEALContext, wire: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(wire)
    kwargs["geo"] = Geometry.from_dict(kwargs["geo"])
    for key in CIPHERTEXT_ARGS:
        if key in kwargs:
            kwargs[key] = [load_ciphertext(context, b) for b in kwargs[key]]
    return kwargs


class Assistant:
    """The parent's handle on the forked process: submit a part, collect its result later."""

    def __init__(self, parts: RoundParts, load_context: LoadContext) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._proc = context.Process(
            target=assistant_main, args=(parts, load_context, child), daemon=True, name="cipherbert-engine-assistant"
        )
        self._proc.start()
        child.close()
        self._keys: set[str] = set()
        self._context = parts.backend.context

    def submit(self, ctx: EvalContext, name: str, kwargs: dict[str, Any]) -> Callable[[], list[seal.Ciphertext]]:
        """Send one part; returns a function that waits for and loads its result."""
        if ctx.fingerprint not in self._keys:
            self._conn.send(("keys", ctx.raw))
            self._keys.add(ctx.fingerprint)
        self._conn.send(("part", (ctx.fingerprint, name, to_wire(kwargs))))

        def result() -> list[seal.Ciphertext]:
            ok, value = self._conn.recv()
            if not ok:
                raise EngineError(f"engine assistant failed: {value}")
            return [load_ciphertext(self._context, b) for b in value]

        return result

    def close(self) -> None:
        try:
            self._conn.send(("stop", None))
        except (OSError, BrokenPipeError):
            pass
        self._proc.join(timeout=2)
        if self._proc.is_alive():
            self._proc.kill()


def assistant_main(parts: RoundParts, load_context: LoadContext, conn: Connection) -> None:
    """The child's loop: cache keys, run parts, answer (True, ciphertext bytes) or (False, error)."""
    contexts: OrderedDict[str, EvalContext] = OrderedDict()
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        if kind == "keys":
            ctx = load_context(payload)
            contexts[ctx.fingerprint] = ctx
            while len(contexts) > KEY_CACHE_SIZE:
                contexts.popitem(last=False)
            continue
        fingerprint, name, wire = payload
        try:
            out = parts.run(contexts[fingerprint], name, from_wire(parts.backend.context, wire))
            conn.send((True, [save_bytes(c) for c in out]))
        except Exception as exc:  # reported to the caller, which raises it
            conn.send((False, f"{type(exc).__name__}: {exc}"))


class Splitter:
    """Runs a round's two halves in parallel when an assistant is alive, else both here."""

    def __init__(self, parts: RoundParts, assistant: Assistant | None = None) -> None:
        self.parts = parts
        self.assistant = assistant

    def split(
        self, ctx: EvalContext, remote: Part, local: Callable[[], Any], whole: Callable[[], Any] | None = None
    ) -> tuple[Any, Any]:
        """Run `local()` here and the named half in the assistant; without an assistant, `whole()`
        (the unsplit computation, which shares rotations the halves would each repeat) if given."""
        name, kwargs = remote
        if self.assistant is None and whole is not None:
            return whole()
        if self.assistant is not None:
            try:
                pending = self.assistant.submit(ctx, name, kwargs)
            except (OSError, EOFError, BrokenPipeError):
                self.assistant = None  # the assistant died: carry on alone
            else:
                mine = local()
                try:
                    return mine, pending()
                except (OSError, EOFError):
                    self.assistant = None
                    return mine, self.parts.run(ctx, name, kwargs)
        mine = local()
        return mine, self.parts.run(ctx, name, kwargs)

    def close(self) -> None:
        if self.assistant is not None:
            self.assistant.close()
            self.assistant = None
