"""Token classification (NER): word-piece encoding with first-piece labels, the HF teacher, seqeval scoring.

As in Hugging Face's token-classification examples, each word's tag sits on its first word piece and every
other piece (and [CLS]/[SEP]) carries -100, so losses and predictions are per word. Words cut off by
`max_len` are predicted "O" when scoring, so the score always covers every word of the file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from cipherbert.data import TokenExample  # noqa: E402
from distill.batching import ThreadGovernor, bucketed_batches, pad  # noqa: E402
from distill.teacher import TeacherError, default_teacher_path  # noqa: E402

IGNORE = -100


@dataclass
class TokenEncoded:
    """Word-piece ids per sentence, labels per piece (-100 off first pieces), and the words' tags."""

    ids: list[list[int]]
    labels: list[list[int]]
    tags: list[list[str]]

    def __len__(self) -> int:
        return len(self.ids)


def encode_tokens(tokenizer, sentences: Sequence[TokenExample], label2id: dict[str, int],
                  max_len: int) -> TokenEncoded:
    """Tokenise pre-split words; label the first piece of each word (HF `is_split_into_words`)."""
    enc = tokenizer([list(s.tokens) for s in sentences], is_split_into_words=True, truncation=True,
                    max_length=max_len)
    ids, labels = [], []
    for i, s in enumerate(sentences):
        word_ids = enc.word_ids(i)
        row, prev = [], None
        for w in word_ids:
            row.append(IGNORE if w is None or w == prev else label2id[s.tags[w]])
            prev = w
        ids.append(list(enc["input_ids"][i]))
        labels.append(row)
    return TokenEncoded(ids=ids, labels=labels, tags=[list(s.tags) for s in sentences])


def token_batches(data: TokenEncoded, batches: list[list[int]], pad_id: int = 0):
    """(indices, ids, mask, labels) with labels padded by -100."""
    for b in batches:
        ids, mask = pad([data.ids[i] for i in b], pad_id)
        labels = torch.full(ids.shape, IGNORE, dtype=torch.long)
        for r, i in enumerate(b):
            labels[r, : len(data.labels[i])] = torch.tensor(data.labels[i], dtype=torch.long)
        yield b, ids, mask, labels


def word_predictions(logits: torch.Tensor, labels: torch.Tensor, n_words: int, id2label: Sequence[str]) -> list[str]:
    """Per-word tags from one sentence's per-piece logits; words past truncation get "O"."""
    first = labels != IGNORE
    pred = [id2label[int(k)] for k in logits[first].argmax(-1)]
    return pred + ["O"] * (n_words - len(pred))


def seqeval_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level precision/recall/F1 (seqeval, BIO, default conlleval-style matching)."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {"f1": float(f1_score(gold, pred)), "precision": float(precision_score(gold, pred)),
            "recall": float(recall_score(gold, pred))}


@torch.no_grad()
def predict_tags(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], data: TokenEncoded,
                 id2label: Sequence[str], batch_size: int = 64, pad_id: int = 0) -> list[list[str]]:
    """Word tags for every sentence, in order; `forward(ids, mask)` returns (B, n, num_labels) logits."""
    out: list[list[str]] = [[] for _ in range(len(data))]
    batches = bucketed_batches([len(x) for x in data.ids], batch_size, seed=0, shuffle=False)
    for b, ids, mask, labels in token_batches(data, batches, pad_id):
        logits = forward(ids, mask).float()
        for r, i in enumerate(b):
            out[i] = word_predictions(logits[r], labels[r], len(data.tags[i]), id2label)
    return out


def evaluate(forward, data: TokenEncoded, id2label: Sequence[str], batch_size: int = 64) -> dict:
    return seqeval_scores(data.tags, predict_tags(forward, data, id2label, batch_size))


# --- Teacher -------------------------------------------------------------------------------------------------

