"""DP fine-tuning (dp_training/): per-sample gradients, the privacy report, the end-to-end CLI, bad data."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch.nn import functional as F

from cipherbert.data import DatasetError, load_sms_spam
from he_models.config import HEConfig
from he_models.model import AffineNorm, HEFriendlyBert

opacus = pytest.importorskip("opacus")

# Opacus' full backward hooks warn when a module's inputs need no gradient (the frozen embeddings).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing", "ignore:Secure RNG turned off",
                                        "ignore:Optimal order is the largest alpha")

from opacus import GradSampleModule  # noqa: E402

from dp_training.__main__ import main  # noqa: E402
from dp_training.modules import (  # noqa: E402
    FrozenAffineNorm,
    HeadScale,
    export_state_dict,
    make_dp_twin,
)
from dp_training.train import default_delta, recompute_epsilon  # noqa: E402
from tests.support.dp_fixtures import make_random_base  # noqa: E402


def tiny_model(seed: int = 0, **overrides) -> HEFriendlyBert:
    torch.manual_seed(seed)
    cfg = HEConfig(**{"vocab_size": 60, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
                      "intermediate_size": 32, "max_position": 16, "dropout": 0.0, **overrides})
    model = HEFriendlyBert(cfg)
    with torch.no_grad():  # non-trivial statistics and normalisers, as after distillation
        for layer in model.layers:
            for norm in (layer.norm1, layer.norm2):
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.normal_(1.0, 0.1)
                norm.bias.normal_()
            layer.attn.log_z.normal_(3.0, 0.3)
    return model.eval()


def batch(seed: int = 1, b: int = 5, n: int = 10, vocab: int = 60):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for i, length in enumerate([n, 6, 3, 8, 1][:b]):
        mask[i, length:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(0, 2, (b,), generator=g)
    return ids, mask, labels


def one_at_a_time(twin, ids, mask, labels):
    """Reference per-example gradients: one example per forward/backward, no hooks."""
    params = [p for p in twin.parameters() if p.requires_grad]
    grads = []
    for i in range(len(labels)):
        loss = F.cross_entropy(twin(ids[i:i + 1], mask[i:i + 1]).logits, labels[i:i + 1], reduction="sum")
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    return params, grads


@pytest.mark.parametrize("overrides, scope", [({}, "all"), ({"pooler": "poly", "pooling": "cls"}, "all"),
                                              ({"gelu": "exact"}, "all"), ({}, "bitfit")])
def test_per_sample_gradients_match_one_at_a_time(overrides, scope):
    from dp_training.train import apply_train_scope

    model = tiny_model(**overrides)
    twin = make_dp_twin(model)
    apply_train_scope(twin, scope)
    ids, mask, labels = batch()
    params, reference = one_at_a_time(twin, ids, mask, labels)
    gsm = GradSampleModule(twin, loss_reduction="sum", strict=True)
    F.cross_entropy(gsm(ids, mask).logits, labels, reduction="sum").backward()
    names = {id(p): n for n, p in twin.named_parameters()}
    covered = set()
    for j, p in enumerate(params):
        assert p.grad_sample is not None, f"no per-sample gradient for {names[id(p)]}"
        assert p.grad_sample.shape == (len(labels), *p.shape)
        for i in range(len(labels)):
            ref = reference[i][j] if reference[i][j] is not None else torch.zeros_like(p)
            torch.testing.assert_close(p.grad_sample[i], ref, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{names[id(p)]} sample {i}: {m}")  # noqa: B023
        covered.add(type(dict(twin.named_modules())[names[id(p)].rsplit(".", 1)[0]]).__name__)
    # every kind of trainable layer was exercised: Linear, the frozen-statistics norm, log_z's HeadScale
    assert {"Linear", "FrozenAffineNorm", "HeadScale"} <= covered


def test_custom_grad_samplers_alone():
    torch.manual_seed(3)
    norm = AffineNorm(8)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
        norm.weight.normal_()
    x = torch.randn(4, 5, 8)
    for module in (FrozenAffineNorm(norm), HeadScale(torch.nn.Parameter(torch.randn(8)))):
        inp = torch.randn(4, 8, 3, 3) if isinstance(module, HeadScale) else x
        target = torch.randn_like(inp)
        params = list(module.parameters())
        refs = [torch.autograd.grad(((module(inp[i:i + 1]) - target[i:i + 1]) ** 2).sum(), params)
                for i in range(len(inp))]
        gsm = GradSampleModule(torch.nn.Sequential(module), loss_reduction="sum")
        ((gsm(inp) - target) ** 2).sum().backward()
        for j, p in enumerate(params):
            for i in range(len(inp)):
                torch.testing.assert_close(p.grad_sample[i], refs[i][j], rtol=1e-5, atol=1e-6)


def test_twin_keeps_inference_semantics_and_parameter_names():
    model = tiny_model()
    twin = make_dp_twin(model)
    ids, mask, _ = batch()
    twin.eval()
    torch.testing.assert_close(twin(ids, mask).logits, model(ids, mask).logits)
    # train mode differs from eval mode only by dropout (0 here): the norms never use batch statistics
    twin.train()
    torch.testing.assert_close(twin(ids, mask).logits, model(ids, mask).logits)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.01)
    state = export_state_dict(twin, model.state_dict())
    assert set(state) == set(model.state_dict())
    fresh = HEFriendlyBert(model.config)
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    twin.eval()
    torch.testing.assert_close(fresh(ids, mask).logits, twin(ids, mask).logits)
    # running statistics are the base's, untouched
    torch.testing.assert_close(state["layers.0.norm1.running_mean"], model.layers[0].norm1.running_mean)


def test_frozen_norm_keeps_samples_independent():
    """Why AffineNorm's batch statistics are frozen: in training mode they mix samples."""
    model = tiny_model()
    ids, mask, _ = batch()
    other = ids.clone()
    other[1:] = (other[1:] + 7) % 60
    other[mask == 0] = 0
    twin = make_dp_twin(model)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask).logits[0], model(other, mask).logits[0])
    torch.testing.assert_close(twin(ids, mask).logits[0], twin(other, mask).logits[0])


