"""Distillation: the teacher loader, a short CPU distillation that lowers the loss, configs and bad input."""

import json
from pathlib import Path

import pytest
import torch

from distill.batching import ThreadGovernor, bucketed_batches, encode, pad
from distill.cache import HiddenCache, default_layer_map, group_heads
from distill.config import DEFAULTS, load_config
from he_models.config import ConfigError, HEConfig

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "distill" / "configs" / "tiny.json"
FULL = REPO / "distill" / "configs" / "he-bert-tiny-rt.json"

SENTENCES = [
    ("a gorgeous , witty , seductive movie .", 1), ("the acting is dreadful and the plot is dull .", 0),
    ("one of the best films of the year .", 1), ("a tedious , lifeless mess .", 0),
    ("funny , touching and smart .", 1), ("it never finds its footing .", 0),
    ("a triumph of style and heart .", 1), ("boring beyond belief .", 0),
    ("an exhilarating ride from start to finish .", 1), ("the jokes fall flat every time .", 0),
    ("warm , wise and wonderfully acted .", 1), ("a waste of a talented cast .", 0),
    ("smart and surprisingly moving .", 1), ("clumsy , loud and forgettable .", 0),
    ("a delight .", 1), ("painfully slow and pretentious .", 0),
] * 2


@pytest.fixture(scope="module")
def teacher_and_tok():
    from distill.teacher import load_teacher

    torch.set_num_threads(1)
    return load_teacher(None, num_labels=2)


# ---- teacher loader ----------------------------------------------------------------------------------

def test_teacher_loader_on_shipped_checkpoint(teacher_and_tok):
    teacher, tok = teacher_and_tok
    assert teacher.num_layers == 6 and teacher.num_heads == 12 and teacher.hidden_size == 384
    assert tok("HELLO World")["input_ids"] == tok("hello world")["input_ids"]  # uncased WordPiece
    enc = tok(["a fine film", "bad"], padding=True, return_tensors="pt")
    teacher.eval()
    with torch.no_grad():
        out = teacher(enc["input_ids"], enc["attention_mask"], output_hidden=True)
    assert out["logits"].shape == (2, 2)
    assert len(out["hidden_states"]) == 7 and len(out["attentions"]) == 6
    assert out["attentions"][0].shape[1] == 12


def test_teacher_save_and_reload_roundtrip(tmp_path, teacher_and_tok):
    from distill.teacher import load_teacher, save_teacher

    teacher, tok = teacher_and_tok
    save_teacher(teacher, tok, tmp_path / "t")
    again, _ = load_teacher(tmp_path / "t", num_labels=2)
    ids = torch.tensor([[101, 2307, 3185, 102]])
    mask = torch.ones_like(ids)
    teacher.eval()
    again.eval()
    with torch.no_grad():
        assert torch.allclose(teacher(ids, mask)["logits"], again(ids, mask)["logits"], atol=1e-5)


def test_teacher_loader_rejects_non_checkpoint(tmp_path):
    from distill.teacher import TeacherError, load_teacher

    with pytest.raises(TeacherError, match="not a directory"):
        load_teacher(tmp_path / "missing")
    with pytest.raises(TeacherError, match="no config.json"):
        load_teacher(tmp_path)


# ---- pieces --------------------------------------------------------------------------------------------

def test_layer_map_and_head_grouping():
    assert default_layer_map(2, 6) == [3, 6]
    assert default_layer_map(4, 12) == [3, 6, 9, 12]
    att = torch.rand(1, 12, 3, 3)
    g = group_heads(att, 2)
    assert g.shape == (1, 2, 3, 3)
    assert torch.allclose(g[0, 1], att[0, 6:].mean(0))


def test_bucketed_batches_cover_every_example_once():
    lengths = [5, 9, 3, 7, 7, 2, 11, 4, 6, 8]
    batches = bucketed_batches(lengths, 3, seed=1, pool=2)
    assert sorted(i for b in batches for i in b) == list(range(10))
    ids, mask = pad([[1, 2], [3]])
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_thread_governor_keeps_a_valid_count():
    gov = ThreadGovernor(2, window=2, probe_every=4)
    for _ in range(20):
        gov.step()
        assert gov.threads in (1, 2)
    torch.set_num_threads(1)


def test_pca_embedding_init(teacher_and_tok):
    from distill.student import build_student, pca_embeddings

    teacher, _ = teacher_and_tok
    word, pos = pca_embeddings(teacher, 32)
    assert word.shape == (30522, 32) and pos.shape[1] == 32
    var = word.var(0)
    assert torch.all(var[:-1] >= var[1:] - 1e-4), "components must come in decreasing variance"
    student = build_student(HEConfig(hidden_size=32, intermediate_size=64, max_position=32), teacher)
    assert student.embeddings.word.weight.shape == (30522, 32)


