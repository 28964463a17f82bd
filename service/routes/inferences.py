"""Encrypted inferences: start one with the encrypted embeddings, answer its refresh rounds, abort it.

Every response is a CBF1 envelope (service.protocol): a JSON header frame plus the ciphertexts. Between
rounds the engine's opaque state waits in the store under a round token that binds tenant, key,
inference, round and the digest of what was sent. A round's state stays in the store until its
successor is written by a compare-and-swap (`advance_state`): of concurrent replies to one round exactly
one gets 200 and the others 409 wrong_round, and a round that failed on the server's side (the engine
pool or the store) can be answered again with nothing lost.
"""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service import worker
from service.contracts import InferenceRecord, StepResult
from service.deps import EngineTenant, ServiceDep, Tenant
from service.errors import ApiError
from service.pool import Service
from service.protocol import FRAMES_MEDIA_TYPE, frames_digest, pack_envelope, round_token, token_matches
from service.routes.keys import key_for
from service.schemas import ENVELOPE_RESPONSE, ERRORS, FRAMES_BODY, multipart_body
from service.uploads import binary_input, param, unpack

router = APIRouter(prefix="/inferences", tags=["inference"])

ROUND_TOKEN_HEADER = "X-Cipherbert-Round-Token"
START_BODY = multipart_body(
    ["frames"],
    frames={"type": "string", "format": "binary"},
    model={"type": "string"},
    key_id={"type": "string"},
    n_tokens={"type": "integer"},
)


def envelope_response(svc: Service, key_id: str, model_id: str, result: StepResult, round_tok: str | None) -> Response:
    step = result.step
    header = {
        "inference_id": step.inference_id,
        "round": step.round,
        "done": step.done,
        "kind": step.kind,
        "meta": step.meta,
        "round_token": round_tok,
        "model_id": model_id,
        "key_id": key_id,
        "server_s": round(result.seconds, 6),
        "replica": svc.settings.replica_id,
    }
    body = pack_envelope(header, step.to_client)
    svc.metrics.bytes.labels("out", "ciphertext").inc(len(body))
    headers = {
        "X-Cipherbert-Inference": step.inference_id,
        "X-Cipherbert-Round": str(step.round),
        "X-Cipherbert-Done": "true" if step.done else "false",
        "X-Cipherbert-Server-Seconds": f"{result.seconds:.6f}",
        "Cache-Control": "no-store",
    }
    if round_tok:
        headers[ROUND_TOKEN_HEADER] = round_tok
    return Response(body, media_type=FRAMES_MEDIA_TYPE, headers=headers)


def step_record(
    svc: Service, tenant: str, key_id: str, model_id: str, result: StepResult, created_at: float
) -> InferenceRecord:
    """The store record for the engine's step: the round it waits for and the digest of what was sent."""
    step = result.step
    return InferenceRecord(
        step.inference_id,
        tenant,
        key_id,
        model_id,
        step.round,
        frames_digest(step.to_client),
        step.done,
        created_at,
        time.time() + svc.settings.inference_ttl_s,
    )


def count_step(svc: Service, rec: InferenceRecord, result: StepResult) -> str | None:
    """Metrics for a stored step; the round token for its successor (None when done)."""
    step = result.step
    svc.metrics.rounds.labels(rec.model_id, step.kind).inc()
    if result.context_loaded:
        svc.metrics.ctx_loads.inc()
    if step.done:
        svc.metrics.inferences.labels(rec.model_id, "done").inc()
        return None
    return round_token(svc.token_key, rec.tenant, rec.key_id, step.inference_id, step.round, rec.digest)


async def record_step(
    svc: Service, tenant: str, key_id: str, model_id: str, result: StepResult, created_at: float
) -> str | None:
    """Store a new inference's first state; return the round token."""
    rec = step_record(svc, tenant, key_id, model_id, result, created_at)
    await svc.db(svc.store.put_state, rec, None if result.step.done else result.step.state)
    return count_step(svc, rec, result)