def test_bitfit_scope_trains_biases_norms_log_z_and_head():
    from dp_training.train import apply_train_scope

    twin = make_dp_twin(tiny_model())
    apply_train_scope(twin, "bitfit")
    trainable = {n for n, p in twin.named_parameters() if p.requires_grad}
    assert "layers.0.fc1.bias" in trainable and "layers.0.fc1.weight" not in trainable
    assert {"layers.1.norm1.weight", "layers.1.attn.head_scale.log_z", "classifier.weight"} <= trainable
    assert not any(n.startswith("embeddings.") for n in trainable)


def test_what_is_trained_and_what_is_frozen():
    twin = make_dp_twin(tiny_model())
    frozen = {n for n, p in twin.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in twin.named_parameters() if n.startswith("embeddings.")}
    trainable = {n for n, p in twin.named_parameters() if p.requires_grad}
    assert "layers.0.attn.head_scale.log_z" in trainable and "layers.1.norm2.weight" in trainable
    assert "classifier.weight" in trainable
    # nothing recorded from (private) training batches
    ids, mask, _ = batch()
    twin(ids, mask)
    assert twin.recorded_ranges() == {}


def test_default_delta_is_well_below_one_over_n():
    for n in (38, 3873, 100_000):
        assert default_delta(n) <= 0.1 / n
    assert default_delta(3873) == pytest.approx(1e-5)


# --- end to end ---

@pytest.fixture(scope="module")
def sms_rows():
    examples = load_sms_spam()
    rng = random.Random(0)
    spam = [e for e in examples if e.label == 1]
    ham = [e for e in examples if e.label == 0]
    return rng.sample(spam, 14) + rng.sample(ham, 34)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, sms_rows):
    texts = [e.text for e in load_sms_spam()[:600]]
    return make_random_base(tmp_path_factory.mktemp("base"), texts=texts, vocab_size=300, hidden_size=16,
                            num_heads=2, intermediate_size=32, max_position=32, num_layers=2)


def write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for e in rows:
            w.writerow([e.text, e.label])
    return path


def run_cli(tmp_path, base, data, *extra):
    out = tmp_path / "dp-model"
    argv = ["--data", str(data), "--base", str(base), "--out", str(out), "--epochs", "2", "--quiet",
            "--max-length", "24", *extra]
    return main(argv), out


def test_end_to_end_dp_finetune_rdp(tmp_path, tiny_base, sms_rows):
    data = write_csv(tmp_path / "sms.csv", sms_rows)
    rc, out = run_cli(tmp_path, tiny_base, data, "--epsilon", "8", "--batch-size", "16",
                      "--physical-batch-size", "4")
    assert rc == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "privacy_report.json"):
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists()
    model = HEFriendlyBert.from_pretrained(out)
    assert model.config.num_labels == 2 and model.config.is_he_friendly()
    assert set(model.config.ranges) >= {"layers.0.softmax", "layers.1.gelu"}
    report = json.loads((out / "privacy_report.json").read_text())
    for key in ("epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "epochs",
                "max_grad_norm", "dataset_size", "utility"):
        assert report[key] is not None, key
    assert report["dataset_size"] == report["data"]["split"]["train"]
    assert sum(report["data"]["split"].values()) == len(sms_rows)  # nothing dropped
    assert report["delta"] < 1 / report["dataset_size"]
    assert report["epsilon"] <= 8.0 + 1e-6
    # a fresh accountant, fed only the recorded hyperparameters, gives the reported epsilon
    assert recompute_epsilon(report) == pytest.approx(report["epsilon"], rel=1e-9)
    # and the recorded hyperparameters are the ones that were used: steps = epochs / sample_rate
    assert report["steps"] == report["epochs"] * round(1 / report["sample_rate"])
    assert 0.0 <= report["utility"]["accuracy"] <= 1.0
    assert 0.0 <= report["membership_inference_auc"]["loss"] <= 1.0


