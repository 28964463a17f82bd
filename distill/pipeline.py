"""The whole run: data -> teacher fine-tune -> cached teacher outputs -> students -> shipped model + metrics.

Every stage writes its result under work_dir and is skipped when that result exists, and the long
stages checkpoint inside themselves, so killing the command and running it again continues.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cipherbert.data import (  # noqa: E402
    SENTIMENT_LABELS, DatasetError, Example, load_examples, load_labelled, load_sst2_dev, sentiment_splits,
)
from distill.batching import Encoded, encode  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_task(cfg: dict) -> dict[str, list[Example]]:
    """train/dev/test(/sst2_dev) Examples, plus "_labels": the label names in id order (training set's)."""
    data = cfg["data"]
    if data["task"] == "sentiment":
        splits, removed = sentiment_splits(seed=cfg["seed"])
        parts = {"train": splits.train, "dev": splits.dev, "test": splits.test}
        label2id = dict(SENTIMENT_LABELS)
        if data["test"]:
            parts["test"] = load_examples(data["test"], label2id)
    else:
        train, label2id = load_labelled(data["train"])
        parts = {"train": train, "dev": load_examples(data["dev"], label2id)}
        parts["test"] = load_examples(data["test"], label2id) if data["test"] else []
    if data["sst2_dev"]:
        parts["sst2_dev"] = load_sst2_dev()
    if data["limit_train"]:
        parts["train"] = parts["train"][: data["limit_train"]]
    if data["limit_eval"]:
        for key in ("dev", "test", "sst2_dev"):
            if key in parts:
                parts[key] = parts[key][: data["limit_eval"]]
    labels = {ex.label for ex in parts["train"]}
    if len(labels) < 2:
        raise DatasetError(f"training data has a single label {sorted(labels)}; need at least two classes")
    names = sorted(label2id, key=label2id.get)
    if max(ex.label for part in parts.values() if part for ex in part) >= len(names):
        raise DatasetError(f"a label id is outside the training set's {len(names)} labels {names}")
    parts["_labels"] = names  # type: ignore[assignment]
    parts["_num_labels"] = len(names)  # type: ignore[assignment]
    return parts


def encode_parts(parts: dict, tokenizer, max_len: int) -> dict[str, Encoded]:
    return {k: encode(tokenizer, [e.text for e in v], [e.label for e in v], max_len)
            for k, v in parts.items() if not k.startswith("_") and v}


def teacher_stage(cfg: dict, parts: dict, device: torch.device):
    """Fine-tuned teacher (loaded from work_dir/teacher when already done) and its tokenizer."""
    from distill.teacher import finetune_teacher, load_teacher, save_teacher

    work = Path(cfg["work_dir"])
    done_dir = work / "teacher"
    num_labels = parts["_num_labels"]
    if (done_dir / "DONE").exists():
        teacher, tok = load_teacher(done_dir, num_labels)
        info = json.loads((done_dir / "DONE").read_text())
        log(f"teacher: loaded fine-tuned teacher from {done_dir} (dev {info.get('dev_accuracy')})")
        return teacher.to(device), tok, info
    tcfg = cfg["teacher"]
    teacher, tok = load_teacher(tcfg["path"], num_labels)
    enc = encode_parts(parts, tok, cfg["data"]["max_len"])
    info = {"source": teacher.source, "finetuned": False, "seconds": 0.0}
    if tcfg["finetune"] and tcfg["epochs"] > 0:
        res = finetune_teacher(
            teacher, enc["train"], enc["dev"], epochs=tcfg["epochs"], lr=tcfg["lr"],
            batch_size=tcfg["batch_size"], device=device, seed=cfg["seed"], ckpt_dir=work / "teacher_ckpt",
            warmup=tcfg["warmup"], weight_decay=tcfg["weight_decay"], progress=cfg["progress"], log=log)
        info.update(finetuned=True, dev_accuracy=res["dev_accuracy"], seconds=res["seconds"],
                    history=res["history"], epochs=tcfg["epochs"], lr=tcfg["lr"])
    save_teacher(teacher, tok, done_dir, meta=info)
    (done_dir / "DONE").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(work / "teacher_ckpt", ignore_errors=True)
    return teacher.to(device), tok, info


def teacher_outputs(cfg: dict, teacher, tok, parts: dict, enc: dict, device: torch.device) -> dict:
    """Cached teacher logits for every split and the augmented sentences (work_dir/teacher_logits.pt)."""
    from distill.augment import augment
    from distill.teacher import predict_logits

    path = Path(cfg["work_dir"]) / "teacher_logits.pt"
    copies = cfg["distill"]["augment"]
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached.get("augment") == copies and cached.get("n_train") == len(enc["train"]):
            log(f"teacher logits: loaded from {path}")
            return cached
    bs = cfg["teacher"]["batch_size"] * 2
    out: dict = {"augment": copies, "n_train": len(enc["train"])}
    for key, data in enc.items():
        out[key] = predict_logits(teacher, data, bs, device, desc=f"teacher logits {key}", progress=cfg["progress"])
    aug_texts = augment([e.text for e in parts["train"]], copies, seed=cfg["seed"])
    out["aug_texts"] = aug_texts
    if aug_texts:
        aug = encode(tok, aug_texts, [-1] * len(aug_texts), cfg["data"]["max_len"])
        out["aug"] = predict_logits(teacher, aug, bs, device, desc="teacher logits aug", progress=cfg["progress"])
    torch.save(out, path)
    log(f"teacher logits: {len(enc['train'])} train, {len(aug_texts)} augmented sentences cached in {path}")
    return out


def hidden_outputs(cfg: dict, teacher, enc: dict, he_cfg, device: torch.device):
    from distill.cache import HiddenCache, default_layer_map

    path = Path(cfg["work_dir"]) / "teacher_hidden.pt"
    layer_map = cfg["distill"]["layer_map"] or default_layer_map(he_cfg.num_layers, teacher.num_layers)
    if len(layer_map) != he_cfg.num_layers or not all(1 <= t <= teacher.num_layers for t in layer_map):
        from he_models.config import ConfigError

        raise ConfigError(f"config field distill.layer_map {layer_map} must give one teacher layer "
                          f"(1..{teacher.num_layers}) per student layer ({he_cfg.num_layers})")
    if path.exists():
        cache = HiddenCache.load(path)
        if cache.layer_map == layer_map and len(cache.lengths) == len(enc["train"]):
            log(f"teacher hidden states: loaded from {path}")
            return cache
    t0 = time.time()
    cache = HiddenCache.build(teacher, enc["train"], layer_map, he_cfg.num_heads,
                              cfg["teacher"]["batch_size"] * 2, device, progress=cfg["progress"])
    cache.save(path)
    log(f"teacher hidden states: layers {[0] + layer_map} cached ({time.time() - t0:.0f}s)")
    return cache


def student_config(cfg: dict, overrides: dict, tok, labels: list[str], name: str):
    from he_models.config import HEConfig

    fields = {"vocab_size": len(tok), "num_labels": len(labels), "name": name,
              "id2label": dict(enumerate(labels)),
              "pad_token_id": tok.pad_token_id or 0, **cfg["student"], **overrides}
    return HEConfig(**fields)


def run_student(cfg: dict, name: str, he_cfg, teacher, enc: dict, logits: dict, hidden, device, *,
                stage1_epochs: int, stage2_epochs: int, pca_init: bool = True, use_aug: bool = True,
                use_kd: bool = True, batch_size: int | None = None, aug_copies: int | None = None):
    """Train (or load) one student; returns (model, result dict with accuracies)."""
    from distill.batching import encode as _encode
    from distill.student import StudentRun, accuracy, build_student, predict
    from he_models.model import HEFriendlyBert

    sdir = Path(cfg["work_dir"]) / "students" / name
    done = sdir / "DONE.json"
    if done.exists():
        result = json.loads(done.read_text())
        model = HEFriendlyBert.from_pretrained(sdir / "model")
        log(f"{name}: already trained (dev {result['dev_accuracy']:.4f})")
        return model.to(device), result
    sdir.mkdir(parents=True, exist_ok=True)
    (sdir / "LOCK").write_text(str(os.getpid()))
    model = build_student(he_cfg, teacher, pca_init=pca_init, seed=cfg["seed"])
    dcfg = dict(cfg["distill"])
    if batch_size:
        dcfg["batch_size"] = dcfg["batch_size_stage2"] = batch_size
    run = StudentRun(name, model, sdir, device, seed=cfg["seed"], progress=cfg["progress"], log=log)
    aug = aug_logits = None
    if use_aug and logits.get("aug_texts"):
        texts, a_logits = logits["aug_texts"], logits["aug"]
        if aug_copies is not None and logits.get("augment"):
            # the augmented list is ordered copy by copy: keep the first `aug_copies` copies' worth
            keep = min(len(texts), round(len(texts) * aug_copies / logits["augment"]))
            texts, a_logits = texts[:keep], a_logits[:keep]
        aug = _encode(_tok_cache["tok"], texts, [-1] * len(texts), cfg["data"]["max_len"])
        aug_logits = a_logits
    res = run.train(train=enc["train"], train_logits=logits["train"], aug=aug, aug_logits=aug_logits,
                    hidden_cache=hidden, dev=enc.get("dev"), dcfg=dcfg, stage1_epochs=stage1_epochs,
                    stage2_epochs=stage2_epochs, use_kd=use_kd)
    model = run.model
    from distill.student import record_ranges

    datasets = [enc["train"]] + ([aug] if aug is not None else [])
    record_ranges(model, datasets, device)
    result = {"name": name, "seconds": res["seconds"], "history": res["history"],
              "approximations": approximations(model.config)}
    for key in ("dev", "test", "sst2_dev"):
        if key in enc:
            result[f"{key}_accuracy"] = accuracy(predict(model, enc[key], device), enc[key].labels)
    result["ranges"] = model.recorded_ranges()
    model.save_pretrained(sdir / "model")
    done.write_text(json.dumps(result, indent=2) + "\n")
    (sdir / "LOCK").unlink(missing_ok=True)
    log(f"{name}: dev {result.get('dev_accuracy', float('nan')):.4f} test {result.get('test_accuracy', float('nan')):.4f}"
        f" sst2 {result.get('sst2_dev_accuracy', float('nan')):.4f} ({res['seconds']:.0f}s)")
    return model, result


_tok_cache: dict = {}


def finish_student(cfg: dict, name: str, he_cfg, enc: dict, logits: dict, device, put_result) -> dict:
    """Stop a student where its checkpoints are (when time runs out): keep its best dev epoch so far,
    record ranges, evaluate, and mark it done. The result says how far it got."""
    from distill.batching import encode as _encode
    from distill.student import accuracy, predict, record_ranges
    from he_models.model import HEFriendlyBert

    sdir = Path(cfg["work_dir"]) / "students" / name
    ckpt = sdir / "ckpt.pt"
    if not ckpt.exists():
        from he_models.config import ConfigError

        raise ConfigError(f"--finish {name}: no checkpoint under {sdir}")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = HEFriendlyBert(he_cfg)
    best = sdir / "best.pt"
    model.load_state_dict(torch.load(best, map_location="cpu", weights_only=False) if best.exists()
                          else state["model"])
    model.to(device)
    aug = _encode(_tok_cache["tok"], logits["aug_texts"], [-1] * len(logits["aug_texts"]), cfg["data"]["max_len"]) \
        if logits.get("aug_texts") else None
    record_ranges(model, [enc["train"]] + ([aug] if aug is not None else []), device)
    result = {"name": name, "seconds": state["seconds"], "history": state["history"],
              "approximations": approximations(model.config),
              "stopped_early": f"after {state['stage']} epoch {state['epoch']} (best dev epoch kept)"}
    for key in ("dev", "test", "sst2_dev"):
        if key in enc:
            result[f"{key}_accuracy"] = accuracy(predict(model, enc[key], device), enc[key].labels)
    result["ranges"] = model.recorded_ranges()
    model.save_pretrained(sdir / "model")
    (sdir / "DONE.json").write_text(json.dumps(result, indent=2) + "\n")
    (sdir / "LOCK").unlink(missing_ok=True)
    put_result(name, result)
    log(f"{name}: finished early {result['stopped_early']}: dev {result.get('dev_accuracy')}")
    return result


def approximations(he_cfg) -> dict:
    from he_models.config import multiplicative_depth

    return {"softmax": he_cfg.softmax, "softmax_c": he_cfg.softmax_c, "gelu": he_cfg.gelu,
            "gelu_coeffs": list(he_cfg.gelu_coeffs), "layernorm": he_cfg.layernorm,
            "pooler": he_cfg.pooler, "pooling": he_cfg.pooling,
            "embedding_layernorm": "exact, client side", "depth_per_layer": multiplicative_depth(he_cfg)}


def ship(cfg: dict, model, tok, teacher_dir: Path, metrics: dict) -> Path:
    """Write the shipped model directory: weights, config with ranges, tokenizer files, metrics."""
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(str(out))
    vocab = teacher_dir / "vocab.txt"
    if vocab.exists() and not (out / "vocab.txt").exists():
        shutil.copy(vocab, out / "vocab.txt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out


class RunRecord:
    """results.json (every student's result; several workers may add to it) and the metrics.json view."""

    def __init__(self, cfg: dict, parts: dict, logits: dict, tinfo: dict, teacher_acc: dict,
                 device: torch.device, t_start: float) -> None:
        self.cfg, self.parts, self.logits, self.tinfo = cfg, parts, logits, tinfo
        self.teacher_acc, self.device, self.t_start = teacher_acc, device, t_start
        self.path = Path(cfg["work_dir"]) / "results.json"
        self.results: dict = {}

    def load(self) -> dict:
        self.results.clear()
        if self.path.exists():
            self.results.update(json.loads(self.path.read_text()))
        return self.results

    def put(self, key: str, value: dict) -> None:
        """Read-modify-write of results.json (another worker may have added results meanwhile)."""
        self.load()
        self.results[key] = value
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.path)

    def write_metrics(self) -> None:
        cfg = self.cfg
        if (Path(cfg["output_dir"]) / "model.safetensors").exists() and "he_friendly" in self.load():
            path = Path(cfg["output_dir"]) / "metrics.json"
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.metrics_now(), indent=2) + "\n")
            os.replace(tmp, path)

    def metrics_now(self) -> dict:
        cfg, parts, tinfo, teacher_acc, device = self.cfg, self.parts, self.tinfo, self.teacher_acc, self.device
        results = self.load()
        he = results.get("he_friendly", {})
        ex = results.get("tiny_exact", {})
        return {
            "dataset": "rotten_tomatoes_grouped_80_10_10" if cfg["data"]["task"] == "sentiment" else "files",
            "dataset_fingerprint": _fingerprint(parts),
            "train_size": len(parts["train"]), "augmented_size": len(self.logits.get("aug_texts", [])),
            "dev_size": len(parts["dev"]), "test_size": len(parts.get("test", [])),
            "sst2_dev_size": len(parts.get("sst2_dev", [])),
            "teacher": tinfo.get("source"), "teacher_accuracy": teacher_acc.get("dev"),
            "teacher_test_accuracy": teacher_acc.get("test"),
            "teacher_sst2_accuracy": teacher_acc.get("sst2_dev"),
            "tiny_exact_accuracy": ex.get("dev_accuracy"), "tiny_exact_test_accuracy": ex.get("test_accuracy"),
            "tiny_exact_sst2_accuracy": ex.get("sst2_dev_accuracy"),
            "he_friendly_accuracy": he.get("dev_accuracy"), "he_friendly_test_accuracy": he.get("test_accuracy"),
            "he_friendly_sst2_accuracy": he.get("sst2_dev_accuracy"),
            "teacher_note": tinfo.get("note"),
            "tiny_exact_note": ex.get("stopped_early") and f"stopped {ex['stopped_early']}",
            "he_friendly_dev_by_stage2_epoch": [h.get("dev_accuracy") for h in he.get("history", [])
                                                if h.get("stage") == 2],
            "tiny_exact_dev_by_stage2_epoch": [h.get("dev_accuracy") for h in ex.get("history", [])
                                               if h.get("stage") == 2],
            "approximations": he.get("approximations"), "ranges": he.get("ranges"),
            "params": he.get("params"),
            # teacher fine-tune + the shipped student's training loops; the breakdown follows
            "train_seconds": round(tinfo.get("seconds", 0.0) + he.get("seconds", 0.0), 1),
            "train_seconds_by_stage": {"teacher_finetune": round(tinfo.get("seconds", 0.0), 1),
                              "he_friendly": round(he.get("seconds", 0.0), 1),
                              "tiny_exact": round(ex.get("seconds", 0.0), 1),
                              "all_students": round(sum(v.get("seconds", 0.0) for v in results.values()
                                                        if isinstance(v, dict)), 1),
                              "this_process_wall": round(time.time() - self.t_start, 1)},
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(0),
            "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
            "ablation": {k: v for k, v in results.items() if k.startswith(("ablation:", "help:"))},
        }


