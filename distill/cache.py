"""Teacher outputs cached once so every student (shipped, tiny_exact, ablations) reuses them.

- logits for every sentence (training, augmented, dev, test, SST-2): small, kept as tensors;
- for stage 1, the teacher's hidden states at the mapped layers (embedding output included) and its
  attention maps at the mapped layers, heads averaged in groups down to the student's head count,
  stored flat in float16 with per-sentence offsets (about 60 KB per sentence of 27 tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.batching import Encoded, bucketed_batches, iterate


def default_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Student layer i (1-based) -> teacher layer round(i * T / S), TinyBERT's uniform mapping."""
    return [max(1, round((i + 1) * teacher_layers / student_layers)) for i in range(student_layers)]


def group_heads(att: torch.Tensor, student_heads: int) -> torch.Tensor:
    """(b, H_t, n, n) -> (b, H_s, n, n): mean over contiguous groups of H_t / H_s teacher heads."""
    b, h, n, _ = att.shape
    if h % student_heads:
        raise ValueError(f"teacher heads {h} are not a multiple of student heads {student_heads}")
    return att.view(b, student_heads, h // student_heads, n, n).mean(2)


class HiddenCache:
    """Flat per-token storage of the teacher's mapped hidden states and grouped attention maps."""

    def __init__(self, hidden: torch.Tensor, tok_off: torch.Tensor, att: torch.Tensor, att_off: torch.Tensor,
                 lengths: list[int], layer_map: list[int], student_heads: int) -> None:
        self.hidden, self.tok_off, self.att, self.att_off = hidden, tok_off, att, att_off
        self.lengths, self.layer_map, self.student_heads = lengths, layer_map, student_heads
        valid = hidden.float()
        self.mean = valid.mean(0)  # (layers+1, d)
        self.std = valid.std(0).clamp_min(1e-3)

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, data: Encoded, layer_map: list[int], student_heads: int, batch_size: int,
              device: torch.device, progress: bool = True) -> "HiddenCache":
        from tqdm.auto import tqdm

        teacher.eval()
        lengths = [len(x) for x in data.ids]
        n_layers = len(layer_map) + 1
        d = teacher.hidden_size
        tok_off = torch.zeros(len(data) + 1, dtype=torch.long)
        tok_off[1:] = torch.cumsum(torch.tensor(lengths), 0)
        att_sizes = torch.tensor([len(layer_map) * student_heads * n * n for n in lengths])
        att_off = torch.zeros(len(data) + 1, dtype=torch.long)
        att_off[1:] = torch.cumsum(att_sizes, 0)
        hidden = torch.zeros(int(tok_off[-1]), n_layers, d, dtype=torch.float16)
        att = torch.zeros(int(att_off[-1]), dtype=torch.float16)
        from distill.batching import ThreadGovernor

        governor = ThreadGovernor(torch.get_num_threads())
        batches = bucketed_batches(lengths, batch_size, seed=0, shuffle=False)
        for b, ids, mask, _ in tqdm(iterate(data, batches), total=len(batches), desc="teacher cache",
                                    disable=not progress, leave=False):
            out = teacher(ids.to(device), mask.to(device), output_hidden=True)
            hs = torch.stack([out["hidden_states"][0]] + [out["hidden_states"][t] for t in layer_map], 2)
            at = torch.stack([group_heads(out["attentions"][t - 1], student_heads) for t in layer_map], 1)
            hs, at = hs.float().cpu(), at.float().cpu()
            for j, i in enumerate(b):
                n = lengths[i]
                hidden[tok_off[i]:tok_off[i + 1]] = hs[j, :n].half()
                att[att_off[i]:att_off[i + 1]] = at[j, :, :, :n, :n].reshape(-1).half()
            governor.step()
        torch.set_num_threads(governor.max_threads)
        return cls(hidden, tok_off, att, att_off, lengths, layer_map, student_heads)

    def batch(self, idx: list[int], pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (b, n, layers+1, d) standardised hidden states and (b, S_layers, S_heads, n, n) maps."""
        n_l = len(self.layer_map)
        hs = torch.zeros(len(idx), pad_to, n_l + 1, self.hidden.shape[-1])
        at = torch.zeros(len(idx), n_l, self.student_heads, pad_to, pad_to)
        for j, i in enumerate(idx):
            n = self.lengths[i]
            hs[j, :n] = (self.hidden[self.tok_off[i]:self.tok_off[i + 1]].float() - self.mean) / self.std
            at[j, :, :, :n, :n] = self.att[self.att_off[i]:self.att_off[i + 1]].float().view(
                n_l, self.student_heads, n, n)
        return hs, at

    def save(self, path: Path) -> None:
        torch.save({"hidden": self.hidden, "tok_off": self.tok_off, "att": self.att, "att_off": self.att_off,
                    "lengths": self.lengths, "layer_map": self.layer_map,
                    "student_heads": self.student_heads}, path)

    @classmethod
    def load(cls, path: Path) -> "HiddenCache":
        s = torch.load(path, map_location="cpu", weights_only=False)
        return cls(s["hidden"], s["tok_off"], s["att"], s["att_off"], s["lengths"], s["layer_map"],
                   s["student_heads"])
