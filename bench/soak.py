"""Soak test: honest SDK clients and hostile uploaders at once against a real `cipherbert serve` on loopback.

    python -m bench.soak --clients 4 --hostile 2 --duration 120      # soak (real model) + the upload case
    python -m bench.soak --uploads-only                                # only the 4 x 250 MB upload case

Soak: `--clients` SDK client processes (own keys, real model) classify SST-2 dev sentences in a loop and
check every decrypted result against the plaintext model (bench.loadtest.client_main); `--hostile`
threads meanwhile send garbage key uploads (up to 100 MB), oversized ones (over the per-request limit),
garbage and truncated ciphertext frames, for the same bounded time. A sampler reads the RSS of the API
process and of every engine worker (/proc) all along. Writes bench/results/soak.json.

Upload case (the issue's measurement, toy engine: the engine's cost is irrelevant): 4 concurrent 250 MB
garbage uploads to /v1/keys from 4 tenants, then 8 concurrent 60 MB frame uploads; API RSS idle, peak
and after. Writes bench/results/uploads.json. Everything binds 127.0.0.1; every process is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.loadtest import REPO, client_main, collect_results, machine_info, plaintext_reference

MB = 1e6
MIB = 1 << 20


# memory of processes (/proc: no extra dependency) ------------------------------------------------
def rss_mb(pid: int) -> float:
    """Resident set size now, MB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return 0.0


SOAK_MODEL = "he-bert-tiny-rt"

def children(pid: int) -> list[int]:
    """Every descendant of pid (engine workers and the helpers multiprocessing starts)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    kids = [int(x) for x in fh.read().split()]
                out += kids
                todo += kids
        except OSError:
            continue
    return out


def is_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "spawn_main" in cmd and "resource_tracker" not in cmd


class RssSampler:
    """Samples the API process and its engine workers every `every` seconds in a thread; peaks in MB."""

    def __init__(self, api_pid: int, every: float = 0.05) -> None:
        self.api_pid, self.every = api_pid, every
        self.api_peak = self.worker_peak = 0.0
        self.samples: list[tuple[float, float, float]] = []  # (t, api, max worker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            api = rss_mb(self.api_pid)
            workers = [rss_mb(p) for p in children(self.api_pid) if is_worker(p)]
            top = max(workers, default=0.0)
            self.api_peak, self.worker_peak = max(self.api_peak, api), max(self.worker_peak, top)
            self.samples.append((time.time(), api, top))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def workers_rss_mb(api_pid: int) -> float:
    """The largest engine worker's RSS now, MB."""
    return max((rss_mb(p) for p in children(api_pid) if is_worker(p)), default=0.0)


def settle(pid: int, seconds: float = 5.0) -> float:
    """RSS after the load: the lowest of a few readings over `seconds` (what stays, not a transient)."""
    readings = []
    for _ in range(int(seconds / 0.5)):
        time.sleep(0.5)
        readings.append(rss_mb(pid))
    return min(readings)


# hostile traffic ----------------------------------------------------------------------------------
def declared_only(url: str, api_key: str, path: str, length: int) -> int:
    """Declare `length` body bytes and send none: the status the server answers with (0: closed)."""
    host, port = url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        head = sock.recv(4096)
    return int(head.split()[1]) if head.startswith(b"HTTP/") else 0


