"""Student construction and the two distillation stages.

Stage 1 (MPCFormer / TinyBERT): the student's embedding output and each layer's output are projected
to the teacher's width by learned linear maps and matched (MSE) with the teacher's standardised hidden
states at the mapped layers; the student's attention maps are matched with the teacher's, heads averaged
in groups (12 teacher heads -> 2 student heads: heads 0-5 and 6-11). Attention values are compared
after multiplying by the number of valid keys n, so that a uniform map is 1 whatever the length.

Stage 2: temperature-scaled KL to the teacher's cached logits plus cross entropy on the labels
(augmented sentences carry only the teacher's soft label).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from distill.batching import Encoded, bucketed_batches, pad
from he_models.config import HEConfig
from he_models.model import HEFriendlyBert


def pca_embeddings(teacher, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Project the teacher's word and position tables onto the top `hidden` principal components of the
    word table (one basis for both, so word + position stays additive). The overall scale hardly
    matters because the client-side embedding LayerNorm follows; build_student rescales anyway."""
    emb = teacher.encoder.get_input_embeddings().weight.detach().float().cpu()
    base = teacher.encoder
    pos = None
    for name, module in base.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            pos = module.weight.detach().float().cpu()
            break
    mean = emb.mean(0, keepdim=True)
    # torch.pca_lowrank is randomized; a full SVD of the 384x384 covariance is exact and cheap.
    cov = (emb - mean).T @ (emb - mean) / emb.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    basis = evecs[:, torch.argsort(evals, descending=True)[:hidden]]  # (d_t, hidden)
    word = (emb - mean) @ basis
    pos_out = pos @ basis if pos is not None else None
    return word, pos_out


def build_student(he_config: HEConfig, teacher=None, pca_init: bool = True, seed: int = 0) -> HEFriendlyBert:
    torch.manual_seed(seed)
    model = HEFriendlyBert(he_config)
    if pca_init and teacher is not None:
        word, pos = pca_embeddings(teacher, he_config.hidden_size)
        scale = 1.0 / word.std()
        with torch.no_grad():
            n = min(word.shape[0], he_config.vocab_size)
            model.embeddings.word.weight[:n] = word[:n] * scale * 0.5
            if pos is not None:
                m = min(pos.shape[0], he_config.max_position)
                model.embeddings.position.weight[:m] = pos[:m] * scale * 0.5
    return model


class Projections(nn.Module):
    """Student width -> teacher width, one linear map per matched hidden state (embedding + layers)."""

    def __init__(self, n: int, d_s: int, d_t: int) -> None:
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d_s, d_t) for _ in range(n))


def stage1_loss(out, proj: Projections, t_hidden: torch.Tensor, t_att: torch.Tensor, mask: torch.Tensor,
                hidden_weight: float, attn_weight: float) -> tuple[torch.Tensor, dict]:
    valid = mask.bool()
    h_loss = torch.zeros((), device=mask.device)
    for i, (h, p) in enumerate(zip(out.hidden_states, proj.maps)):
        h_loss = h_loss + F.mse_loss(p(h)[valid], t_hidden[:, :, i][valid])
    n_valid = mask.sum(1).to(t_att.dtype)[:, None, None, None]
    pair = (valid[:, None, :, None] & valid[:, None, None, :])
    a_loss = torch.zeros((), device=mask.device)
    for i, probs in enumerate(out.attentions):
        diff = (probs - t_att[:, i]) * n_valid
        a_loss = a_loss + (diff ** 2)[pair.expand_as(diff)].mean()
    loss = hidden_weight * h_loss + attn_weight * a_loss
    return loss, {"hidden": h_loss.item(), "attn": a_loss.item()}


def kd_loss(s_logits, t_logits, labels, has_label, temperature: float, alpha: float) -> torch.Tensor:
    t = temperature
    kd = F.kl_div(F.log_softmax(s_logits / t, -1), F.softmax(t_logits / t, -1), reduction="batchmean") * t * t
    if has_label.any() and alpha < 1.0:
        ce = F.cross_entropy(s_logits[has_label], labels[has_label])
    else:
        ce = torch.zeros((), device=s_logits.device)
    return alpha * kd + (1 - alpha) * ce


def range_penalty(model: HEFriendlyBert, score_bound: float, gelu_bound: float) -> torch.Tensor | None:
    """Squared hinge on attention scores beyond +-score_bound and GELU inputs beyond +-gelu_bound: keeps
    the polynomials' input ranges (hence the engine's masks and CKKS precision) small. 0 disables one."""
    total = None
    for layer in model.layers:
        for bound, value in ((score_bound, getattr(layer.attn, "_last_scores", None)),
                             (gelu_bound, getattr(layer.act, "_last_input", None))):
            if bound and bound > 0 and value is not None:
                term = F.relu(value.abs() - bound).pow(2).mean()
                total = term if total is None else total + term
    return total


