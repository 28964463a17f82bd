"""`make demo`: start a local server, classify a few sentences and tag one encrypted through the SDK, stop it.

Every model under models/ is served; the first text-classification model classifies the sentences and the
first token-classification model (models/he-bert-tiny-conll) tags one sentence.

python -m cipherbert.demo [--model-dir models] [--workers 2] [sentences ...]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SENTENCES = [
    "a gripping, beautifully acted film that stays with you",
    "dull, overlong and completely forgettable",
    "the cast is charming but the script goes nowhere",
    "one of the most inventive comedies of the year",
]
TAG_SENTENCE = "Angela Merkel met Emmanuel Macron in Paris to talk about Airbus and the European Union."


def describe(client, model: str) -> None:
    bundle, _ = client.bundle(model)
    print(
        f"demo: model {model} ({bundle.get('task', 'text-classification')}, {bundle['num_labels']} labels, "
        f"{bundle['rounds']} refresh rounds, CKKS N={bundle['ckks']['poly_modulus_degree']})"
    )
    client.register_keys(model)
    print(
        f"demo: evaluation keys registered ({client.key_upload_bytes / 1e6:.1f} MB, once per key); "
        "the secret key stays in the local keystore"
    )
    print()


def classify_table(client, model: str, sentences: list[str]) -> None:
    """One row per sentence: label, probability, latency and bytes of the encrypted inference."""
    describe(client, model)
    print(f"{'label':<9} {'p':>5} {'latency':>8} {'sent':>8} {'received':>9} {'rounds':>6}  sentence")
    for text in sentences:
        r = client.classify(text, model=model)
        print(
            f"{r.label:<9} {max(r.probabilities):5.2f} {r.latency_s:7.2f}s {r.upload_bytes / 1e6:6.2f}MB "
            f"{r.download_bytes / 1e6:7.2f}MB {r.rounds:6d}  {text}",
            flush=True,
        )
    print()


def tag_one(client, model: str, text: str) -> None:
    """One sentence tagged encrypted: its entities, as transformers' NER pipeline shows them."""
    describe(client, model)
    r = client.tag(text, model=model)
    print(f"tagged in {r.latency_s:.2f} s ({r.n_tokens} tokens, {r.rounds} rounds): {text}")
    for e in r.entities:
        print(
            f"  {e['entity_group']:<5} {text[e['start'] : e['end']]!r:<24} [{e['start']}:{e['end']}]  {e['score']:.2f}"
        )
    if not r.entities:
        print("  (no entities)")
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cipherbert.demo", description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", default=str(REPO / "models"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("sentences", nargs="*")
    args = p.parse_args(argv)
    from cipherbert.launch import start_server
    from clients.sdk import CipherbertError, Client
    from service.worker import discover_models

    if not discover_models(args.models_dir):
        print(
            f"demo: no model directory with config.json under {args.models_dir}; "
            "train one first (cipherbert distill) or pull the repository's models/",
            file=sys.stderr,
        )
        return 1
    work = Path(tempfile.mkdtemp(prefix="cipherbert-demo-"))
    api_key = "demo-" + secrets.token_urlsafe(16)
    print(
        f"demo: starting a server on 127.0.0.1 ({args.workers} engine workers load and compile the model; "
        f"~10-30 s) ...",
        flush=True,
    )
    t0 = time.time()
    try:
        server = start_server(
            work, api_keys=f"demo:{api_key}", models_dir=Path(args.models_dir), workers=args.workers, ready_timeout=300
        )
    except Exception as exc:
        print(f"demo: the server did not start: {exc}", file=sys.stderr)
        return 1
    print(f"demo: server ready at {server.url} in {time.time() - t0:.1f} s (API docs: {server.url}/docs)")
    try:

        def progress(msg: str) -> None:
            if not msg.startswith("round "):  # keep the table readable
                print(f"  ... {msg}", flush=True)

        with Client(server.url, api_key, cache_dir=work / "client", progress=progress) as client:
            tasks = {m["model_id"]: client.task(m["model_id"]) for m in client.models()}
            text_models = [m for m, t in tasks.items() if t == "text-classification"]
            token_models = [m for m, t in tasks.items() if t == "token-classification"]
            if text_models:
                classify_table(client, text_models[0], args.sentences or SENTENCES)
            if token_models:
                tag_one(client, token_models[0], TAG_SENTENCE)
    except CipherbertError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        print("demo: server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
