"""Token classification: first-piece labels, the HF token teacher, the per-token KD loss, and a tiny
student distilled end to end through `python -m distill.ner` (a small random BERT as teacher, to stay fast)."""

import json
import shutil

import pytest
import torch

from cipherbert.data import TokenExample, load_conll2003, tag_names
from distill.teacher import default_teacher_path
from distill.tokens import IGNORE, encode_tokens, load_token_teacher, seqeval_scores, word_predictions

TAGS = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_teacher_path()), local_files_only=True)


def test_labels_sit_on_the_first_piece_of_each_word(minilm_tokenizer):
    sentence = TokenExample(("Kowalczyk", "visited", "Ouagadougou"), ("B-PER", "O", "B-LOC"))
    label2id = {t: i for i, t in enumerate(TAGS)}
    enc = encode_tokens(minilm_tokenizer, [sentence], label2id, max_len=64)
    ids, labels = enc.ids[0], enc.labels[0]
    pieces = minilm_tokenizer.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and labels[0] == labels[-1] == IGNORE
    firsts = [(p, lab) for p, lab in zip(pieces, labels, strict=True) if lab != IGNORE]
    assert [lab for _, lab in firsts] == [label2id["B-PER"], label2id["O"], label2id["B-LOC"]]
    assert all(not p.startswith("##") for p, _ in firsts)
    assert len(pieces) > 5  # the names split into several pieces, the others carry -100
    # words cut off by max_len are scored as "O", so every word of the file counts
    short = encode_tokens(minilm_tokenizer, [sentence], label2id, max_len=4)
    logits = torch.zeros(len(short.ids[0]), len(TAGS))
    logits[:, label2id["B-PER"]] = 1.0
    pred = word_predictions(logits, torch.tensor(short.labels[0]), 3, TAGS)
    assert len(pred) == 3 and pred[-1] == "O"


def test_seqeval_scores_entities_not_tokens():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert seqeval_scores(gold, gold)["f1"] == 1.0
    half = seqeval_scores(gold, [["B-PER", "O", "O", "B-LOC"]])  # PER span broken: 1 of 2 entities right
    assert half["f1"] == pytest.approx(0.5) and half["precision"] == pytest.approx(0.5)


def _tiny_bert_dir(path, token_head: bool):
    from transformers import BertConfig, BertForTokenClassification, BertModel

    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    (
        BertForTokenClassification(BertConfig(**cfg.to_dict(), num_labels=3)) if token_head else BertModel(cfg)
    ).save_pretrained(str(path))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_teacher_path() / name).exists():
            shutil.copy(default_teacher_path() / name, path / name)
    return path


@pytest.mark.parametrize("token_head", [False, True])
def test_token_teacher_loads_any_local_bert_dir(tmp_path, token_head):
    """A bare encoder or a token model with another label set gets a fresh head for our tags."""
    model, tok = load_token_teacher(_tiny_bert_dir(tmp_path, token_head), TAGS)
    assert model.config.num_labels == 9 and model.config.id2label[7] == "B-PER"
    enc = tok([["Ann", "Lee"]], is_split_into_words=True, return_tensors="pt")
    out = model(**enc, output_attentions=True, output_hidden_states=True)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], 9) and len(out.attentions) == 2


