"""Engine benchmark: `python -m bench.engine [--model DIR] [--reps 5]`.

Prints a table and writes bench/results/engine.json: end-to-end latency (client encrypt + server
compute + refresh rounds + client decrypt, all in this process, no network), server-only compute,
rounds, bytes each way, evaluation-key size and peak memory at 16/32/64/128 tokens; the plaintext
PyTorch time for the same input; and, measured in the same run, a naive TenSEAL baseline (one
CKKSVector per token, CKKSVector.matmul and polyval) on the first encoder layer's linear projections,
against the engine doing the same projections for 32 tokens at once.

Ratios that survive a noisy machine (issue 12), all from the same run: every row also runs with the
engine in one process ("e2e_one_process_s") and counts the CKKS operations of one inference on the
critical path ("ops", per round in "ops_per_round", per kernel in "ops_by_part"); "rotation_s" is
one Galois rotation of a fresh ciphertext timed in this run, so e2e / rotation_s is the latency in
rotation-times; "length_ratio_128_32" is the one-process e2e at 128 over 32 tokens;
"multiply_plain_floor_32" the fewest slot-filling plaintext products a 32-token inference needs;
"batch" compares 16 short sentences classified as a batch and one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from he_models import opcount
from he_models.client import (
    ClientKeys,
    Embedder,
    answer_round,
    decrypt_logits,
    decrypt_token_logits,
    encrypt_embeddings,
)
from he_models.engine import EncryptedEngine
from he_models.kernels import apply_map
from he_models.opcount import multiply_plain_floor

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "he-bert-tiny-rt"
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def machine_info() -> dict:
    import tenseal

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "tenseal": tenseal.__version__, "torch": torch_version, "platform": platform.platform()}


def token_ids(embedder: Embedder, n: int) -> list[int]:
    """A real-text input of exactly n word pieces: SST-2 dev sentences run together, cut to length."""
    from cipherbert.data import load_sst2_dev

    cls_id, sep_id = embedder.token_ids("a")[0], embedder.token_ids("a")[-1]
    body: list[int] = []
    for ex in load_sst2_dev():
        body.extend(embedder.token_ids(ex.text)[1:-1])
        if len(body) >= n:
            break
    if n == 1:
        return [cls_id]
    return [cls_id] + body[: n - 2] + [sep_id]


def encrypted_run(engine: EncryptedEngine, keys: ClientKeys, ctx, emb: np.ndarray, inference_id: str) -> dict:
    t0 = time.perf_counter()
    geo = engine.geometry(emb.shape[0])
    inputs = encrypt_embeddings(keys, emb, geo)
    upload = sum(map(len, inputs))
    server = 0.0
    ts = time.perf_counter()
    out = engine.start(ctx, inference_id, emb.shape[0], inputs)
    server += time.perf_counter() - ts
    download, rounds = 0, 0
    while not out.done:
        download += sum(map(len, out.to_client))
        replies = answer_round(keys, out.kind, out.meta, out.to_client)
        upload += sum(map(len, replies))
        ts = time.perf_counter()
        out = engine.resume(ctx, out.state, replies, inference_id=inference_id, round_no=out.round)
        server += time.perf_counter() - ts
        rounds += 1
    download += sum(map(len, out.to_client))
    if out.kind == "token_logits":  # a token-classification model: (n, labels), no pooling
        logits = decrypt_token_logits(keys, out.meta, out.to_client, num_labels=engine.cfg.num_labels, geometry=geo)
    else:
        logits = decrypt_logits(keys, out.meta, out.to_client)
    return {"e2e": time.perf_counter() - t0, "server": server, "rounds": rounds, "upload": upload,
            "download": download, "logits": logits}


def naive_baseline(engine: EncryptedEngine, x: np.ndarray, tokens: int) -> dict:
    """One CKKSVector per token, TenSEAL's matmul and polyval, for layer 0's projections."""
    import tenseal as ts

    layer = engine.plan.layers[0]
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2 ** 40
    ctx.generate_galois_keys()
    gelu = engine.cfg.gelu_coeffs
    mats = [layer.wq, layer.wk, layer.wv, layer.wo, layer.w1]
    w2 = layer.w2
    times = []
    for t in range(tokens):
        start = time.perf_counter()
        for w in mats:
            v = ts.ckks_vector(ctx, x[t].tolist())
            v.matmul(w.tolist())
        u = ts.ckks_vector(ctx, (x[t] @ layer.w1).tolist())  # a fresh (refreshed) FFN input
        u.polyval(list(gelu))
        u_plain = x[t] @ layer.w1
        g = ts.ckks_vector(ctx, (gelu[0] + gelu[1] * u_plain + gelu[2] * u_plain ** 2).tolist())
        g.matmul(w2.tolist())
        times.append(time.perf_counter() - start)
    return {"tokens": tokens, "naive_per_token_s": statistics.mean(times)}


def engine_projections(engine: EncryptedEngine, keys: ClientKeys, ctx, x: np.ndarray, reps: int) -> float:
    """The same projections (QKV, O, FFN1 + square, FFN2) by the engine's kernels on 32 packed tokens."""
    from he_models.ckks import load_ciphertext

    geo = engine.geometry(x.shape[0])
    maps = engine.layer_maps()[0]
    be = engine.backend
    times = []
    for _ in range(reps):
        ct = [load_ciphertext(be.context, c) for c in encrypt_embeddings(keys, x, geo)]
        start = time.perf_counter()
        apply_map(be, maps.qkv, ct, ctx.galois)
        low = [be.mod_to(c, 1) for c in ct]
        apply_map(be, maps.o, low, ctx.galois)
        u = apply_map(be, maps.ffn1, ct, ctx.galois)
        g = [be.square(c, ctx.relin) for c in u]
        apply_map(be, maps.ffn2, g, ctx.galois)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rotation_seconds(engine: EncryptedEngine, keys: ClientKeys, ctx, reps: int = 30) -> float:
    """Median time of one Galois rotation (step 1) of a fresh top-level ciphertext."""
    from he_models.ckks import load_ciphertext

    geo = engine.geometry(32)
    x = np.random.default_rng(0).normal(size=(32, geo.hidden))
    ct = load_ciphertext(engine.backend.context, encrypt_embeddings(keys, x, geo)[0])
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        engine.backend.rotate(ct, 1, ctx.galois)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def counted_run(engine: EncryptedEngine, keys: ClientKeys, ctx, emb: np.ndarray, inference_id: str) -> dict:
    """One inference with every CKKS operation counted: overall, per round and per kernel."""
    opcount.install(engine.backend)
    with opcount.counting() as counter:
        encrypted_run(engine, keys, ctx, emb, inference_id)
    rounds = {name: counter.summary(name) for name in counter.sections if name == "start" or name[:1] == "r"}
    parts = {name: counter.summary(name) for name in counter.sections if name not in rounds}
    return {"ops": counter.critical(), "ops_per_round": rounds, "ops_by_part": parts,
            "ops_all": counter.summary(), "op_seconds": {k: round(v, 4) for k, v in counter.seconds.items()}}