def token_count(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ApiError(422, "invalid_request", f"n_tokens must be an integer, got {raw!r}") from None


@router.post("", response_class=Response, responses=ENVELOPE_RESPONSE, openapi_extra=START_BODY)
async def start_inference(
    request: Request,
    svc: ServiceDep,
    tenant: EngineTenant,
    model: str | None = Query(None, description="model id"),
    key_id: str | None = Query(None, description="registered key id"),
    n_tokens: int | None = Query(None, ge=1, description="sentence length in tokens"),
) -> Response:
    """Start an encrypted inference: the body is a CBF1 frame set of the encrypted embeddings."""
    await svc.rate_limit(tenant, "inference")
    data, fields = await binary_input(request, svc.settings.max_frames_bytes, "ciphertext upload", "frames")
    model_id, kid = param(request, fields, "model"), param(request, fields, "key_id")
    n = token_count(param(request, fields, "n_tokens"))
    max_tokens = svc.model(model_id).info.max_tokens
    if not 1 <= n <= max_tokens:
        raise ApiError(422, "invalid_request", f"n_tokens must be in 1..{max_tokens}, got {n}")
    rec = await key_for(svc, tenant, kid)
    if rec.model_id != model_id:
        raise ApiError(400, "wrong_model", f"key {kid!r} was registered for model {rec.model_id!r}, not {model_id!r}")
    frames = unpack(data, svc.settings.max_frames, svc.settings.max_frames_bytes)
    svc.metrics.bytes.labels("in", "ciphertext").inc(len(data))
    inference_id = "i_" + secrets.token_urlsafe(18)
    created = time.time()
    result = await svc.run_engine(tenant, "start", worker.start, model_id, kid, inference_id, n, frames)
    if result.step.inference_id != inference_id:
        raise ApiError(503, "engine_failure", "engine answered for another inference")
    tok = await record_step(svc, tenant, kid, model_id, result, created)
    return envelope_response(svc, kid, model_id, result, tok)


async def pending_round(svc: Service, tenant: str, inference_id: str, round: int, tok: str) -> InferenceRecord:
    """The inference's record if it waits for exactly this round and the token matches."""
    rec = await svc.db(svc.store.peek_state, inference_id)
    if rec is None or rec.tenant != tenant:
        raise ApiError(404, "unknown_inference", f"inference {inference_id!r} is unknown, expired or not yours")
    if rec.done:
        raise ApiError(409, "inference_finished", f"inference {inference_id!r} already returned its logits")
    if rec.round != round:
        raise ApiError(
            409,
            "wrong_round",
            f"inference {inference_id!r} waits for round {rec.round}, not {round} (a round is answered once)",
        )
    expected = round_token(svc.token_key, tenant, rec.key_id, inference_id, round, rec.digest)
    if not token_matches(expected, tok):
        svc.metrics.errors.labels("bad_round_token").inc()
        raise ApiError(403, "bad_round_token", "the round token does not match this inference and round")
    return rec


@router.post(
    "/{inference_id}/rounds/{round}",
    response_class=Response,
    responses=ENVELOPE_RESPONSE,
    openapi_extra={"requestBody": FRAMES_BODY},
)
async def answer_round(
    inference_id: str,
    round: int,
    request: Request,
    svc: ServiceDep,
    tenant: EngineTenant,
    token: str | None = Query(None, description=f"round token (or {ROUND_TOKEN_HEADER})"),
) -> Response:
    """Send the client's reply to a refresh round; the response is the next round or the logits."""
    tok = request.headers.get(ROUND_TOKEN_HEADER) or token
    if not tok:
        raise ApiError(400, "missing_round_token", f"send the round token in {ROUND_TOKEN_HEADER}")
    data, _ = await binary_input(request, svc.settings.max_frames_bytes, "ciphertext upload", "frames")
    rec = await pending_round(svc, tenant, inference_id, round, tok)
    await key_for(svc, tenant, rec.key_id)
    frames = unpack(data, svc.settings.max_frames, svc.settings.max_frames_bytes)
    svc.metrics.bytes.labels("in", "ciphertext").inc(len(data))
    svc.require_ready()
    svc.check_capacity(tenant)
    claim = (inference_id, round)
    if claim in svc.answering:  # concurrent replies on this replica: 409 at once (replicas race below)
        raise ApiError(409, "wrong_round", f"round {round} of {inference_id!r} is being answered already")
    svc.answering.add(claim)
    try:
        result = await resume_once(svc, tenant, rec, frames, round)
        nxt = step_record(svc, tenant, rec.key_id, rec.model_id, result, rec.created_at)
        # The compare-and-swap: the round's state stays until this write succeeds. A store outage here
        # answers 503 and leaves the round answerable; losing the race to another replica answers 409.
        state = None if result.step.done else result.step.state
        if not await svc.db(svc.store.advance_state, nxt, state, round, rec.digest):
            raise ApiError(409, "wrong_round", f"round {round} of {inference_id!r} was answered by another request")
    finally:
        svc.answering.discard(claim)
    return envelope_response(svc, rec.key_id, rec.model_id, result, count_step(svc, nxt, result))


async def resume_once(svc: Service, tenant: str, rec: InferenceRecord, frames: list[bytes], round: int) -> StepResult:
    """Run the engine on the round's state, which stays in the store. A reply the engine refuses (the
    client's fault) ends the inference, so one masked state cannot be probed with several replies."""
    state = await svc.db(svc.store.get_state, rec.inference_id, round, rec.digest)
    if state is None:
        raise ApiError(409, "wrong_round", f"round {round} of {rec.inference_id!r} was already answered")
    try:
        result = await svc.run_engine(
            tenant, "resume", worker.resume, rec.model_id, rec.key_id, state, frames, rec.inference_id, round
        )
    except ApiError as exc:
        if exc.status < 500 and exc.status != 429:
            svc.metrics.inferences.labels(rec.model_id, "rejected").inc()
            await svc.db(svc.store.drop_state, rec.inference_id, round, rec.digest)
        raise
    if result.step.inference_id != rec.inference_id:
        raise ApiError(400, "mixed_round", "the state and the reply belong to different inferences")
    return result


@router.delete("/{inference_id}", status_code=204, responses=ERRORS)
async def abort_inference(inference_id: str, svc: ServiceDep, tenant: Tenant) -> Response:
    rec = await svc.db(svc.store.peek_state, inference_id)
    if rec is None or rec.tenant != tenant:
        raise ApiError(404, "unknown_inference", f"inference {inference_id!r} is unknown, expired or not yours")
    await svc.db(svc.store.delete_state, inference_id)
    return Response(status_code=204)