def test_token_kd_loss_is_zero_on_the_teacher_and_masks_padding():
    from distill.ner import token_kd_loss

    t = torch.randn(2, 5, 9)
    labels = torch.tensor([[IGNORE, 1, 0, IGNORE, IGNORE], [IGNORE, 7, 8, 0, IGNORE]])
    mask = labels != IGNORE
    assert token_kd_loss(t, t, labels, mask, 2.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    s = t.clone()
    s[0, 4] = 100.0  # a padded position: no effect
    assert token_kd_loss(s, t, labels, mask, 2.0, 0.5).item() == pytest.approx(
        token_kd_loss(t, t, labels, mask, 2.0, 0.5).item(), rel=1e-5
    )


def _jsonl(path, sentences):
    path.write_text("".join(json.dumps({"tokens": list(s.tokens), "tags": list(s.tags)}) + "\n" for s in sentences))
    return path


def test_tiny_token_student_trains_saves_and_loads(tmp_path):
    from distill.ner import main
    from he_models.model import HEFriendlyBert

    conll = load_conll2003("train")
    train = _jsonl(tmp_path / "train.jsonl", conll[:48])
    dev = _jsonl(tmp_path / "dev.jsonl", conll[48:64])
    teacher = _tiny_bert_dir(tmp_path / "teacher", token_head=False)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps(
            {
                "threads": 1,
                "progress": False,
                "data": {"max_len": 48},
                "teacher": {"epochs": 1, "batch_size": 16},
                "student": {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_layers": 2,
                    "num_heads": 2,
                    "max_position": 48,
                },
                "distill": {"stage1_epochs": 1, "stage2_epochs": 2, "batch_size": 16, "batch_size_stage2": 16},
                "ablation": {"enabled": False},
            }
        )
    )
    out = tmp_path / "model"
    argv = [
        "--config",
        str(cfg),
        "--train",
        str(train),
        "--dev",
        str(dev),
        "--test",
        str(dev),
        "--out",
        str(out),
        "--teacher",
        str(teacher),
        "--work-dir",
        str(tmp_path / "work"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert {"config.json", "model.safetensors", "metrics.json", "tokenizer.json", "vocab.txt"} <= {
        p.name for p in out.iterdir()
    }
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "teacher_dev_f1",
        "teacher_test_f1",
        "tiny_exact_dev_f1",
        "tiny_exact_test_f1",
        "he_friendly_dev_f1",
        "he_friendly_test_f1",
    ):
        assert 0.0 <= metrics[key] <= 1.0
    model = HEFriendlyBert.from_pretrained(out)
    tags = tag_names(conll[:48])
    assert model.config.task == "token-classification" and model.config.labels == tags
    assert model.config.is_he_friendly() and "layers.1.gelu" in model.config.ranges
    ids = torch.tensor([[101, 2198, 3000, 102]])
    assert model(ids).logits.shape == (1, 4, len(tags))
    # rerunning finds every stage done
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["he_friendly_dev_f1"] == metrics["he_friendly_dev_f1"]


def test_unknown_dev_tag_fails_with_its_line(tmp_path, capsys):
    from distill.ner import main

    train = _jsonl(tmp_path / "train.jsonl", [TokenExample(("Ann",), ("B-PER",)), TokenExample(("x",), ("O",))])
    dev = tmp_path / "dev.txt"
    dev.write_text("Ann B-PER\n\nAcme B-ORG\n")
    assert (
        main(
            ["--train", str(train), "--dev", str(dev), "--out", str(tmp_path / "o"), "--work-dir", str(tmp_path / "w")]
        )
        == 2
    )
    assert "dev.txt:3: unknown tag 'B-ORG'" in capsys.readouterr().err


def test_shipped_conll_model_is_complete_and_reproduces_its_dev_f1():
    """models/he-bert-tiny-conll: HF layout, named BIO labels, HE-friendly, <= 20 MB, and its dev F1."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from distill.tokens import evaluate
    from he_models.model import HEFriendlyBert

    shipped = Path(__file__).resolve().parent.parent / "models" / "he-bert-tiny-conll"
    files = {p.name for p in shipped.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "metrics.json"} <= files
    assert sum(p.stat().st_size for p in shipped.iterdir()) <= 20 * 2**20
    saved = json.loads((shipped / "config.json").read_text())
    assert saved["task"] == "token-classification" and saved["id2label"] == {str(i): t for i, t in enumerate(TAGS)}
    model = HEFriendlyBert.from_pretrained(shipped)
    assert model.config.is_he_friendly() and model.config.labels == TAGS
    metrics = json.loads((shipped / "metrics.json").read_text())
    for key in ("teacher", "tiny_exact", "he_friendly"):
        for split in ("dev", "test"):
            assert 0 < metrics[f"{key}_{split}_f1"] <= 1
    tok = AutoTokenizer.from_pretrained(str(shipped), local_files_only=True)
    dev = encode_tokens(tok, load_conll2003("dev"), {t: i for i, t in enumerate(TAGS)}, metrics["max_len"])
    model.eval()
    scores = evaluate(lambda ids, mask: model(ids, mask).logits, dev, TAGS)
    assert scores["f1"] == pytest.approx(metrics["he_friendly_dev_f1"], abs=2e-3)