def test_short_cpu_distillation_lowers_the_loss(tmp_path, teacher_and_tok):
    """Stage 1 (hidden states + attention maps) and stage 2 (logits + labels) on a few dozen sentences."""
    from distill.student import StudentRun, build_student
    from distill.teacher import predict_logits

    teacher, tok = teacher_and_tok
    data = encode(tok, [s for s, _ in SENTENCES], [y for _, y in SENTENCES], 32)
    cfg = HEConfig(hidden_size=32, intermediate_size=64, max_position=32, dropout=0.0)
    cache = HiddenCache.build(teacher, data, default_layer_map(2, 6), 2, 16, torch.device("cpu"), progress=False)
    logits = predict_logits(teacher, data, 16, torch.device("cpu"), progress=False)
    model = build_student(cfg, teacher, seed=0)
    dcfg = {**DEFAULTS["distill"], "batch_size": 8, "lr_stage1": 3e-3, "lr_stage2": 3e-3}
    run = StudentRun("test", model, tmp_path / "s", torch.device("cpu"), seed=0, progress=False, log=lambda m: None)
    res = run.train(train=data, train_logits=logits, aug=None, aug_logits=None, hidden_cache=cache, dev=data,
                    dcfg=dcfg, stage1_epochs=6, stage2_epochs=6)
    s1 = [h["loss"] for h in res["history"] if h["stage"] == 1]
    s2 = [h["loss"] for h in res["history"] if h["stage"] == 2]
    assert s1[-1] < 0.9 * s1[0], f"stage 1 loss did not fall: {s1}"
    assert s2[-1] < 0.9 * s2[0], f"stage 2 loss did not fall: {s2}"
    # resuming a finished run trains nothing more and keeps the weights
    again = StudentRun("test", build_student(cfg, teacher, seed=0), tmp_path / "s", torch.device("cpu"), seed=0,
                       progress=False, log=lambda m: None)
    res2 = again.train(train=data, train_logits=logits, aug=None, aug_logits=None, hidden_cache=cache, dev=data,
                       dcfg=dcfg, stage1_epochs=6, stage2_epochs=6)
    assert len(res2["history"]) == len(res["history"])


def test_range_penalty_bounds_scores():
    from distill.student import range_penalty
    from he_models.model import HEFriendlyBert

    model = HEFriendlyBert(HEConfig(vocab_size=50, hidden_size=16, intermediate_size=32, max_position=16))
    with torch.no_grad():
        model.layers[0].attn.q.weight.mul_(500)
        model.layers[0].attn.k.weight.mul_(500)
    model.train()
    model(torch.randint(1, 50, (2, 8)))
    assert range_penalty(model, 1.0, 0.0) > 0
    assert range_penalty(model, 1e9, 1e9) == 0
    assert range_penalty(model, 0.0, 0.0) is None


def test_augmentation_is_deterministic_and_new():
    from distill.augment import augment

    texts = [s for s, _ in SENTENCES[:16]]
    a, b = augment(texts, 2, seed=3), augment(texts, 2, seed=3)
    assert a == b and a and not set(a) & set(texts)


# ---- configs and bad input -----------------------------------------------------------------------------

def test_shipped_configs_load():
    for path in (FULL, TINY):
        cfg = load_config(path)
        HEConfig(**cfg["student"])