def one_process_row(single: EncryptedEngine, keys: ClientKeys, ctx, emb: np.ndarray, reps: int) -> dict:
    """e2e with the engine in one process (median of reps) and the op counts of one inference."""
    n = emb.shape[0]
    counted = counted_run(single, keys, ctx, emb, f"count-{n}")  # also warms this length's layouts
    runs = [encrypted_run(single, keys, ctx, emb, f"one-{n}-{i}") for i in range(reps)]
    return {"e2e_one_process_s": statistics.median(r["e2e"] for r in runs), "reps_one_process": reps, **counted}


def short_sentences(embedder: Embedder, count: int = 16, max_tokens: int = 15) -> list[str]:
    from cipherbert.data import load_sst2_dev

    texts = [ex.text for ex in load_sst2_dev() if len(embedder.token_ids(ex.text)) <= max_tokens]
    return texts[:count]


def batch_compare(single: EncryptedEngine, keys: ClientKeys, ctx, embedder: Embedder) -> dict:
    """16 short sentences one by one against one batch (packed into 32-token chunks), engine in one process."""
    texts = short_sentences(embedder)
    start = time.perf_counter()
    alone = [encrypted_run(single, keys, ctx, embedder.embed(t), f"one-by-one-{i}")["logits"]
             for i, t in enumerate(texts)]
    one_by_one = time.perf_counter() - start
    start = time.perf_counter()
    packed, groups = batch_run(single, keys, ctx, embedder, texts)
    batch = time.perf_counter() - start
    diff = float(max(np.abs(a - b).max() for a, b in zip(alone, packed, strict=True)))
    same = sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(alone, packed, strict=True))
    return {"sentences": len(texts), "tokens": [len(embedder.token_ids(t)) for t in texts], "inferences": groups,
            "one_by_one_s": one_by_one, "batch_s": batch, "speedup": one_by_one / batch,
            "max_abs_logit_diff_vs_one_by_one": diff, "same_labels": same}


