"""The `cipherbert` command line: serve, keys, classify, tag, models, and the training entry points.

    cipherbert serve --host 127.0.0.1 --port 8000 --data-dir data/service
    cipherbert keys create --url http://127.0.0.1:8000 --api-key KEY
    cipherbert classify --url http://127.0.0.1:8000 --api-key KEY --json "a gripping film"
    cipherbert tag --url http://127.0.0.1:8000 --api-key KEY "John Smith lives in Paris"
      (`classify` on a token-classification model tags instead)
    cipherbert distill ...        (delegates to distill.__main__.main)
    cipherbert dp-finetune ...    (delegates to dp_training.__main__.main)

Client commands never import torch; `serve` imports the engine only in its worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_USAGE, EXIT_FAIL = 2, 1


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get("CIPHERBERT_URL", "http://127.0.0.1:8000"),
        help="server URL (env CIPHERBERT_URL); repeat with commas for client-side round robin",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("CIPHERBERT_API_KEY"), help="bearer API key (env CIPHERBERT_API_KEY)"
    )
    p.add_argument("--model", default=os.environ.get("CIPHERBERT_MODEL"), help="model id (default: the first)")
    p.add_argument("--cache-dir", default=None, help="bundle cache and keystore (default ~/.cache/cipherbert)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cipherbert", description="Encrypted text classification (CKKS).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="run the API server (uvicorn)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--data-dir",
        default=None,
        help="keys, embedded store and server secret (default data/service, env CIPHERBERT_DATA_DIR)",
    )
    s.add_argument("--models-dir", default=None, help="directory of model directories (default ./models)")
    s.add_argument("--model", action="append", default=None, help="load only this model directory (repeatable)")
    s.add_argument("--api-keys", default=None, help="file of tenant:key lines (or env CIPHERBERT_API_KEYS)")
    s.add_argument("--workers", type=int, default=None, help="engine processes (default 2, env CIPHERBERT_WORKERS)")
    s.add_argument(
        "--engine-workers",
        type=int,
        default=None,
        help="processes per query inside the engine (2 = both cores on one query)",
    )
    s.add_argument(
        "--max-inflight", type=int, default=None, help="engine jobs queued or running per replica before 429"
    )
    s.add_argument("--rate-limit", default=None, help="per-tenant N/SECONDS for new inferences and keys")
    s.add_argument("--key-ttl", type=int, default=None, help="seconds a registered key lives")
    s.add_argument("--redis-url", default=None, help="use Redis (replicas) instead of the embedded store")
    s.add_argument("--replica-id", default=None, help="name in X-Cipherbert-Replica and logs")
    s.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="info")

    m = sub.add_parser("models", help="list the server's models")
    _client_args(m)

    k = sub.add_parser("keys", help="manage evaluation keys")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION")
    for name, helptext in (
        ("create", "generate keys locally and register the public part"),
        ("list", "list this tenant's registered keys"),
        ("delete", "delete a registered key"),
    ):
        kp = ksub.add_parser(name, help=helptext)
        _client_args(kp)
        if name == "delete":
            kp.add_argument("key_id")

    c = sub.add_parser("classify", help="classify text encrypted end to end")
    _client_args(c)
    c.add_argument("--json", action="store_true", help="print one JSON object per text")
    c.add_argument("--concurrency", type=int, default=1, help="inferences in flight at once (several texts)")
    c.add_argument("text", nargs="+", help="sentence(s) to classify")

    t = sub.add_parser("tag", help="token classification (NER) encrypted end to end: entities with offsets")
    _client_args(t)
    t.add_argument("--json", action="store_true", help="print one JSON object per text (entities, tokens, words)")
    t.add_argument(
        "--aggregation-strategy",
        default="simple",
        choices=("simple", "first", "none"),
        help="how pieces become entities, as in transformers' NER pipeline (default simple)",
    )
    t.add_argument("text", nargs="+", help="sentence(s) to tag")

    sub.add_parser("distill", help="train the HE-friendly student (distill.__main__)", add_help=False)
    sub.add_parser("dp-finetune", help="DP fine-tuning (dp_training.__main__)", add_help=False)
    return parser


def _fail(message: str, code: int = EXIT_FAIL) -> int:
    print(f"cipherbert: error: {message}", file=sys.stderr)
    return code


def _client(args):
    from clients.sdk import Client

    if not args.api_key:
        raise SystemExit(_fail("no API key: pass --api-key or set CIPHERBERT_API_KEY", EXIT_USAGE))
    progress = None if args.quiet else (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    return Client(
        urls if len(urls) > 1 else urls[0], args.api_key, model=args.model, cache_dir=args.cache_dir, progress=progress
    )


# serve flag -> Settings field (None: not given, the environment or the default applies)
SERVE_FLAGS = {
    "data_dir": "data_dir",
    "models_dir": "models_dir",
    "model": "models",
    "api_keys": "api_keys_file",
    "workers": "workers",
    "engine_workers": "engine_workers",
    "max_inflight": "max_inflight",
    "rate_limit": "rate_limit",
    "key_ttl": "key_ttl_s",
    "redis_url": "redis_url",
    "replica_id": "replica_id",
    "engine": "engine",
}


def serve_settings(args):
    """Settings from the environment with the given serve flags on top, validated and resolved."""
    from service.settings import Settings

    overrides = {
        field: getattr(args, flag) for flag, field in SERVE_FLAGS.items() if getattr(args, flag) not in (None, "")
    }
    if "api_keys_file" in overrides:  # --api-keys FILE replaces CIPHERBERT_API_KEYS
        overrides["api_keys"] = {}
    return Settings(**overrides).resolve()


def cmd_serve(args) -> int:
    import logging

    import uvicorn

    from service.app import create_app
    from service.settings import SettingsError

    try:
        settings = serve_settings(args)
    except SettingsError as exc:
        return _fail(str(exc), EXIT_USAGE)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.generated_keys_file:
        print(
            f"cipherbert: no API keys configured; using the development key(s) in {settings.generated_keys_file}",
            file=sys.stderr,
        )
    store = f"redis ({settings.redis_url})" if settings.redis_url else f"embedded ({settings.data_dir})"
    print(
        f"cipherbert: serving on http://{args.host}:{args.port} (docs at /docs), store {store}, "
        f"{settings.workers} engine workers, {len(set(settings.api_keys.values()))} tenant(s)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10
    )
    return 0


def cmd_models(args) -> int:
    with _client(args) as client:
        for m in client.models():
            print(
                f"{m['model_id']}\tmax_tokens={m['max_tokens']}\tlabels={m.get('labels')}\thash={m['model_hash'][:12]}"
            )
    return 0


def cmd_keys(args) -> int:
    if not args.keys_command:
        return _fail("keys needs an action: create, list or delete", EXIT_USAGE)
    with _client(args) as client:
        if args.keys_command == "create":
            key_id = client.register_keys()
            print(key_id)
        elif args.keys_command == "list":
            import datetime as dt

            keys = client.list_keys()
            if not keys:
                print("no keys registered for this API key's tenant", file=sys.stderr)
            for k in keys:
                exp = dt.datetime.fromtimestamp(k["expires_at"], dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
                print(f"{k['key_id']}\t{k['model_id']}\t{k['size'] / 1e6:.1f} MB\texpires {exp}")
        else:
            client.delete_key(args.key_id)
            print(f"deleted {args.key_id}")
    return 0


def cmd_classify(args) -> int:
    with _client(args) as client:
        if client.task() == "token-classification":
            return _print_tags(client, args.text, args.json, getattr(args, "aggregation_strategy", "simple"))
        results = client.classify_batch(args.text, concurrency=args.concurrency)
        for text, r in zip(args.text, results, strict=True):
            if args.json:
                print(json.dumps({"text": text, **r.to_dict()}))
            else:
                probs = ", ".join(f"{p:.3f}" for p in r.probabilities)
                print(
                    f"{r.label}\t[{probs}]\t{r.latency_s:.2f} s\tup {r.upload_bytes / 1e6:.2f} MB"
                    f"\tdown {r.download_bytes / 1e6:.2f} MB\trounds {r.rounds}\t{text}"
                )
    return 0


def cmd_tag(args) -> int:
    with _client(args) as client:
        return _print_tags(client, args.text, args.json, args.aggregation_strategy)


def _print_tags(client, texts: list[str], as_json: bool, strategy: str) -> int:
    for text in texts:
        r = client.tag(text, aggregation_strategy=strategy)
        if as_json:
            print(json.dumps({"text": text, **r.to_dict()}))
            continue
        print(f"{text}\t({r.latency_s:.2f} s, {r.n_tokens} tokens, rounds {r.rounds})")
        for e in r.entities:
            group = e.get("entity_group", e.get("entity"))
            print(f"  {group}\t{text[e['start'] : e['end']]!r}\t[{e['start']}:{e['end']}]\t{e['score']:.3f}")
        if not r.entities:
            print("  (no entities)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "distill":
        from distill.__main__ import main as distill_main

        return distill_main(argv[1:]) or 0
    if argv and argv[0] == "dp-finetune":
        from dp_training.__main__ import main as dp_main

        return dp_main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from clients.sdk import CipherbertError

    handlers = {"serve": cmd_serve, "models": cmd_models, "keys": cmd_keys, "classify": cmd_classify, "tag": cmd_tag}
    try:
        return handlers[args.command](args)
    except CipherbertError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}".rstrip(": "))


if __name__ == "__main__":
    sys.exit(main())