def _needed_students(cfg: dict) -> list[str]:
    needed = ["he_friendly"] + (["tiny_exact"] if cfg["tiny_exact"]["enabled"] else [])
    if cfg["ablation"]["enabled"]:
        needed += ["ablation_exact", "ablation_all"] + [f"ablation_{k}" for k in cfg["ablation"]["variants"]]
        needed += [f"help_{h}" for h in cfg["ablation"]["helps"]]
    return needed


def run(cfg: dict) -> dict:
    t_start = time.time()
    torch.set_num_threads(int(cfg["threads"]))
    set_seed(cfg["seed"])
    device = pick_device()
    log(f"device {device}; work_dir {cfg['work_dir']}; output {cfg['output_dir']}")
    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    parts = load_task(cfg)
    labels = parts["_labels"]
    log(f"data: train {len(parts['train'])}, dev {len(parts['dev'])}, test {len(parts.get('test', []))}, "
        f"sst2 {len(parts.get('sst2_dev', []))}")
    teacher, tok, tinfo = teacher_stage(cfg, parts, device)
    _tok_cache["tok"] = tok
    enc = encode_parts(parts, tok, cfg["data"]["max_len"])
    logits = teacher_outputs(cfg, teacher, tok, parts, enc, device)
    from distill.student import accuracy

    teacher_acc = {k: accuracy(logits[k], enc[k].labels) for k in ("dev", "test", "sst2_dev") if k in enc}
    log(f"teacher accuracy: {teacher_acc}")
    he_cfg = student_config(cfg, {}, tok, labels, cfg["name"])
    all_done = all((work / "students" / n / "DONE.json").exists() for n in _needed_students(cfg))
    hidden = None
    if cfg["distill"]["stage1_epochs"] > 0 and not all_done and not cfg.get("_finish"):
        hidden = hidden_outputs(cfg, teacher, enc, he_cfg, device)
    record = RunRecord(cfg, parts, logits, tinfo, teacher_acc, device, t_start)
    if cfg.get("_finish"):
        name = cfg["_finish"]
        over = {"softmax": "exact", "gelu": "exact", "layernorm": "exact"} if name == "tiny_exact" else {}
        finish_student(cfg, name, student_config(cfg, over, tok, labels, name.replace("_", "-")), enc,
                       logits, device, record.put)
        record.write_metrics()
        return record.metrics_now()
    ablation_only = cfg.get("_ablation_only", False)
    # 1. the shipped HE-friendly student (shipped as soon as it exists)
    if not ablation_only:
        _main_students(cfg, tok, labels, teacher, enc, logits, hidden, device, he_cfg, record.put,
                       record.write_metrics, record.metrics_now)
    _ablation(cfg, tok, labels, teacher, enc, logits, hidden, device, record.put, record.write_metrics)
    metrics = record.metrics_now()
    if not ablation_only:
        record.write_metrics()
    log(f"done in {time.time() - t_start:.0f}s: teacher {metrics['teacher_accuracy']}, "
        f"tiny_exact {metrics['tiny_exact_accuracy']}, he_friendly {metrics['he_friendly_accuracy']}")
    return metrics