def hostile_request(http: httpx.Client, url: str, api_key: str, key_id: str, kind: str, junk: bytes, size: int) -> int:
    """One bad request of the given kind; the status it got (0: the server closed the connection)."""
    model = SOAK_MODEL
    start = {"model": model, "key_id": key_id, "n_tokens": 8}
    if kind == "garbage_key":  # random bytes: refused by the engine's parser
        return http.post(f"{url}/v1/keys", params={"model": model}, content=junk[:size]).status_code
    if kind == "big_key":  # 100 MB, under the limit: spooled to disk, refused by the engine
        return http.post(f"{url}/v1/keys", params={"model": model}, content=junk).status_code
    if kind == "oversized_key":
        return declared_only(url, api_key, f"/v1/keys?model={model}", 300 * MIB)
    if kind == "oversized_frames":
        return declared_only(url, api_key, f"/v1/inferences?model={model}&key_id={key_id}&n_tokens=8", 65 * MIB)
    if kind == "garbage_frames":  # not a frame set
        return http.post(f"{url}/v1/inferences", params=start, content=junk[: 3 * MIB]).status_code
    if kind == "truncated_frames":
        body = b"CBF1\x02\x00\x00\x00" + junk[: 3 * MIB]
        return http.post(f"{url}/v1/inferences", params=start, content=body).status_code
    if kind == "junk_ciphertexts":  # a well-formed frame set of random "ciphertexts": the engine refuses them
        from he_models.wire import pack_frames

        body = pack_frames([junk[i * 400_000 : (i + 1) * 400_000] for i in range(4)])
        return http.post(f"{url}/v1/inferences", params=start, content=body).status_code
    token = {"X-Cipherbert-Round-Token": "AAAA"}  # a round of an inference that does not exist
    return http.post(f"{url}/v1/inferences/i_fake/rounds/1", headers=token, content=junk[:MIB]).status_code


HOSTILE_KINDS = ["garbage_key", "oversized_key", "garbage_frames", "truncated_frames", "oversized_frames",
                 "junk_ciphertexts", "fake_round", "big_key"]  # fmt: skip


def hostile_main(
    index: int, url: str, api_key: str, key_id: str, deadline: float, statuses: dict, lock: threading.Lock
) -> None:
    """One hostile client (a real registered key of its own): bad uploads in a fixed cycle until the deadline."""
    rng = __import__("random").Random(index)
    junk = os.urandom(100 * 1000 * 1000)
    http = httpx.Client(timeout=300, headers={"Authorization": f"Bearer {api_key}"})
    k = 0
    while time.time() < deadline:
        kind = HOSTILE_KINDS[k % len(HOSTILE_KINDS)]
        k += 1
        try:
            status: int | str = hostile_request(http, url, api_key, key_id, kind, junk, rng.randint(1, 20) * MIB)
        except httpx.HTTPError as exc:
            status = f"error:{type(exc).__name__}"
        with lock:
            statuses.setdefault(kind, {}).setdefault(str(status), 0)
            statuses[kind][str(status)] += 1
        time.sleep(0.2)
    http.close()


