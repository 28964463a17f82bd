"""A toy engine with a planted bug: a marker frame makes start/resume raise an unexpected TypeError.

Used to check that an engine bug is answered 500 `internal` (logged with its traceback), not 400 as if
the client had sent bad input, and that the server keeps serving afterwards.
`CIPHERBERT_ENGINE=tests.support.faultyengine:FaultyToyEngine`; models from toyengine.make_toy_model.
"""

from __future__ import annotations

from tests.support.toyengine import StepOutput, ToyEngine

BUG_MARKER = b"trigger-the-engine-bug"


class FaultyToyEngine(ToyEngine):
    def start(self, ctx, inference_id: str, n_tokens: int, inputs: list[bytes]) -> StepOutput:
        if BUG_MARKER in inputs:
            raise TypeError("planted bug in start: unsupported operand type(s)")
        return super().start(ctx, inference_id, n_tokens, inputs)

    def resume(
        self, ctx, state: bytes, replies: list[bytes], *, inference_id: str | None = None, round_no: int | None = None
    ) -> StepOutput:
        if BUG_MARKER in replies:
            raise TypeError("planted bug in resume: unsupported operand type(s)")
        return super().resume(ctx, state, replies, inference_id=inference_id, round_no=round_no)