def _main_students(cfg, tok, labels, teacher, enc, logits, hidden, device, he_cfg, put_result,
                   write_metrics, metrics_now) -> None:
    dcfg = cfg["distill"]
    model, res = run_student(cfg, "he_friendly", he_cfg, teacher, enc, logits, hidden, device,
                             stage1_epochs=dcfg["stage1_epochs"], stage2_epochs=dcfg["stage2_epochs"],
                             pca_init=dcfg["pca_init"], use_aug=dcfg["augment"] > 0)
    res["params"] = sum(p.numel() for p in model.parameters())
    put_result("he_friendly", res)
    teacher_dir = Path(cfg["teacher"]["path"] or "") if cfg["teacher"]["path"] else None
    from distill.teacher import default_teacher_path

    teacher_dir = teacher_dir or default_teacher_path()
    ship(cfg, model, tok, teacher_dir, metrics_now())
    log(f"shipped {cfg['output_dir']}")
    # 2. tiny_exact: same shape and distillation, exact operations
    if cfg["tiny_exact"]["enabled"]:
        ex_cfg = student_config(cfg, {"softmax": "exact", "gelu": "exact", "layernorm": "exact"}, tok,
                                labels, "tiny-exact")
        _, res = run_student(cfg, "tiny_exact", ex_cfg, teacher, enc, logits, hidden, device,
                             stage1_epochs=dcfg["stage1_epochs"], stage2_epochs=dcfg["stage2_epochs"],
                             pca_init=dcfg["pca_init"], use_aug=dcfg["augment"] > 0)
        put_result("tiny_exact", res)
        write_metrics()


