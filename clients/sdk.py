"""cipherbert Python SDK: encrypted text classification over REST.

    from clients.sdk import Client
    client = Client("http://127.0.0.1:8000", api_key="...")
    result = client.classify("a gripping, beautifully acted film")
    print(result.label, result.probabilities, result.latency_s, result.upload_bytes)

What happens: the SDK downloads and caches the model's client bundle (tokenizer, embedding tables, CKKS
parameters, rotation steps), generates a CKKS key pair once per (server, model) with Galois keys only
for the steps the model needs, keeps the secret key in a local keystore file (mode 0600, never sent),
registers the public evaluation context, then for each sentence: tokenize + embed locally, encrypt,
upload, answer the server's masked refresh rounds (decrypt, re-encrypt), decrypt the logits.

The cryptography is the client half's (`clients.client_half.ClientHalf`): by default he_models'
(`HEModelsClientHalf`); another engine's client half is passed in as `Client(..., client_half=...)`.
A bundle that names a different client module is refused with a clear error, never imported.

Depends on httpx, numpy, tenseal and he_models.client/wire only: never torch, never the server.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from clients import tagging
from clients.client_half import ClientHalf, HEModelsClientHalf, KeySet, TextEmbedder
from clients.results import RunStats
from clients.tagging import TagResult
from clients.trust import BundlePins, RoundGuard, TrustError, check_security
from he_models.wire import WireError, pack_frames, unpack_frames

ROUND_TOKEN_HEADER = "X-Cipherbert-Round-Token"
FRAMES_MEDIA_TYPE = "application/vnd.cipherbert.frames"
DEFAULT_CLIENT_MODULE = "he_models.client"
TEXT_TASK, TOKEN_TASK = "text-classification", "token-classification"  # the bundle's `task` (HF pipeline names)


class CipherbertError(RuntimeError):
    """A failure the user can act on; `status` and `code` are set for HTTP errors."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code
        self.inference_id: str | None = None  # set when an inference started and then failed
        self.round: int | None = None


@dataclass
class Result(RunStats):
    label: str
    probabilities: list[float]
    logits: list[float]


@dataclass(frozen=True)
class Session:
    """What the SDK holds per model once keys exist and are registered (built once, then reused)."""

    keys: KeySet
    key_id: str
    embedder: TextEmbedder
    bundle: dict
    bundle_dir: Path
    key_expires_at: float = float("inf")  # this machine's clock (time.time()) when the key expires


