"""Load test: concurrent SDK clients against a running deployment, every result checked.

    python -m bench.loadtest --clients 8 --duration 60 --url http://127.0.0.1:8080 --api-key KEY
    python -m bench.loadtest --clients 8 --duration 60 --local-replicas 2   # starts redis + 2 replicas + nginx

Each client is its own process with its own CKKS keys (its own keystore), classifies its own SST-2 dev
sentences in a loop, and checks the decrypted label against the plaintext HE-friendly model
(he_models.model.HEFriendlyBert, server-side tool: torch allowed here) on the same sentence. A result
whose logits match another sentence's plaintext logits is "crossed"; an inference that started and never
returned logits is "lost". Writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
TOL = 0.05  # logits within this of the plaintext model count as the same result


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def plaintext_reference(model_dir: Path, texts: list[str]) -> list[dict]:
    import torch

    from he_models.client import Embedder
    from he_models.model import HEFriendlyBert

    embedder = Embedder.from_model_dir(model_dir)
    model = HEFriendlyBert.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            emb = embedder.embed(text)
            logits = model.forward_embedded(torch.tensor(emb, dtype=torch.float32)[None],
                                            torch.ones(1, emb.shape[0])).logits[0].numpy()
            out.append({"text": text, "logits": [float(x) for x in logits], "label": int(np.argmax(logits)),
                        "n_tokens": int(emb.shape[0])})
    return out


def client_main(index: int, urls: list[str], api_key: str, model: str, cache_dir: str, refs: list[dict],
                start_evt, deadline_box, results_q, ready_q) -> None:
    """One load client (own process, own keys)."""
    from clients.sdk import CipherbertError, Client

    statuses: dict[str, int] = {}

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            resp = super().handle_request(request)
            statuses[str(resp.status_code)] = statuses.get(str(resp.status_code), 0) + 1
            return resp

    records = []
    try:
        client = Client(urls if len(urls) > 1 else urls[0], api_key, model=model, cache_dir=cache_dir,
                        keystore_dir=Path(cache_dir) / f"keys-client-{index}", transport=Counting(), retries=60)
        client.register_keys()
        labels = client.bundle()[0]["labels"]
        ready_q.put((index, None))
    except Exception as exc:  # setup failure is reported, not hidden
        ready_q.put((index, f"{type(exc).__name__}: {exc}"))
        return
    start_evt.wait(600)
    deadline = deadline_box.value
    mine = [r for i, r in enumerate(refs) if i % max(1, deadline_box.clients) == index] or refs
    k = 0
    while time.time() < deadline:
        ref = mine[k % len(mine)]
        k += 1
        t0 = time.time()
        rec = {"client": index, "text": ref["text"], "t_start": t0}
        try:
            r = client.classify(ref["text"])
            logits = np.array(r.logits)
            own = float(np.abs(logits - np.array(ref["logits"])).max())
            rec.update(ok=True, latency_s=r.latency_s, rounds=r.rounds, upload_bytes=r.upload_bytes, logits=r.logits,
                       expected=ref["logits"], n_tokens=r.n_tokens, inference_id=r.inference_id,
                       download_bytes=r.download_bytes, label_ok=(r.label == labels[ref["label"]]),
                       abs_err=own, replicas=sorted(set(r.replicas)))
            if own > TOL:
                others = [i for i, o in enumerate(refs) if o["text"] != ref["text"]
                          and float(np.abs(logits - np.array(o["logits"])).max()) <= TOL]
                rec["crossed"] = bool(others)
        except CipherbertError as exc:
            # lost: the server accepted the inference and it never returned logits
            rec.update(ok=False, error=str(exc)[:300], status=exc.status, lost=exc.inference_id is not None)
        except Exception as exc:
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300], lost=True)
        rec["t_end"] = time.time()
        records.append(rec)
    client.close()
    results_q.put((index, records, statuses))


def run(args) -> dict:
    from cipherbert.data import load_sst2_dev
    from clients.sdk import Client

    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="cipherbert-load-")
    with Client(urls[0], args.api_key, model=args.model, cache_dir=cache_dir) as probe:
        model = probe.model_id()
        bundle, _ = probe.bundle(model)
    model_dir = Path(args.model_dir) if args.model_dir else REPO / "models" / model
    from he_models.plan import model_hash

    if model_hash(model_dir) != bundle["model_hash"]:
        raise SystemExit(f"loadtest: {model_dir} is not the model the server runs (hash differs)")
    texts = [ex.text for ex in load_sst2_dev()]
    rng = np.random.default_rng(args.seed)
    texts = [texts[i] for i in rng.permutation(len(texts))[: args.sentences]]
    print(f"loadtest: plaintext reference for {len(texts)} sentences ...", file=sys.stderr, flush=True)
    refs = plaintext_reference(model_dir, texts)

    ctx = mp.get_context("spawn")
    start_evt = ctx.Event()
    manager = ctx.Manager()
    box = manager.Namespace()
    box.value = 0.0
    box.clients = args.clients
    results_q, ready_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=client_main, args=(i, urls, args.api_key, model, cache_dir, refs, start_evt, box,
                                                   results_q, ready_q), daemon=True) for i in range(args.clients)]
    print(f"loadtest: starting {args.clients} clients (key generation + registration) ...", file=sys.stderr,
          flush=True)
    for p in procs:
        p.start()
    setup_errors = []
    for _ in procs:
        idx, err = ready_q.get(timeout=900)
        if err:
            setup_errors.append(f"client {idx}: {err}")
    box.value = time.time() + args.duration
    t_start = time.time()
    start_evt.set()
    print(f"loadtest: running for {args.duration}s ...", file=sys.stderr, flush=True)
    records, statuses = collect_results(results_q, len(procs) - len(setup_errors), args.duration + 900)
    t_end = max([r["t_end"] for r in records], default=time.time())
    for p in procs:
        p.join(30)
    manager.shutdown()

    if getattr(args, "records", None):
        Path(args.records).write_text(json.dumps(records, indent=1))
    done = [r for r in records if r["ok"]]
    lat = [r["latency_s"] for r in done]
    elapsed = max(t_end - t_start, 1e-9)
    crossed = sum(1 for r in done if r.get("crossed"))
    report = {
        "clients": args.clients,
        "duration_s": round(elapsed, 3),
        "requested_duration_s": args.duration,
        "completed": len(done),
        "errors": len(records) - len(done) + len(setup_errors),
        "lost": sum(1 for r in records if r.get("lost")),
        "crossed": crossed,
        "label_mismatches": sum(1 for r in done if not r["label_ok"]),
        "label_agreement": (sum(1 for r in done if r["label_ok"]) / len(done)) if done else None,
        "max_abs_logit_err": max((r["abs_err"] for r in done), default=None),
        "status_5xx": sum(v for k, v in statuses.items() if k.startswith("5")),
        "status_counts": dict(sorted(statuses.items())),
        "throughput_rps": len(done) / elapsed,
        "p50_s": _percentile(lat, 50),
        "p95_s": _percentile(lat, 95),
        "p99_s": _percentile(lat, 99),
        "mean_s": statistics.fmean(lat) if lat else None,
        "rounds_per_inference": statistics.fmean([r["rounds"] for r in done]) if done else None,
        "mean_upload_bytes": statistics.fmean([r["upload_bytes"] for r in done]) if done else None,
        "mean_download_bytes": statistics.fmean([r["download_bytes"] for r in done]) if done else None,
        "inferences_crossing_replicas": sum(1 for r in done if len(r["replicas"]) > 1),
        "replicas_seen": sorted({x for r in done for x in r["replicas"]}),
        "setup_errors": setup_errors,
        "sample_errors": [r["error"] for r in records if not r["ok"]][:5],
        "model_id": model,
        "model_hash": bundle["model_hash"],
        "url": args.url,
        "topology": args.topology,
        "machine": machine_info(),
    }
    return report


def machine_info() -> dict:
    import tenseal

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "tenseal": tenseal.__version__,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            # the machine is shared: other jobs' load explains much of the latency spread
            "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()]}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as fh:
            info["mem_total_kb"] = int(fh.readline().split()[1])
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def start_local(n: int, workers: int, workdir: Path, api_key: str) -> tuple[list, str, str]:
    """redis + n replicas + nginx on loopback (n == 1: one server, embedded store)."""
    from cipherbert.launch import have, start_nginx, start_redis, start_server

    procs, env = [], {"CIPHERBERT_SECRET": "loadtest-" + os.urandom(16).hex(), "CIPHERBERT_RATE_LIMIT": "off",
                      "CIPHERBERT_WARM_TOKENS": os.environ.get("CIPHERBERT_WARM_TOKENS", "32,64")}
    keys = f"load:{api_key}"
    if n == 1:
        srv = start_server(workdir, api_keys=keys, workers=workers, env=env, replica_id="r1")
        return [srv], srv.url, f"1 server ({workers} engine workers), embedded store"
    redis = start_redis(workdir)
    procs.append(redis)
    env["CIPHERBERT_REDIS_URL"] = redis.url
    for i in range(n):
        procs.append(start_server(workdir, api_keys=keys, workers=workers, env=env, replica_id=f"r{i + 1}"))
    if have("nginx"):
        lb = start_nginx(workdir, [p.url for p in procs[1:]])
        procs.append(lb)
        return procs, lb.url, f"{n} replicas x {workers} engine workers, redis, nginx round robin"
    url = ",".join(p.url for p in procs[1:])
    return procs, url, f"{n} replicas x {workers} engine workers, redis, client-side round robin"


def collect_results(results_q, clients: int, timeout: float) -> tuple[list[dict], dict[int, int]]:
    """Every client process's records and HTTP status counts (a client silent past `timeout` is dropped)."""
    records: list[dict] = []
    statuses: dict[int, int] = {}
    for _ in range(clients):
        try:
            _, recs, st = results_q.get(timeout=timeout)
        except queue.Empty:
            break
        records += recs
        for k, v in st.items():
            statuses[k] = statuses.get(k, 0) + v
    return records, statuses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--url", default=os.environ.get("CIPHERBERT_URL"), help="deployment URL (comma list = round robin)")
    p.add_argument("--api-key", default=os.environ.get("CIPHERBERT_API_KEY"))
    p.add_argument("--model", default=None)
    p.add_argument("--model-dir", default=None, help="plaintext model directory (default models/<model id>)")
    p.add_argument("--sentences", type=int, default=64, help="SST-2 dev sentences in the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "load.json"))
    p.add_argument("--records", default=None, help="also write every inference's record (JSON) here")
    p.add_argument("--local-replicas", type=int, default=0, help="start redis + N replicas + nginx here first")
    p.add_argument("--workers", type=int, default=1, help="engine workers per local replica")
    args = p.parse_args(argv)
    procs = []
    args.topology = "external deployment"
    try:
        if args.local_replicas:
            args.api_key = args.api_key or "load-" + os.urandom(12).hex()
            workdir = Path(tempfile.mkdtemp(prefix="cipherbert-loadtest-"))
            print(f"loadtest: starting {args.local_replicas} local replica(s) in {workdir} ...", file=sys.stderr,
                  flush=True)
            procs, args.url, args.topology = start_local(args.local_replicas, args.workers, workdir, args.api_key)
        if not args.url or not args.api_key:
            p.error("--url and --api-key are required (or --local-replicas N)")
        report = run(args)
    finally:
        for proc in reversed(procs):
            proc.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    keys = ("clients", "duration_s", "completed", "errors", "lost", "crossed", "status_5xx", "throughput_rps",
            "p50_s", "p95_s", "label_agreement", "inferences_crossing_replicas")
    for k in keys:
        print(f"{k:>30}: {report[k]}")
    print(f"wrote {out}")
    return 0 if report["errors"] == 0 and report["crossed"] == 0 and report["status_5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