@torch.no_grad()
def predict(model: HEFriendlyBert, data: Encoded, device: torch.device, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    out = torch.zeros(len(data), model.config.num_labels)
    batches = bucketed_batches([len(x) for x in data.ids], batch_size, seed=0, shuffle=False)
    for b in batches:
        ids, mask = pad([data.ids[i] for i in b])
        out[b] = model(ids.to(device), mask.to(device)).logits.float().cpu()
    return out


def accuracy(logits: torch.Tensor, labels) -> float:
    return float((logits.argmax(-1) == torch.as_tensor(labels)).float().mean())


@torch.no_grad()
def record_ranges(model: HEFriendlyBert, datasets: list[Encoded], device: torch.device,
                  batch_size: int = 128) -> dict[str, list[float]]:
    """Reset every range recorder and record the input ranges of the final weights over `datasets`
    (inference arithmetic: dropout off, affine norms on their running statistics)."""
    from he_models.model import RangeRecorder

    model.eval()
    recorders = [m for m in model.modules() if isinstance(m, RangeRecorder)]
    for r in recorders:
        r.reset()
        r.train()
    for data in datasets:
        for b in bucketed_batches([len(x) for x in data.ids], batch_size, seed=0, shuffle=False):
            ids, mask = pad([data.ids[i] for i in b])
            model(ids.to(device), mask.to(device))
    for r in recorders:
        r.eval()
    return model.recorded_ranges()


class Optimizers:
    """AdamW for dense parameters (no decay on norms, biases or embeddings) and SparseAdam for the word
    embedding table: a batch touches a few hundred of its 30k rows, and a dense Adam update of the whole
    table was 70% of a CPU step."""

    def __init__(self, model: HEFriendlyBert, extra: list[nn.Parameter], lr: float, weight_decay: float = 0.01):
        word = model.embeddings.word
        word.sparse = True
        decay, no_decay = [], []
        for n, p in list(model.named_parameters()):
            if p is word.weight or not p.requires_grad:
                continue
            (no_decay if (p.dim() < 2 or "embeddings" in n) else decay).append(p)
        decay += [p for p in extra if p.dim() >= 2]
        no_decay += [p for p in extra if p.dim() < 2]
        self.dense_params = decay + no_decay
        self.dense = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        self.sparse = torch.optim.SparseAdam([word.weight], lr=lr)
        self.base_lr = lr

    def set_lr_factor(self, factor: float) -> None:
        for opt in (self.dense, self.sparse):
            for g in opt.param_groups:
                g["lr"] = self.base_lr * factor

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        self.sparse.zero_grad(set_to_none=True)

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.dense_params, 1.0)
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(), "sparse": self.sparse.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