def test_end_to_end_prv_with_empty_poisson_batches(tmp_path, tiny_base, sms_rows):
    data = write_csv(tmp_path / "sms.csv", sms_rows)
    # expected batch of 2 out of ~38 rows: some Poisson batches are empty and must still be steps
    rc, out = run_cli(tmp_path, tiny_base, data, "--epsilon", "3", "--accountant", "prv",
                      "--batch-size", "2", "--physical-batch-size", "4")
    assert rc == 0
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["accountant"] == "prv"
    assert recompute_epsilon(report) == pytest.approx(report["epsilon"], rel=1e-6)
    HEFriendlyBert.from_pretrained(out)


def test_resume_restores_the_accountant(tmp_path, tiny_base, sms_rows):
    data = write_csv(tmp_path / "sms.csv", sms_rows)
    args = ("--epsilon", "8", "--batch-size", "16", "--keep-checkpoints")
    rc, out = run_cli(tmp_path, tiny_base, data, *args)
    assert rc == 0 and (out / "checkpoints" / "last.pt").exists()
    first = json.loads((out / "privacy_report.json").read_text())
    rc, _ = run_cli(tmp_path, tiny_base, data, *args, "--resume")  # all epochs done: nothing left to train
    second = json.loads((out / "privacy_report.json").read_text())
    assert rc == 0 and second["steps"] == first["steps"] and second["epsilon"] == first["epsilon"]
    rc, _ = run_cli(tmp_path, tiny_base, data, "--epsilon", "3", "--batch-size", "16", "--resume")
    assert rc == 2  # a checkpoint made under other privacy settings is refused


def test_no_dp_baseline_runs(tmp_path, tiny_base, sms_rows):
    data = tmp_path / "sms.jsonl"  # JSONL goes through the same loader
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in sms_rows))
    rc, out = run_cli(tmp_path, tiny_base, data, "--no-dp", "--batch-size", "16")
    assert rc == 0
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["dp"] is False and report["epsilon"] is None
    HEFriendlyBert.from_pretrained(out)


@pytest.mark.parametrize("suffix, content, where", [
    (".csv", "text,label\nwin a prize now,1\nsee you later,0\nok then,maybe\nhi,0\n", ":4: label 'maybe'"),
    (".csv", "text,label\nwin a prize now,1\n,0\n", ":3: empty 'text'"),
    (".jsonl", '{"text": "win", "label": 1}\n{"text": "hi", "label": 0}\n{"text": "x"\n', ":3: invalid JSON"),
    (".jsonl", '{"text": "win", "label": 1}\n{"text": "hi"}\n', ":2: missing 'label'"),
])
def test_bad_rows_fail_with_their_line_number(tmp_path, tiny_base, capsys, suffix, content, where):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    rc, out = run_cli(tmp_path, tiny_base, path, "--epsilon", "8")
    assert rc == 2
    assert where in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()
    from dp_training.train import FinetuneConfig, finetune

    with pytest.raises(DatasetError, match=where.replace("(", r"\(")):
        finetune(FinetuneConfig(data=str(path), base=str(tiny_base), out=str(out), progress=False))


def test_rejects_delta_not_below_one_over_n(tmp_path, tiny_base, sms_rows, capsys):
    data = write_csv(tmp_path / "sms.csv", sms_rows)
    rc, _ = run_cli(tmp_path, tiny_base, data, "--epsilon", "8", "--delta", "0.1")
    assert rc == 2 and "delta" in capsys.readouterr().err


def test_recompute_epsilon_is_an_independent_accountant():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    report = {"accountant": "rdp", "noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 30, "delta": 1e-5}
    assert recompute_epsilon(report) == pytest.approx(acc.get_epsilon(1e-5))
    assert math.isfinite(recompute_epsilon(report))


@pytest.mark.slow
def test_sweep_writes_results_and_plot(tmp_path, tiny_base, sms_rows):
    from dp_training.sweep import main as sweep_main
    from dp_training.sweep import markdown_table

    data = write_csv(tmp_path / "sms.csv", sms_rows * 3)  # duplicates stay within one split
    results, png = tmp_path / "dp.json", tmp_path / "dp.png"
    rc = sweep_main(["--base", str(tiny_base), "--data", str(data), "--epochs", "1", "--batch-size", "16",
                     "--max-length", "24", "--work-dir", str(tmp_path / "runs"), "--results", str(results),
                     "--plot", str(png), "--quiet", "--no-reference"])
    assert rc == 0 and png.stat().st_size > 0
    result = json.loads(results.read_text())
    assert [r["epsilon"] for r in result["runs"]] == [None, 8.0, 3.0, 1.0]
    for r in result["runs"]:
        for key in ("accuracy", "spam_f1", "mia_auc", "samples_per_s"):
            assert isinstance(r[key], float), key
    assert result["delta"] < 1 / result["data"]["split"]["train"]
    assert result["machine"]["cores"] >= 1 and "opacus" in result["machine"]
    assert "| no DP |" in markdown_table(result)