def batch_run(single: EncryptedEngine, keys: ClientKeys, ctx, embedder: Embedder,
              texts: list[str]) -> tuple[list[np.ndarray], int]:
    """Logits of every sentence, packing short ones into one inference per 32-token chunk
    (he_models.packing: block-diagonal attention, per-sentence pooling)."""
    from he_models.client import decrypt_segment_logits
    from he_models.packing import pack

    embs = [embedder.embed(t) for t in texts]
    groups = pack([e.shape[0] for e in embs])
    logits: list[np.ndarray] = [np.zeros(0)] * len(texts)
    for g, members in enumerate(groups):
        if len(members) == 1:
            logits[members[0]] = encrypted_run(single, keys, ctx, embs[members[0]], f"batch-{g}")["logits"]
            continue
        emb = np.concatenate([embs[i] for i in members])
        segments = [embs[i].shape[0] for i in members]
        iid = f"batch-{g}"
        out = single.start(ctx, iid, emb.shape[0], encrypt_embeddings(keys, emb, single.geometry(emb.shape[0])),
                           segments=segments)
        while not out.done:
            replies = answer_round(keys, out.kind, out.meta, out.to_client)
            out = single.resume(ctx, out.state, replies, inference_id=iid, round_no=out.round)
        for i, row in zip(members, decrypt_segment_logits(keys, out.meta, out.to_client, len(members)), strict=True):
            logits[i] = row
    return logits, len(groups)