def load_token_teacher(path: str | Path | None, labels: Sequence[str]):
    """(AutoModelForTokenClassification, tokenizer) from any local HF BERT-family directory.

    A directory that already has a token head for exactly these labels is used as is; otherwise a fresh
    head is put on the encoder (a sentence-embedding or sequence-classification checkpoint works too).
    """
    from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

    path = Path(path) if path else default_teacher_path()
    if not (path / "config.json").exists():
        raise TeacherError(f"teacher path {path} has no config.json: not a Hugging Face checkpoint directory")
    hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if not hasattr(hf_config, "num_hidden_layers") or not hasattr(hf_config, "num_attention_heads"):
        raise TeacherError(f"teacher path {path}: {hf_config.model_type!r} is not a BERT-family encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TeacherError(f"teacher path {path}: token classification needs a fast tokenizer (tokenizer.json)")
    id2label = dict(enumerate(labels))
    archs = getattr(hf_config, "architectures", None) or []
    same_head = any(a.endswith("ForTokenClassification") for a in archs) and \
        [hf_config.id2label.get(i) for i in range(hf_config.num_labels)] == list(labels)
    model = AutoModelForTokenClassification.from_pretrained(
        str(path), local_files_only=True, attn_implementation="eager", num_labels=len(labels),
        id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=not same_head)
    model.source = str(path)
    return model, tokenizer


def teacher_forward(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    model.eval()
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def _optimizer(model, lr: float, weight_decay: float, total_steps: int, warmup: float):
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    warm = max(1, int(warmup * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total_steps - s) / max(1, total_steps - warm))))
    return opt, sched


@dataclass
class TrainState:
    step: int = 0
    best_f1: float = -1.0
    seconds: float = 0.0
    history: list | None = None


def _save_ckpt(ckpt: Path, model, opt, sched, state: TrainState) -> None:
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "state": state.__dict__}, tmp)
    tmp.replace(ckpt)


def finetune_token_teacher(model, tokenizer, train: TokenEncoded, dev: TokenEncoded, out_dir: Path, *,
                           epochs: int, lr: float, batch_size: int, seed: int, warmup: float = 0.1,
                           weight_decay: float = 0.01, progress: bool = True, log=print) -> dict:
    """Fine-tune with AdamW + linear decay; checkpoint every 100 steps and each epoch (resumes).

    The best dev-F1 epoch is saved to `out_dir/best` as a plain HF directory (config with id2label).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "train_state.pt"
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    opt, sched = _optimizer(model, lr, weight_decay, total, warmup)
    state = TrainState(history=[])
    if ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        state = TrainState(**saved["state"])
        log(f"teacher: resumed at step {state.step}/{total} (best dev F1 {state.best_f1:.4f})")
    governor = ThreadGovernor(torch.get_num_threads())
    id2label = [model.config.id2label[i] for i in range(model.config.num_labels)]
    while state.step < total:
        epoch = state.step // steps_per_epoch
        batches = bucketed_batches([len(x) for x in train.ids], batch_size, seed=seed + epoch)
        skip = state.step - epoch * steps_per_epoch
        model.train()
        t0 = time.time()
        bar = tqdm(total=len(batches) - skip, desc=f"teacher epoch {epoch + 1}/{epochs}", disable=not progress,
                   mininterval=30)
        for _, ids, mask, labels in token_batches(train, batches[skip:], tokenizer.pad_token_id or 0):
            torch.manual_seed(seed * 100003 + state.step)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            state.step += 1
            governor.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if state.step % 100 == 0 and state.step % steps_per_epoch:
                _save_ckpt(ckpt, model, opt, sched, TrainState(state.step, state.best_f1,
                                                               state.seconds + time.time() - t0, state.history))
        bar.close()
        state.seconds += time.time() - t0
        scores = evaluate(teacher_forward(model), dev, id2label)
        state.history.append({"epoch": epoch + 1, "step": state.step, "dev": scores, "seconds": state.seconds})
        log(f"teacher: epoch {epoch + 1} dev F1 {scores['f1']:.4f} ({state.seconds:.0f}s)")
        if scores["f1"] > state.best_f1:
            state.best_f1 = scores["f1"]
            model.save_pretrained(str(out_dir / "best"))
            tokenizer.save_pretrained(str(out_dir / "best"))
        _save_ckpt(ckpt, model, opt, sched, state)
    summary = {"dev_f1": state.best_f1, "seconds": state.seconds, "epochs": epochs, "history": state.history}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