# the soak ---------------------------------------------------------------------------------------
def run_valid_clients(args, url: str, api_key: str, model: str, refs: list[dict], cache_dir: str, on_start) -> tuple:
    """The honest SDK clients (bench.loadtest.client_main in processes); on_start() runs as they begin."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start_evt, manager = ctx.Event(), ctx.Manager()
    box = manager.Namespace()
    box.value, box.clients = 0.0, args.clients
    results_q, ready_q = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=client_main,
            args=(i, [url], api_key, model, cache_dir, refs, start_evt, box, results_q, ready_q),
            daemon=True,
        )
        for i in range(args.clients)
    ]
    for p in procs:
        p.start()
    setup_errors = [err for _, err in (ready_q.get(timeout=900) for _ in procs) if err]
    box.value = time.time() + args.duration
    start_evt.set()
    t0 = time.time()
    on_start(box.value)
    records, statuses = collect_results(results_q, len(procs) - len(setup_errors), args.duration + 900)
    for p in procs:
        p.join(30)
    manager.shutdown()
    return records, statuses, setup_errors, time.time() - t0


def soak(args, workdir: Path) -> dict:
    from cipherbert.data import load_sst2_dev
    from cipherbert.launch import start_server
    from he_models.plan import model_hash

    valid_key, hostile_key = "soak-" + os.urandom(8).hex(), "hostile-" + os.urandom(8).hex()
    env = {"CIPHERBERT_SECRET": "soak-" + os.urandom(16).hex(), "CIPHERBERT_WARM_TOKENS": "32"}
    srv = start_server(
        workdir, api_keys=f"soak:{valid_key},hostile:{hostile_key}", workers=args.workers, env=env, replica_id="soak"
    )
    try:
        model = SOAK_MODEL  # a sentence classifier: the clients check labels against plaintext
        model_dir = REPO / "models" / model
        texts = [ex.text for ex in load_sst2_dev()][: args.sentences]
        refs = plaintext_reference(model_dir, texts)
        from clients.sdk import Client

        with Client(srv.url, valid_key, model=model, cache_dir=workdir / "clients") as probe:
            probe.bundle()  # once, before the client processes share the cache
        with Client(srv.url, hostile_key, model=model, cache_dir=workdir / "hostile") as bad:
            hostile_key_id = bad.register_keys()  # a real key: the hostile frames get as far as the engine
        idle = settle(srv.popen.pid, 2.0)
        hostile_statuses: dict = {}
        lock = threading.Lock()
        threads: list[threading.Thread] = []

        def start_hostile(deadline: float) -> None:
            for i in range(args.hostile):
                t = threading.Thread(
                    target=hostile_main,
                    args=(i, srv.url, hostile_key, hostile_key_id, deadline, hostile_statuses, lock),
                    daemon=True,
                )
                t.start()
                threads.append(t)

        with RssSampler(srv.popen.pid) as sampler:
            records, statuses, setup_errors, elapsed = run_valid_clients(
                args, srv.url, valid_key, model, refs, str(workdir / "clients"), start_hostile
            )
            for t in threads:
                t.join(300)
        after = settle(srv.popen.pid)
        worker_after = workers_rss_mb(srv.popen.pid)
        spool_left = len(list((srv.extra["data_dir"] / "spool").iterdir()))
        hash_ok = (
            model_hash(model_dir)
            == httpx.get(
                f"{srv.url}/v1/models/{model}/bundle", headers={"Authorization": f"Bearer {valid_key}"}
            ).json()["model_hash"]
        )
    finally:
        srv.stop()
    report = summarize(
        args, records, statuses, setup_errors, elapsed, hostile_statuses, sampler, idle, after, spool_left, hash_ok,
        model,
    )  # fmt: skip
    report["worker_rss_after_mb"] = round(worker_after, 1)
    report["api_rss_timeline_mb"] = timeline(sampler.samples)
    return report


def timeline(samples: list[tuple[float, float, float]], step: float = 10.0) -> list[list[float]]:
    """[seconds since start, API RSS MB, largest worker RSS MB] every `step` seconds: growth or a plateau."""
    out, t_next = [], samples[0][0] if samples else 0.0
    for t, api, worker in samples:
        if t >= t_next:
            out.append([round(t - samples[0][0], 1), round(api, 1), round(worker, 1)])
            t_next = t + step
    return out


def summarize(
    args, records, statuses, setup_errors, elapsed, hostile, sampler, idle, after, spool_left, hash_ok, model
) -> dict:
    done = [r for r in records if r["ok"]]
    hostile_5xx = sum(n for by in hostile.values() for s, n in by.items() if s.startswith("5"))
    return {
        "clients": args.clients,
        "hostile_clients": args.hostile,
        "seconds": round(elapsed, 2),
        "completed": len(done),
        "failed": len(records) - len(done) + len(setup_errors),
        "status_5xx": sum(v for k, v in statuses.items() if k.startswith("5")) + hostile_5xx,
        "lost": sum(1 for r in records if r.get("lost")),
        "agree_with_plaintext": sum(1 for r in done if r["abs_err"] <= 0.05 and r["label_ok"]),
        "max_abs_logit_err": max((r["abs_err"] for r in done), default=None),
        "valid_status_counts": dict(sorted(statuses.items())),
        "hostile_status_counts": hostile,
        "api_idle_rss_mb": round(idle, 1),
        "api_peak_rss_mb": round(sampler.api_peak, 1),
        "api_rss_after_mb": round(after, 1),
        "worker_peak_rss_mb": round(sampler.worker_peak, 1),
        "spool_files_left": spool_left,
        "model_id": model,
        "model_matches_reference": hash_ok,
        "workers": args.workers,
        "setup_errors": setup_errors,
        "sample_errors": [r["error"] for r in records if not r["ok"]][:5],
        "machine": machine_info(),
    }


# the upload case ---------------------------------------------------------------------------
def concurrent_posts(url: str, keys: list[str], path: str, body: bytes, params: dict | None = None) -> list:
    """POST body once per key at the same moment (threads); the statuses (or the transport error)."""
    out: list = [None] * len(keys)
    barrier = threading.Barrier(len(keys))

    def post(i: int) -> None:
        barrier.wait()
        try:
            out[i] = httpx.post(
                url + path, params=params, content=body, timeout=300, headers={"Authorization": f"Bearer {keys[i]}"}
            ).status_code
        except httpx.HTTPError as exc:
            out[i] = f"error:{type(exc).__name__}"

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def upload_case(args, workdir: Path) -> dict:
    from cipherbert.launch import start_server
    from tests.support.toyengine import make_toy_model

    models = make_toy_model(workdir / "models").parent
    keys = [f"t{i}-" + os.urandom(8).hex() for i in range(8)]
    srv = start_server(
        workdir,
        api_keys=",".join(f"t{i}:{k}" for i, k in enumerate(keys)),
        models_dir=models,
        engine="tests.support.toyengine:ToyEngine",
        workers=1,
        env={"CIPHERBERT_SECRET": "u" * 32, "CIPHERBERT_RATE_LIMIT": "off"},
    )
    report: dict = {}
    try:
        report["api_idle_rss_mb"] = round(settle(srv.popen.pid, 2.0), 1)
        cases = [
            ("keys_4x250MB", keys[:4], "/v1/keys", os.urandom(250_000_000), {"model": "toy"}),
            (
                "frames_8x60MB",
                keys,
                "/v1/inferences",
                b"CBF1\x01\x00\x00\x00" + os.urandom(60_000_000),
                {"model": "toy", "key_id": "k_none", "n_tokens": 4},
            ),
        ]
        for name, who, path, body, params in cases:
            with RssSampler(srv.popen.pid, every=0.02) as sampler:
                t0 = time.time()
                statuses = concurrent_posts(srv.url, who, path, body, params)
                seconds = time.time() - t0
            del body
            after = settle(srv.popen.pid)
            worker_after = workers_rss_mb(srv.popen.pid)
            report[name] = {
                "statuses": statuses,
                "seconds": round(seconds, 2),
                "api_peak_rss_mb": round(sampler.api_peak, 1),
                "api_rss_after_mb": round(after, 1),
                "api_peak_growth_mb": round(sampler.api_peak - report["api_idle_rss_mb"], 1),
                "api_after_growth_mb": round(after - report["api_idle_rss_mb"], 1),
                "worker_peak_rss_mb": round(sampler.worker_peak, 1),
                "worker_rss_after_mb": round(worker_after, 1),
            }
        report["spool_files_left"] = len(list((srv.extra["data_dir"] / "spool").iterdir()))
    finally:
        srv.stop()
    case = report["keys_4x250MB"]
    report["targets"] = {
        "peak_growth_le_300mb": case["api_peak_growth_mb"] <= 300,
        "after_within_100mb_of_idle": case["api_after_growth_mb"] <= 100,
    }
    report["machine"] = machine_info()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=4, help="honest SDK client processes (real model)")
    p.add_argument("--hostile", type=int, default=2, help="hostile uploader threads")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of soak (bounded)")
    p.add_argument("--workers", type=int, default=1, help="engine workers of the server")
    p.add_argument("--sentences", type=int, default=24)
    p.add_argument("--uploads-only", action="store_true", help="only the 4 x 250 MB upload case")
    p.add_argument("--skip-uploads", action="store_true", help="only the soak")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    p.add_argument("--uploads-out", default=str(REPO / "bench" / "results" / "uploads.json"))
    args = p.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory(prefix="cipherbert-soak-") as tmp:
        if not args.skip_uploads:
            up = upload_case(args, Path(tmp) / "uploads")
            _write(args.uploads_out, up)
            ok &= all(up["targets"].values())
        if not args.uploads_only:
            report = soak(args, Path(tmp) / "soak")
            _write(args.out, report)
            ok &= (
                report["status_5xx"] == 0
                and report["lost"] == 0
                and report["agree_with_plaintext"] == report["completed"]
                and report["failed"] == 0
            )
    return 0 if ok else 1


def _write(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