def _write(tmp_path, obj, name="c.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize("raw,needle", [
    ({"distill": {"temprature": 2}}, "temprature"),
    ({"distill": {"temperature": -1}}, "distill.temperature"),
    ({"student": {"softmax": "sparsemax"}}, "softmax"),
    ({"teacher": {"epochs": "three"}}, "teacher.epochs"),
    ({"data": {"task": "files"}}, "data.train"),
    ({"bogus": 1}, "bogus"),
    ('{"seed": 1,,}', "invalid JSON"),
])
def test_bad_config_fails_with_clear_message(tmp_path, raw, needle, capsys):
    from distill.__main__ import main

    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)
    assert main(["--config", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    from distill.__main__ import main

    assert main(["--config", str(tmp_path / "nope.json")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_bad_dataset_file_fails_with_clear_message(tmp_path, capsys):
    from distill.__main__ import main

    train = tmp_path / "train.csv"
    train.write_text("text,label\ngood movie,pos\nbad movie,neg\n")
    bad = tmp_path / "dev.csv"
    bad.write_text("text,label\nfine,pos\nmeh,neutral\n")
    cfg = _write(tmp_path, {"data": {"task": "files", "train": str(train), "dev": str(bad), "sst2_dev": False},
                            "work_dir": str(tmp_path / "w"), "output_dir": str(tmp_path / "o")})
    assert main(["--config", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "dev.csv:3: unknown label 'neutral'" in err and "['neg', 'pos']" in err
    dev = train
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("sentence_text,y\nhello,1\n")
    cfg = _write(tmp_path, {"data": {"task": "files", "train": str(nocol), "dev": str(dev), "sst2_dev": False},
                            "work_dir": str(tmp_path / "w"), "output_dir": str(tmp_path / "o")}, "c2.json")
    assert main(["--config", str(cfg), "--no-progress"]) == 2
    assert "no text column" in capsys.readouterr().err


def test_tiny_end_to_end_run_and_resume(tmp_path, capsys):
    """The tiny shipped config through `python -m distill` (teacher not fine-tuned, to stay fast)."""
    from distill.__main__ import main

    raw = json.loads(TINY.read_text())
    raw.update(output_dir=str(tmp_path / "model"), work_dir=str(tmp_path / "work"))
    raw["teacher"]["finetune"] = False
    cfg = _write(tmp_path, raw)
    assert main(["--config", str(cfg)]) == 0
    out = tmp_path / "model"
    assert {"model.safetensors", "config.json", "metrics.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["he_friendly_accuracy"] is not None and metrics["dev_size"] == 32
    config = json.loads((out / "config.json").read_text())
    assert "layers.1.softmax" in config["ranges"]
    # a second run finds every stage done and retrains nothing
    capsys.readouterr()
    assert main(["--config", str(cfg)]) == 0
    assert "already trained" in capsys.readouterr().out


def test_teacher_loader_accepts_hf_sequence_classification_checkpoint(tmp_path):
    """Any local BERT-family directory works, e.g. a user's fine-tuned *ForSequenceClassification."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    from distill.teacher import default_teacher_path, load_teacher

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(str(tmp_path))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_teacher_path() / name).exists():
            shutil.copy(default_teacher_path() / name, tmp_path / name)
    teacher, tok = load_teacher(tmp_path, num_labels=2)
    assert teacher.hf_classifier and teacher.num_layers == 2 and teacher.num_heads == 4
    enc = tok(["a fine film"], return_tensors="pt")
    teacher.eval()
    with torch.no_grad():
        out = teacher(enc["input_ids"], enc["attention_mask"], output_hidden=True)
    assert out["logits"].shape == (1, 2) and len(out["attentions"]) == 2


def _trec_files(tmp_path, per_class_train: int, per_class_dev: int):
    """Small TREC question files with string labels (NUM, LOC, ...), as a user would bring them."""
    import csv

    from cipherbert.data import load_trec_questions

    by_label: dict[str, list[str]] = {}
    for text, label in load_trec_questions():
        by_label.setdefault(label, []).append(text)
    paths = {}
    for split, lo, hi in (("train", 0, per_class_train), ("dev", per_class_train, per_class_train + per_class_dev)):
        path = tmp_path / f"{split}.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text", "label"])
            for label, texts in sorted(by_label.items()):
                w.writerows([t, label] for t in texts[lo:hi])
        paths[split] = path
    return paths


def test_distill_without_config_uses_the_shipped_settings(tmp_path):
    from distill.__main__ import SHIPPED_CONFIG, build_parser, config_from_args

    paths = _trec_files(tmp_path, 2, 1)
    args = build_parser().parse_args(["--train", str(paths["train"]), "--dev", str(paths["dev"]),
                                      "--out", str(tmp_path / "trec"), "--teacher", "/some/hf/dir"])
    cfg = config_from_args(args)
    shipped = json.loads(SHIPPED_CONFIG.read_text())
    assert cfg["data"]["task"] == "files" and cfg["data"]["train"] == str(paths["train"])
    assert cfg["student"] == {**cfg["student"], **shipped["student"]}
    assert cfg["distill"]["stage1_epochs"] == shipped["distill"]["stage1_epochs"]
    assert cfg["output_dir"] == str(tmp_path / "trec") and cfg["work_dir"] == str(tmp_path / "trec.work")
    assert cfg["teacher"]["path"] == "/some/hf/dir" and cfg["name"] == "trec"
    with pytest.raises(Exception, match="--train, --dev and --out"):
        config_from_args(build_parser().parse_args(["--train", str(paths["train"])]))


def test_multiclass_string_labels_are_named_in_config_json(tmp_path):
    """TREC's 6 coarse classes by name through `cipherbert distill` (tiny sizes via --config)."""
    from distill.__main__ import main
    from he_models.model import HEFriendlyBert

    paths = _trec_files(tmp_path, 8, 3)
    out = tmp_path / "trec"
    assert main(["--config", str(TINY), "--train", str(paths["train"]), "--dev", str(paths["dev"]),
                 "--out", str(out), "--work-dir", str(tmp_path / "work"), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["label2id"] == {n: i for i, n in enumerate(names)} and config["num_labels"] == 6
    assert HEFriendlyBert.from_pretrained(out).config.labels == names