def mask_tradeoff(engine: EncryptedEngine, keys: ClientKeys, ctx, embedder: Embedder, model,
                  bits_list: list[int], sentences: int = 8) -> list[dict]:
    """Hiding bits of the refresh masks vs the logit error they cost (same sentences, same keys)."""
    import torch

    from cipherbert.data import load_sst2_dev

    texts = [ex.text for ex in load_sst2_dev()[:sentences]]
    rows = []
    for bits in bits_list:
        engine.set_mask_bits(bits)
        errors = []
        for i, text in enumerate(texts):
            emb = embedder.embed(text)
            run = encrypted_run(engine, keys, ctx, emb, f"mask-{bits}-{i}")
            with torch.no_grad():
                ref = model.forward_embedded(torch.tensor(emb, dtype=torch.float32)[None],
                                             torch.ones(1, emb.shape[0])).logits[0].numpy()
            errors.append(float(np.abs(run["logits"] - ref).max()))
        effective = min(v[1] for v in engine.mask_limits.values())
        rows.append({"mask_bits": bits, "effective_min_bits": effective,
                     "mean_max_abs_logit_err": float(np.mean(errors)), "max_abs_logit_err": float(max(errors))})
        print(f"mask 2^{bits} x range (effective >= 2^{effective:.1f}): max |logit err| {max(errors):.2e}, "
              f"mean {np.mean(errors):.2e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--naive-tokens", type=int, default=32,
                        help="tokens for the naive TenSEAL baseline (per-token time is what is compared)")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine.json")
    parser.add_argument("--workers", type=int, default=2, help="engine processes per query (1 or 2)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only the latency table: no one-process rows, op counts, batch or naive baseline")
    parser.add_argument("--mask-trade", action="store_true",
                        help="only measure logit error against mask size; writes bench/results/mask_precision.json")
    args = parser.parse_args(argv)

    import torch

    from he_models.model import HEFriendlyBert

    torch.set_num_threads(1)
    t = time.perf_counter()
    engine = EncryptedEngine.load(args.model, os.urandom(32), workers=args.workers)
    load_s = time.perf_counter() - t
    bundle = engine.client_bundle()
    keys = ClientKeys.generate(bundle["ckks"], bundle["galois_steps"])
    public = keys.public_keys_bytes()
    ctx = engine.load_context(public)
    embedder = Embedder.from_model_dir(args.model)
    model = HEFriendlyBert.from_pretrained(args.model)
    if args.mask_trade:
        rows = mask_tradeoff(engine, keys, ctx, embedder, model, [0, 5, 10, 14, 17])
        out = args.out.parent / "mask_precision.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine_info(), "model": args.model.name, "rows": rows,
                                   "headroom_bits": 18, "ckks": engine.plan.params.to_dict()}, indent=2) + "\n")
        print(f"wrote {out}")
        engine.close()
        return 0
    results = []
    print(f"engine load {load_s:.1f} s; evaluation keys {len(public) / 1e6:.1f} MB; "
          f"{os.cpu_count()} cores")
    print(f"{'tokens':>6} {'e2e p50':>8} {'e2e p95':>8} {'server':>8} {'torch':>8} {'rounds':>6} "
          f"{'up MB':>7} {'down MB':>8} {'max|dlogit|':>11}")
    for n in args.tokens:
        emb = embedder.embed_ids(token_ids(embedder, n))
        engine.warm(n)  # one-time plaintext encoding of this token block, not timed
        runs = [encrypted_run(engine, keys, ctx, emb, f"bench-{n}-{i}") for i in range(args.reps)]
        with torch.no_grad():
            x = torch.tensor(emb, dtype=torch.float32)[None]
            mask = torch.ones(1, n)
            ptimes = []
            for _ in range(max(args.reps, 5)):
                s = time.perf_counter()
                reference = model.forward_embedded(x, mask).logits[0].numpy()
                ptimes.append(time.perf_counter() - s)
        e2e = sorted(r["e2e"] for r in runs)
        row = {
            "tokens": n,
            "e2e_p50_s": statistics.median(e2e),
            "e2e_p95_s": float(np.percentile(e2e, 95)),
            "server_p50_s": statistics.median(r["server"] for r in runs),
            "plaintext_s": statistics.median(ptimes),
            "rounds": runs[0]["rounds"],
            "upload_bytes": runs[0]["upload"],
            "download_bytes": runs[0]["download"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "max_abs_logit_err": float(max(np.abs(r["logits"] - reference).max() for r in runs)),
            "reps": args.reps,
        }
        results.append(row)
        print(f"{n:>6} {row['e2e_p50_s']:>8.2f} {row['e2e_p95_s']:>8.2f} {row['server_p50_s']:>8.2f} "
              f"{row['plaintext_s'] * 1e3:>6.1f}ms {row['rounds']:>6} {row['upload_bytes'] / 1e6:>7.2f} "
              f"{row['download_bytes'] / 1e6:>8.2f} {row['max_abs_logit_err']:>11.2e}")

    x32 = embedder.embed_ids(token_ids(embedder, 32))
    model_hash, params, limits = engine.model_hash, engine.plan.params.to_dict(), engine.mask_limits
    galois_steps = engine.plan.galois_steps
    task = engine.cfg.task
    if args.no_baselines:
        engine.close()
        return write_report(args.out, {
            "machine": machine_info(), "load_average": list(os.getloadavg()), "engine_workers": args.workers,
            "model": str(args.model.name), "task": task, "model_hash": model_hash, "ckks": params,
            "galois_steps": galois_steps, "eval_key_bytes": len(public), "engine_load_s": load_s,
            "results": results, "note": "latency table only (--no-baselines)",
        })
    if args.workers == 1:
        single = engine
    else:
        engine.close()
        del engine  # one engine's plaintexts at a time
        single = EncryptedEngine.load(args.model, os.urandom(32), workers=1)
    single_ctx = single.load_context(public)
    rotation_before = rotation_seconds(single, keys, single_ctx)
    for row in results:
        n = row["tokens"]
        reps = args.reps if n <= 64 else min(args.reps, 2)
        row.update(one_process_row(single, keys, single_ctx, embedder.embed_ids(token_ids(embedder, n)), reps))
        row["critical_rotations_plus_encodes"] = row["ops"]["rotations"] + row["ops"]["encodes"]
    # one rotation, timed before and after the rows (the machine's load drifts): the median of both
    rotation_s = statistics.median([rotation_before, rotation_seconds(single, keys, single_ctx)])
    print(f"one Galois rotation (top level): {rotation_s * 1e3:.2f} ms")
    for row in results:
        row["e2e_rotation_times"] = row["e2e_one_process_s"] / rotation_s
        print(f"{row['tokens']:>6} tokens, one process: e2e {row['e2e_one_process_s']:.2f} s = "
              f"{row['e2e_rotation_times']:.0f} rotation-times; ops {row['ops']}")
    by_n = {r["tokens"]: r for r in results}
    parallel = None
    if args.workers > 1 and 32 in by_n:
        p50_one, p50_two = by_n[32]["e2e_one_process_s"], by_n[32]["e2e_p50_s"]
        parallel = {"tokens": 32, "workers_1_e2e_p50_s": p50_one, f"workers_{args.workers}_e2e_p50_s": p50_two,
                    "speedup": p50_one / p50_two}
        print(f"32 tokens, one process: e2e p50 {p50_one:.2f} s; with {args.workers}: {p50_two:.2f} s "
              f"({p50_one / p50_two:.2f}x)")
    batch = batch_compare(single, keys, single_ctx, embedder)
    print(f"batch of {batch['sentences']} short sentences in {batch['inferences']} inferences: one by one "
          f"{batch['one_by_one_s']:.1f} s, batch {batch['batch_s']:.1f} s ({batch['speedup']:.2f}x), "
          f"max |logit diff| {batch['max_abs_logit_diff_vs_one_by_one']:.1e}, same labels {batch['same_labels']}")
    engine_s = engine_projections(single, keys, single_ctx, x32, reps=3)
    naive = naive_baseline(single, x32, args.naive_tokens)
    naive["engine_per_token_s"] = engine_s / 32
    naive["speedup"] = naive["naive_per_token_s"] / naive["engine_per_token_s"]
    naive["what"] = ("layer 0: Q, K, V, O and FFN1 matmuls, the GELU polynomial and the FFN2 matmul; naive: "
                     "one CKKSVector per token at N=8192 [60,40,40,60] with TenSEAL's matmul/polyval, every "
                     "projection from a fresh encryption; engine: the same projections on 32 packed tokens")
    print(f"naive TenSEAL {naive['naive_per_token_s'] * 1e3:.0f} ms/token vs engine "
          f"{naive['engine_per_token_s'] * 1e3:.1f} ms/token: {naive['speedup']:.0f}x")
    floor_32 = multiply_plain_floor(single.plan, 32)
    single.close()
    report = {
        "machine": machine_info(),
        "load_average": list(os.getloadavg()),
        "engine_workers": args.workers,
        "model": str(args.model.name),
        "task": task,
        "model_hash": model_hash,
        "ckks": params,
        "galois_steps": galois_steps,
        "eval_key_bytes": len(public),
        "engine_load_s": load_s,
        "mask_bits": {k: round(v[1], 2) for k, v in limits.items()},
        "results": results,
        "rotation_s": rotation_s,
        "multiply_plain_floor_32": floor_32,
        "multiply_plain_32": by_n[32]["ops"]["multiply_plain"] if 32 in by_n else None,
        "multiply_plain_floor_32_linear": multiply_plain_floor(single.plan, 32, corrections=False),
        "length_ratio_128_32": (by_n[128]["e2e_one_process_s"] / by_n[32]["e2e_one_process_s"]
                                if 128 in by_n and 32 in by_n else None),
        "batch_speedup": batch["speedup"],
        "batch": batch,
        "naive": naive,
        "parallel": parallel,
        "note": "e2e runs client and server in one process with no network; see bench/results/load.json "
                "for the service over HTTP. ops: critical path of one inference in one engine process "
                "(opcount sections named 'precompute' excluded); load_average: os.getloadavg() at the end",
    }
    return write_report(args.out, report)


def write_report(out: Path, report: dict) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