class StudentRun:
    """One student trained through stage 1 and stage 2, checkpointed each epoch under `directory`.

    Subclasses change the task by overriding stage2_data, labelled, stage2_loss and dev_score.
    """

    dev_key = "dev_accuracy"  # the history field that holds dev_score

    def __init__(self, name: str, model: HEFriendlyBert, directory: Path, device: torch.device, *,
                 seed: int, progress: bool = True, log=print) -> None:
        self.name, self.model, self.dir, self.device = name, model.to(device), Path(directory), device
        self.seed, self.progress, self.log = seed, progress, log
        self.threads = torch.get_num_threads()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict] = []
        self.seconds = 0.0

    # -- checkpoints ---------------------------------------------------------------------------
    def _ckpt(self) -> Path:
        return self.dir / "ckpt.pt"

    def _save(self, stage: str, epoch: int, opt, proj=None, extra=None) -> None:
        torch.save({"stage": stage, "epoch": epoch, "model": self.model.state_dict(),
                    "opt": opt.state_dict(), "proj": proj.state_dict() if proj is not None else None,
                    "history": self.history, "seconds": self.seconds, "extra": extra or {}},
                   self._ckpt())

    def _load(self):
        if self._ckpt().exists():
            return torch.load(self._ckpt(), map_location="cpu", weights_only=False)
        return None

    # -- training ------------------------------------------------------------------------------
    def train(self, *, train: Encoded, train_logits: torch.Tensor, aug: Encoded | None,
              aug_logits: torch.Tensor | None, hidden_cache, dev: Encoded | None, dcfg: dict,
              stage1_epochs: int, stage2_epochs: int, use_kd: bool = True) -> dict:
        """Stage 1 (if a hidden cache is given), then stage 2; resumes from the last checkpoint."""
        from distill.batching import ThreadGovernor

        state = self._load()
        done_stage1, done_stage2 = self._resume(state, stage1_epochs)
        governor = ThreadGovernor(self.threads)
        if stage1_epochs > 0 and hidden_cache is not None and done_stage1 < stage1_epochs:
            self._stage1(train, hidden_cache, dcfg, range(done_stage1, stage1_epochs), state, governor)
        if stage2_epochs > 0 and done_stage2 < stage2_epochs:
            data = self.stage2_data(train, train_logits, aug, aug_logits)
            self._stage2(data, dev, dcfg, done_stage2, stage2_epochs, state, governor, use_kd)
        elif (self.dir / "best.pt").exists():
            self.model.load_state_dict(torch.load(self.dir / "best.pt", map_location="cpu", weights_only=False))
        torch.set_num_threads(self.threads)
        return {"history": self.history, "seconds": self.seconds}

    def _resume(self, state: dict | None, stage1_epochs: int) -> tuple[int, int]:
        """Load a checkpoint's weights and history; (stage-1 epochs done, stage-2 epochs done)."""
        if state is None:
            return 0, 0
        self.model.load_state_dict(state["model"])
        self.history, self.seconds = state["history"], state["seconds"]
        self.log(f"{self.name}: resumed after {state['stage']} epoch {state['epoch']}")
        if state["stage"] == "stage1":
            return state["epoch"], 0
        return stage1_epochs, state["epoch"]

    def _penalised(self, loss: torch.Tensor, dcfg: dict) -> torch.Tensor:
        pen = range_penalty(self.model, dcfg.get("softmax_score_bound", 0), dcfg.get("gelu_input_bound", 0))
        return loss if pen is None else loss + dcfg.get("range_penalty_weight", 1.0) * pen

    # -- stage 1 -------------------------------------------------------------------------------
    def _stage1(self, train: Encoded, hidden_cache, dcfg: dict, epochs: range, state: dict | None,
                governor) -> None:
        d_t = hidden_cache.hidden.shape[-1]
        proj = Projections(len(hidden_cache.layer_map) + 1, self.model.config.hidden_size, d_t).to(self.device)
        opt = Optimizers(self.model, list(proj.parameters()), lr=dcfg["lr_stage1"])
        if state is not None and state["stage"] == "stage1":
            proj.load_state_dict(state["proj"])
            opt.load_state_dict(state["opt"])
        for epoch in epochs:
            t0 = time.time()
            tot, n_batches = self._stage1_epoch(train, hidden_cache, dcfg, epoch, epochs.stop, proj, opt, governor)
            self.seconds += time.time() - t0
            rec = {"stage": 1, "epoch": epoch + 1, **{k: v / n_batches for k, v in tot.items()}}
            self.history.append(rec)
            self.log(f"{self.name}: stage1 epoch {epoch + 1} loss {rec['loss']:.4f} "
                     f"(hidden {rec['hidden']:.4f}, attn {rec['attn']:.4f})")
            self._save("stage1", epoch + 1, opt, proj)

    def _stage1_epoch(self, train: Encoded, hidden_cache, dcfg: dict, epoch: int, n_epochs: int,
                      proj: Projections, opt: Optimizers, governor) -> tuple[dict, int]:
        from tqdm.auto import tqdm

        device = self.device
        self.model.train()
        batches = bucketed_batches([len(x) for x in train.ids], dcfg["batch_size"], seed=self.seed * 1000 + epoch)
        tot = {"loss": 0.0, "hidden": 0.0, "attn": 0.0}
        bar = tqdm(batches, desc=f"{self.name} stage1 {epoch + 1}/{n_epochs}", disable=not self.progress,
                   leave=False)
        for step, b in enumerate(bar):
            torch.manual_seed(self.seed * 7919 + epoch * 100003 + step)
            ids, mask = pad([train.ids[i] for i in b])
            t_h, t_a = hidden_cache.batch(b, ids.shape[1])
            ids, mask, t_h, t_a = ids.to(device), mask.to(device), t_h.to(device), t_a.to(device)
            out = self.model(ids, mask)
            loss, parts = stage1_loss(out, proj, t_h, t_a, mask, dcfg["hidden_weight"], dcfg["attn_weight"])
            loss = self._penalised(loss, dcfg)
            opt.zero_grad()
            loss.backward()
            opt.step()
            governor.step()
            tot["loss"] += loss.item()
            tot["hidden"] += parts["hidden"]
            tot["attn"] += parts["attn"]
            bar.set_postfix(loss=f"{float(loss):.3f}")
        return tot, len(batches)

    # -- stage 2 -------------------------------------------------------------------------------
    def stage2_data(self, train: Encoded, train_logits: torch.Tensor, aug: Encoded | None,
                    aug_logits: torch.Tensor | None) -> dict:
        """Sentences (training + augmented), the teacher's logits and labels (-1: no label)."""
        return {"ids": list(train.ids) + (list(aug.ids) if aug is not None else []),
                "t_logits": torch.cat([train_logits] + ([aug_logits] if aug is not None else [])),
                "labels": torch.tensor(list(train.labels) + [-1] * (len(aug) if aug is not None else 0)),
                "n_train": len(train)}

    def labelled(self, data: dict, i: int) -> bool:
        return bool(data["labels"][i] >= 0)

    def stage2_loss(self, out, data: dict, b: list[int], ids: torch.Tensor, dcfg: dict, alpha: float):
        y = data["labels"][b]
        return kd_loss(out.logits, data["t_logits"][b].to(self.device), y.clamp_min(0).to(self.device),
                       (y >= 0).to(self.device), dcfg["temperature"], alpha)

    def dev_score(self, dev) -> float:
        """The number that picks the best stage-2 epoch (here accuracy; higher is better)."""
        return accuracy(predict(self.model, dev, self.device), dev.labels)

    def _stage2(self, data: dict, dev, dcfg: dict, done: int, epochs: int, state: dict | None, governor,
                use_kd: bool) -> None:
        bs = dcfg.get("batch_size_stage2") or dcfg["batch_size"]
        steps_per_epoch = math.ceil((len(data["ids"]) if use_kd else data["n_train"]) / bs)
        total = steps_per_epoch * epochs
        opt = Optimizers(self.model, [], lr=dcfg["lr_stage2"])
        warm = max(1, total // 20)
        resumed = state is not None and state["stage"] == "stage2"
        if resumed:
            opt.load_state_dict(state["opt"])
        best = state["extra"].get("best", -1.0) if resumed else -1.0
        best_state = None
        if resumed and (self.dir / "best.pt").exists():
            best_state = torch.load(self.dir / "best.pt", map_location="cpu", weights_only=False)
        sched = {"gstep": done * steps_per_epoch, "warm": warm, "total": total}
        for epoch in range(done, epochs):
            t0 = time.time()
            loss = self._stage2_epoch(data, dcfg, epoch, epochs, bs, opt, sched, governor, use_kd)
            self.seconds += time.time() - t0
            rec: dict = {"stage": 2, "epoch": epoch + 1, "loss": loss}
            if dev is not None:
                score = rec[self.dev_key] = self.dev_score(dev)
                if score > best:
                    best = score
                    best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                    torch.save(best_state, self.dir / "best.pt")
            self.history.append(rec)
            self.log(f"{self.name}: stage2 epoch {epoch + 1} loss {rec['loss']:.4f}"
                     + (f" dev {rec[self.dev_key]:.4f}" if dev is not None else ""))
            self._save("stage2", epoch + 1, opt, extra={"best": best})
        if best_state is not None:
            self.model.load_state_dict(best_state)

    def _stage2_epoch(self, data: dict, dcfg: dict, epoch: int, n_epochs: int, bs: int, opt: Optimizers,
                      sched: dict, governor, use_kd: bool) -> float:
        from tqdm.auto import tqdm

        self.model.train()
        order = bucketed_batches([len(x) for x in data["ids"]], bs, seed=self.seed * 1000 + 500 + epoch)
        if not use_kd:  # task loss only: augmented sentences have no label, skip them
            order = [[i for i in b if self.labelled(data, i)] for b in order]
            order = [b for b in order if b]
        alpha = dcfg["alpha"] if use_kd else 0.0
        warm, total = sched["warm"], sched["total"]
        tot = 0.0
        bar = tqdm(order, desc=f"{self.name} stage2 {epoch + 1}/{n_epochs}", disable=not self.progress,
                   leave=False)
        for step, b in enumerate(bar):
            torch.manual_seed(self.seed * 7919 + (epoch + 50) * 100003 + step)
            ids, mask = pad([data["ids"][i] for i in b])
            out = self.model(ids.to(self.device), mask.to(self.device))
            loss = self._penalised(self.stage2_loss(out, data, b, ids, dcfg, alpha), dcfg)
            s = sched["gstep"]
            opt.set_lr_factor(min((s + 1) / warm, max(0.02, (total - s) / max(1, total - warm))))
            opt.zero_grad()
            loss.backward()
            opt.step()
            governor.step()
            sched["gstep"] += 1
            tot += loss.item()
            bar.set_postfix(loss=f"{float(loss):.3f}")
        return tot / max(1, len(order))