def default_home() -> Path:
    return Path(os.environ.get("CIPHERBERT_HOME", Path.home() / ".cache" / "cipherbert"))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _write_atomically(target: Path, data: bytes) -> None:
    """Write via a temporary file unique to this writer, so clients sharing a cache never collide."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Client:
    def __init__(
        self,
        base_url: str | list[str],
        api_key: str,
        *,
        model: str | None = None,
        cache_dir: str | Path | None = None,
        keystore_dir: str | Path | None = None,
        timeout: float = 300.0,
        retries: int = 20,
        progress: Callable[[str], None] | None = None,
        transport: httpx.BaseTransport | None = None,
        client_half: ClientHalf | None = None,
        pins_file: str | Path | None = None,
    ) -> None:
        """`base_url` may be a list: requests then go round-robin over the URLs (client-side balancing;
        one inference's rounds cross servers, which a replicated deployment must allow). `client_half`
        does the cryptography (default: he_models' client half). The first bundle seen per (server,
        model) is pinned in `pins_file` (<cache>/known_bundles.json)."""
        self.base_urls = [u.rstrip("/") for u in ([base_url] if isinstance(base_url, str) else base_url)]
        if not self.base_urls:
            raise CipherbertError("no server URL given")
        self._rr = 0
        self.api_key = api_key
        self.model = model
        self.home = Path(cache_dir) if cache_dir else default_home()
        self.keystore_dir = Path(keystore_dir) if keystore_dir else self.home / "keys"
        self.pins = BundlePins(Path(pins_file) if pins_file else self.home / "known_bundles.json")
        self.retries = retries
        self.client_half: ClientHalf = client_half or HEModelsClientHalf()
        self.progress = progress or (lambda msg: None)
        self.http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": "cipherbert-sdk/0.1"},
        )
        self._bundles: dict[str, tuple[dict, Path]] = {}
        self.key_upload_bytes = 0
        self._sessions: dict[str, Session] = {}  # model_id -> keys, key id, embedder, bundle
        self._key_lock = threading.Lock()  # one key renewal at a time (classify_batch runs threads)
        self._inference_s: list[float] = []  # recent inference times: how early a key must be renewed
        self._register_s = 0.0

    # http ----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _url(self, path: str) -> str:
        base = self.base_urls[self._rr % len(self.base_urls)]
        self._rr += 1
        return base + path

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One API call with retries on 429/503 (Retry-After) and on connection errors before sending."""
        for attempt in range(self.retries + 1):
            url = self._url(path)
            try:
                resp = self.http.request(method, url, **kwargs)
            except httpx.ConnectError as exc:
                if attempt < min(self.retries, 3):
                    time.sleep(0.5)
                    continue
                raise CipherbertError(f"cannot reach the cipherbert server at {url}: {exc}") from None
            except httpx.TimeoutException:
                raise CipherbertError(f"the server at {url} did not answer in time") from None
            except httpx.HTTPError as exc:
                raise CipherbertError(f"HTTP error talking to {url}: {exc}") from None
            if resp.status_code in (429, 503) and attempt < self.retries:
                wait = resp.headers.get("Retry-After", "1")
                time.sleep(min(float(wait) if wait.replace(".", "", 1).isdigit() else 1.0, 10.0))
                continue
            if resp.status_code >= 400:
                raise self._error(resp)
            return resp
        raise AssertionError("unreachable")

    @staticmethod
    def _error(resp: httpx.Response) -> CipherbertError:
        try:
            body = resp.json()
            code, detail = body.get("error"), body.get("detail")
        except (ValueError, AttributeError):
            code, detail = None, resp.text[:200]
        hint = {401: " (check the API key)", 429: " (rate limited)", 503: " (server busy or not ready)"}
        return CipherbertError(
            f"server answered {resp.status_code} {code or ''}: {detail}{hint.get(resp.status_code, '')}",
            status=resp.status_code,
            code=code,
        )

    # models and bundles --------------------------------------------------------------------------
    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def model_id(self) -> str:
        if self.model is None:
            models = self.models()
            if not models:
                raise CipherbertError("the server has no model loaded")
            self.model = models[0]["model_id"]
        return self.model

    def bundle(self, model: str | None = None) -> tuple[dict, Path]:
        """The model's client bundle (JSON + files), cached under <cache>/bundles/<model_hash>/."""
        model = model or self.model_id()
        if model in self._bundles:
            return self._bundles[model]
        bundle = self._request("GET", f"/v1/models/{model}/bundle").json()
        try:  # before any file, key or ciphertext: the server chooses the parameters and the bundle
            check_security(bundle.get("ckks") or {})
            if self.pins.check(self.base_urls[0], bundle):
                self.progress(f"pinned the bundle of {model} (model hash {str(bundle.get('model_hash'))[:16]}...)")
        except TrustError as exc:
            raise CipherbertError(str(exc), code=exc.code) from None
        bdir = self.home / "bundles" / bundle["model_hash"]
        bdir.mkdir(parents=True, exist_ok=True)
        for f in bundle.get("files", []):
            name = Path(f["name"]).name
            target = bdir / name
            if target.exists() and target.stat().st_size == f["bytes"] and _sha256(target) == f["sha256"]:
                continue
            self.progress(f"downloading {name} ({f['bytes'] / 1e6:.1f} MB)")
            data = self._request("GET", f"/v1/models/{model}/bundle/files/{name}").content
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                raise CipherbertError(f"bundle file {name} failed its sha256 check")
            _write_atomically(target, data)
        _write_atomically(bdir / "bundle.json", json.dumps(bundle, indent=1).encode())
        self._bundles[model] = (bundle, bdir)
        return bundle, bdir

    def check_client_half(self, bundle: dict) -> None:
        """Refuse a model whose client side is not this SDK's client half (never import what it names)."""
        name = bundle.get("client_module", DEFAULT_CLIENT_MODULE)
        if name != self.client_half.module:
            raise CipherbertError(
                f"model {bundle.get('model_id')!r} needs the client half {name!r}, but this client uses "
                f"{self.client_half.module!r}: pass a matching one as Client(..., client_half=...)"
            )

    # keys ------------------------------------------------------------------------------------------
    def _keystore_paths(self, bundle: dict) -> tuple[Path, Path]:
        server = hashlib.sha256(f"{self.base_urls[0]}|{self.api_key}".encode()).hexdigest()[:16]
        kdir = _private_dir(self.keystore_dir / server)
        stem = f"{bundle['model_id']}-{bundle['model_hash'][:16]}"
        return kdir / f"{stem}.secret", kdir / f"{stem}.json"

    def _session(self, model: str | None = None) -> Session:
        model = model or self.model_id()
        if model in self._sessions:
            return self._sessions[model]
        bundle, bdir = self.bundle(model)
        self.check_client_half(bundle)
        secret_path, meta_path = self._keystore_paths(bundle)
        if secret_path.exists():
            keys = self.client_half.load_keys(secret_path)
        else:
            self.progress("generating CKKS keys (only the model's rotation steps; once per server and model)")
            t0 = time.perf_counter()
            keys = self.client_half.generate_keys(bundle["ckks"], bundle["galois_steps"])
            keys.public_keys_bytes()  # the Galois keys are the slow part (cached by ClientKeys)
            save_secret(keys, secret_path)
            self.progress(f"keys generated in {time.perf_counter() - t0:.1f} s")
        key_id, known = None, None
        if meta_path.exists():
            key_id = json.loads(meta_path.read_text()).get("key_id")
            known = self._key_expiry(key_id) if key_id else None
        if key_id is not None and known is not None:
            expires = known
        else:
            key_id, expires = self._register(keys, bundle, meta_path)
        embedder = self.client_half.embedder(bundle, bdir)
        self._sessions[model] = Session(
            keys=keys, key_id=key_id, embedder=embedder, bundle=bundle, bundle_dir=bdir, key_expires_at=expires
        )
        return self._sessions[model]

    def _key_expiry(self, key_id: str) -> float | None:
        """When the registered key expires, on this machine's clock; None when the server no longer has it."""
        t0 = time.time()
        try:
            resp = self._request("GET", f"/v1/keys/{key_id}")
        except CipherbertError as exc:
            if exc.status == 404:
                return None
            raise
        info = resp.json()
        try:  # the server's clock from its Date header (whole seconds): the remaining lifetime, not the date
            server_now = email.utils.parsedate_to_datetime(resp.headers["date"]).timestamp()
        except (KeyError, TypeError, ValueError):
            server_now = t0
        return t0 + float(info["expires_at"]) - server_now - 1.0

    def _register(self, keys: KeySet, bundle: dict, meta_path: Path) -> tuple[str, float]:
        """Register the public keys; returns the key id and when it expires on this machine's clock."""
        public = keys.public_keys_bytes()
        self.progress(f"uploading evaluation keys ({len(public) / 1e6:.1f} MB)")
        t0 = time.time()
        info = self._request(
            "POST",
            "/v1/keys",
            params={"model": bundle["model_id"]},
            content=public,
            headers={"Content-Type": "application/octet-stream"},
        ).json()
        self._register_s = time.time() - t0
        meta_path.write_text(
            json.dumps(
                {
                    "key_id": info["key_id"],
                    "model_id": bundle["model_id"],
                    "expires_at": info["expires_at"],
                    "server": self.base_urls,
                }
            )
        )
        self.key_upload_bytes = len(public)
        # The key lives expires_at - created_at from the server's start, which is after t0 here.
        return info["key_id"], t0 + float(info["expires_at"]) - float(info["created_at"])

    def renew_margin(self) -> float:
        """Seconds of key lifetime an inference needs: twice the slowest recent one, a registration, 1 s."""
        slowest = max(self._inference_s, default=0.0)
        return 2.0 * slowest + self._register_s + 1.0

    def _live_session(self, model: str | None = None) -> Session:
        """The session, with a key that outlives the next inference: a new key is registered when less
        than `renew_margin()` seconds remain (the old one stays valid for inferences already running)."""
        session = self._session(model)
        if session.key_expires_at - time.time() >= self.renew_margin():
            return session
        with self._key_lock:
            current = self._sessions.get(session.bundle["model_id"], session)
            if current.key_expires_at - time.time() >= self.renew_margin():
                return current
            self.progress(f"key {current.key_id} expires in {current.key_expires_at - time.time():.0f} s: renewing")
            _, meta_path = self._keystore_paths(current.bundle)
            key_id, expires = self._register(current.keys, current.bundle, meta_path)
            renewed = dataclasses.replace(current, key_id=key_id, key_expires_at=expires)
            self._sessions[current.bundle["model_id"]] = renewed
            return renewed

    def _observe_inference(self, seconds: float) -> None:
        self._inference_s = [*self._inference_s[-7:], seconds]

    def register_keys(self, model: str | None = None) -> str:
        """Make sure keys exist locally and are registered; return the key id."""
        return self._session(model).key_id

    def list_keys(self) -> list[dict]:
        return self._request("GET", "/v1/keys").json()["keys"]

    def delete_key(self, key_id: str) -> None:
        self._request("DELETE", f"/v1/keys/{key_id}")
        for model, sess in list(self._sessions.items()):
            if sess.key_id == key_id:
                del self._sessions[model]

    # inference --------------------------------------------------------------------------------------
    def _post_frames(
        self, path: str, frames: list[bytes], params: dict | None = None, headers: dict | None = None
    ) -> tuple[dict, list[bytes], int, int, str]:
        body = pack_frames(frames)
        resp = self._request(
            "POST", path, params=params, content=body, headers={"Content-Type": FRAMES_MEDIA_TYPE, **(headers or {})}
        )
        try:
            got = unpack_frames(resp.content, max_frames=1 << 12, max_bytes=1 << 30)
            header = json.loads(got[0])
        except (WireError, ValueError, IndexError) as exc:
            raise CipherbertError(f"malformed response from the server: {exc}") from None
        return header, got[1:], len(body), len(resp.content), resp.headers.get("X-Cipherbert-Replica", "")

    def classify(self, text: str, model: str | None = None) -> Result:
        """Classify one text end to end (encrypt, rounds, decrypt). Raises CipherbertError.

        An inference the server can no longer resume (its state expired or was lost: 404
        unknown_inference, or 409 wrong_round for a round this client never got an answer to) is started
        again from the beginning, once; a misbehaving server is never retried."""
        return self._recovering(lambda: self._classify(text, model), model)

    def tag(self, text: str, model: str | None = None, aggregation_strategy: str = "simple") -> TagResult:
        """Token classification (NER) of one text, encrypted end to end: entities as transformers'
        pipeline("ner", aggregation_strategy=...) returns them ("simple", "first" or "none"), with
        character offsets into `text`, plus per-piece and per-word labels (TagResult)."""
        if aggregation_strategy not in tagging.STRATEGIES:
            raise CipherbertError(
                f"aggregation_strategy {aggregation_strategy!r}: use one of {list(tagging.STRATEGIES)}"
            )
        return self._recovering(lambda: self._tag(text, model, aggregation_strategy), model)

    def task(self, model: str | None = None) -> str:
        """The model's task as its bundle says: "text-classification" or "token-classification"."""
        return str(self.bundle(model)[0].get("task", TEXT_TASK))

    def _recovering(self, attempt: Callable[[], Any], model: str | None) -> Any:
        """One inference, started again once if the server cannot resume it; errors as CipherbertError."""
        try:
            result = self._once(attempt, model)
        except CipherbertError as exc:
            if exc.inference_id is None or exc.code not in RESTARTABLE:
                raise
            self.progress(f"inference {exc.inference_id} cannot be resumed ({exc.code}); starting again")
            result = self._once(attempt, model)
            result.restarts = 1
        return result

    def _once(self, attempt: Callable[[], Any], model: str | None) -> Any:
        try:
            return self._with_live_key(attempt, model)
        except TrustError as exc:  # the server broke the protocol's order or counts
            raise CipherbertError(f"the server misbehaved: {exc}", code=exc.code) from None
        except ValueError as exc:
            code = getattr(exc, "code", None)
            if code is not None:  # he_models.client.ProtocolViolation: counts, geometry, headroom
                raise CipherbertError(f"the server misbehaved: {exc}", code=code) from None
            raise CipherbertError(f"cannot classify this text: {exc}") from None
        except KeyError as exc:  # client-half errors: bad server data
            raise CipherbertError(f"cannot classify this text: {exc}") from None

    def _with_live_key(self, attempt: Callable[[], Any], model: str | None) -> Any:
        """Keys are renewed before they expire (`_live_session`); a key the server no longer has
        (expired anyway, or deleted) is registered again and the inference rerun, up to KEY_ATTEMPTS runs."""
        for attempt_no in range(KEY_ATTEMPTS):
            t0 = time.time()
            try:
                result = attempt()
                self._observe_inference(time.time() - t0)
                return result
            except CipherbertError as exc:
                if exc.code != "unknown_key" or attempt_no == KEY_ATTEMPTS - 1:
                    raise
                self._observe_inference(time.time() - t0)  # it ran out of key time: renew earlier from now on
                self._sessions.pop(model or self.model_id(), None)
                for path in self._keystore_paths(self.bundle(model)[0])[1:]:
                    path.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def forget_bundle(self, model: str) -> None:
        """Accept a changed bundle: drop its pin (the next use pins the new one)."""
        self.pins.forget(self.base_urls[0], model)
        self._bundles.pop(model, None)
        self._sessions.pop(model, None)

    def _session_for(self, text: str, model: str | None, task: str) -> Session:
        if not isinstance(text, str) or not text.strip():
            raise CipherbertError("cannot classify an empty text")
        session = self._live_session(model)
        theirs = str(session.bundle.get("task", TEXT_TASK))
        if theirs != task:
            use = "Client.tag(text) (cipherbert tag)" if theirs == TOKEN_TASK else "Client.classify(text)"
            raise CipherbertError(
                f"model {session.bundle['model_id']!r} does {theirs}, not {task}: use {use}", code="wrong_task"
            )
        return session

    def _run(self, session: Session, emb: np.ndarray, t0: float) -> tuple[Any, dict, list[bytes], dict]:
        """Encrypt the embeddings, start the inference and answer every round: (geometry, final header,
        its ciphertexts, the counters of a Result)."""
        half, keys, bundle = self.client_half, session.keys, session.bundle
        n_tokens = int(emb.shape[0])
        geo = half.geometry(bundle, n_tokens)
        frames = half.encrypt_embeddings(keys, emb, geo)
        t_enc = time.perf_counter() - t0
        header, to_client, up, down, replica = self._post_frames(
            "/v1/inferences",
            frames,
            params={"model": bundle["model_id"], "key_id": session.key_id, "n_tokens": n_tokens},
        )
        replicas, rounds, t_client = [replica], 0, 0.0
        t_server = float(header.get("server_s") or 0.0)
        guard = RoundGuard(bundle)  # order, kinds and count of the rounds, as the bundle announced them
        guard.step(header, len(to_client))
        while not header["done"]:
            rounds += 1
            self.progress(f"round {header['round']} ({header['kind']}, {len(to_client)} ciphertexts)")
            tc = time.perf_counter()
            replies = half.answer_round(keys, header["kind"], header.get("meta") or {}, to_client, geo)
            t_client += time.perf_counter() - tc
            iid, rnd = header["inference_id"], header["round"]
            try:
                header, to_client, u, d, replica = self._post_frames(
                    f"/v1/inferences/{iid}/rounds/{rnd}", replies, headers={ROUND_TOKEN_HEADER: header["round_token"]}
                )
            except CipherbertError as exc:  # the inference started but did not finish
                exc.inference_id, exc.round = iid, rnd
                raise
            guard.step(header, len(to_client))
            up, down = up + u, down + d
            replicas.append(replica)
            t_server += float(header.get("server_s") or 0.0)
        counters = {
            "upload_bytes": up,
            "download_bytes": down,
            "rounds": rounds,
            "n_tokens": n_tokens,
            "inference_id": header["inference_id"],
            "model_id": bundle["model_id"],
            "replicas": replicas,
            "timings": {"encrypt_s": t_enc, "client_rounds_s": t_client, "server_engine_s": t_server},
        }
        return geo, header, to_client, counters

    def _classify(self, text: str, model: str | None = None) -> Result:
        session = self._session_for(text, model, TEXT_TASK)
        t0 = time.perf_counter()
        emb = np.asarray(session.embedder.embed(text))
        _, header, to_client, counters = self._run(session, emb, t0)
        tc = time.perf_counter()
        meta, num_labels = header.get("meta") or {}, int(session.bundle["num_labels"])
        logits = np.asarray(
            self.client_half.decrypt_logits(session.keys, meta, to_client, num_labels), dtype=np.float64
        )
        counters["timings"]["client_rounds_s"] += time.perf_counter() - tc
        probs = _softmax(logits)
        labels = session.bundle.get("labels") or [str(i) for i in range(len(logits))]
        idx = int(np.argmax(logits))
        return Result(
            label=str(labels[idx]) if idx < len(labels) else str(idx),
            probabilities=[float(p) for p in probs],
            logits=[float(x) for x in logits],
            latency_s=time.perf_counter() - t0,
            **counters,
        )

    def _tag(self, text: str, model: str | None, strategy: str) -> TagResult:
        session = self._session_for(text, model, TOKEN_TASK)
        t0 = time.perf_counter()
        encoding = session.embedder.encode(text)
        emb = np.asarray(session.embedder.embed_ids(list(encoding.ids)))
        geo, header, to_client, counters = self._run(session, emb, t0)
        tc = time.perf_counter()
        labels = [str(x) for x in session.bundle["labels"]]
        logits = np.asarray(
            self.client_half.decrypt_token_logits(session.keys, header.get("meta") or {}, to_client, len(labels), geo),
            dtype=np.float64,
        )
        counters["timings"]["client_rounds_s"] += time.perf_counter() - tc
        tokenizer = getattr(session.embedder, "tokenizer", None)
        join = (
            tokenizer.decoder.decode if tokenizer is not None and tokenizer.decoder is not None else tagging.join_pieces
        )
        pieces = tagging.pieces_of(encoding)
        entities, tokens, words = tagging.tag_views(pieces, logits, labels, text, strategy, join)
        return TagResult(
            entities=entities,
            tokens=tokens,
            words=words,
            logits=logits.tolist(),
            labels=labels,
            aggregation_strategy=strategy,
            latency_s=time.perf_counter() - t0,
            **counters,
        )

    def classify_batch(self, texts: list[str], model: str | None = None, concurrency: int = 1) -> list[Result]:
        """Classify several texts; `concurrency` > 1 keeps that many inferences in flight (threads: the
        client's CKKS work is short, the waits on the server overlap). Results keep the input order."""
        texts = list(texts)
        if concurrency <= 1 or len(texts) <= 1:
            return [self.classify(t, model=model) for t in texts]
        self._session(model)  # keys and bundle once, before the threads
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(concurrency, len(texts)), thread_name_prefix="cipherbert") as ex:
            return list(ex.map(lambda t: self.classify(t, model=model), texts))


RESTARTABLE = ("unknown_inference", "wrong_round")
KEY_ATTEMPTS = 3  # runs of one inference when its key turns out expired or deleted (registered again each time)


def save_secret(keys: KeySet, path: Path) -> None:
    """Write the full context (with the secret key) readable by the owner only (0600, atomic)."""
    _private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    keys.save(tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