def _ablation(cfg, tok, labels, teacher, enc, logits, hidden, device, put_result, write_metrics) -> None:
    """Each approximation alone, and each help switched off (cheaper schedule). Several workers may run
    this at once (`--ablation-only` in a second process): a student being trained elsewhere is skipped."""
    dcfg = cfg["distill"]
    ab = cfg["ablation"]
    if ab["enabled"]:
        s1, s2 = ab["stage1_epochs"], ab["stage2_epochs"]
        jobs = [("ablation:exact", {"softmax": "exact", "gelu": "exact", "layernorm": "exact"}, {}),
                ("ablation:all", {}, {})]
        jobs += [(f"ablation:{k}", v, {}) for k, v in ab["variants"].items()]
        jobs += [(f"help:{h}", {}, {h: True}) for h in ab["helps"]]
        for key, over, flags in jobs:
            name = key.replace(":", "_")
            if _locked_elsewhere(Path(cfg["work_dir"]) / "students" / name):
                log(f"{name}: being trained by another worker; skipped here")
                continue
            a_cfg = student_config(cfg, over, tok, labels, name)
            _, res = run_student(
                cfg, name, a_cfg, teacher, enc, logits, hidden, device,
                stage1_epochs=0 if flags.get("no_stage1") or flags.get("no_kd") else s1, stage2_epochs=s2,
                pca_init=dcfg["pca_init"] and not flags.get("no_pca_init"),
                use_aug=dcfg["augment"] > 0 and not flags.get("no_augment") and not flags.get("no_kd"),
                use_kd=not flags.get("no_kd"), batch_size=ab["batch_size"], aug_copies=ab["augment_copies"])
            res.pop("history", None)
            res["schedule"] = {"stage1_epochs": 0 if flags.get("no_stage1") or flags.get("no_kd") else s1,
                               "stage2_epochs": s2, "batch_size": ab["batch_size"]}
            put_result(key, res)
            write_metrics()


def _locked_elsewhere(sdir: Path) -> bool:
    """True when another live process holds sdir/LOCK (and the student is not done)."""
    lock = sdir / "LOCK"
    if (sdir / "DONE.json").exists() or not lock.exists():
        return False
    try:
        pid = int(lock.read_text().strip())
        if pid == os.getpid():
            return False
        os.kill(pid, 0)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False


def _fingerprint(parts: dict) -> str:
    from cipherbert.data import fingerprint

    return fingerprint(parts["train"] + parts["dev"] + parts.get("test", []))
