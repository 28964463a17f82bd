"""HE-friendly model: approximations against the exact functions, shapes, padding, the shipped model."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from he_models.config import QUAD_GELU_COEFFS, ConfigError, HEConfig, multiplicative_depth
from he_models.model import AffineNorm, HEFriendlyBert, fit_gelu, poly

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "he-bert-tiny-rt"

REQUIRED_METRICS = ("dataset", "dev_size", "test_size", "teacher_accuracy", "tiny_exact_accuracy",
                    "he_friendly_accuracy", "he_friendly_test_accuracy", "teacher_sst2_accuracy",
                    "tiny_exact_sst2_accuracy", "he_friendly_sst2_accuracy", "approximations", "params",
                    "train_seconds", "device")


def small_config(**kw) -> HEConfig:
    base = dict(vocab_size=200, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                max_position=40, dropout=0.0)
    base.update(kw)
    return HEConfig(**base)


# ---- approximations against the exact functions ---------------------------------------------------

@pytest.mark.parametrize("lo,hi,max_err", [(-1.0, 1.0, 0.015), (-3.0, 3.0, 0.22), (-5.0, 5.0, 0.37)])
def test_gelu_least_squares_fit_error_on_its_range(lo, hi, max_err):
    coeffs = fit_gelu(lo, hi)
    assert len(coeffs) == 3
    x = torch.linspace(lo, hi, 4001)
    err = (poly(x, coeffs) - F.gelu(x)).abs().max().item()
    assert err <= max_err, f"quadratic GELU fit on [{lo}, {hi}]: max error {err:.4f} > {max_err}"


def test_gelu_fit_weighted_by_samples_is_better_where_samples_are():
    samples = torch.randn(20000) * 0.8
    weighted = fit_gelu(-4.0, 4.0, samples=samples)
    uniform = fit_gelu(-4.0, 4.0)
    x = torch.randn(20000) * 0.8
    e_w = (poly(x, weighted) - F.gelu(x)).pow(2).mean()
    e_u = (poly(x, uniform) - F.gelu(x)).pow(2).mean()
    assert e_w < e_u


def test_quad_gelu_is_mpcformer_quadratic():
    # 0.125 x^2 + 0.25 x + 0.5 = 0.125 (x + 1)^2 + 0.375: a replacement that distillation adapts to,
    # not an approximation (error 0.5 at x = 0); any quadratic is equivalent to it up to the
    # neighbouring linear layers, so the fit/quad choice only changes training, not expressiveness.
    x = torch.linspace(-6, 6, 101)
    assert torch.allclose(poly(x, QUAD_GELU_COEFFS), 0.125 * (x + 1) ** 2 + 0.375, atol=1e-5)
    # Stated distance from GELU on [-2, 2]: up to 0.56 (0.5 at x = 0): not an approximation.
    x = torch.linspace(-2, 2, 4001)
    assert (poly(x, QUAD_GELU_COEFFS) - F.gelu(x)).abs().max() <= 0.57


def test_pooler_odd_cubic_vs_tanh():
    # pooler_coeffs default: x - x^3/3 (Taylor); within 0.1 of tanh on [-1, 1].
    x = torch.linspace(-1, 1, 2001)
    err = (poly(x, HEConfig().pooler_coeffs) - torch.tanh(x)).abs().max().item()
    assert err < 0.1


def test_2quad_fixed_equals_softmax_on_uniform_scores():
    # With all scores 0 and z = c^2 (the initial value), (0 + c)^2 / (n c^2) = 1/n = softmax.
    cfg = small_config(softmax="2quad_fixed")
    model = HEFriendlyBert(cfg).eval()
    attn = model.layers[0].attn
    for lin in (attn.q, attn.k):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 7, cfg.hidden_size)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    _, probs = attn(x, mask)
    assert torch.allclose(probs[0], torch.full_like(probs[0], 1 / 7), atol=1e-6)
    assert torch.allclose(probs[1, :, :4, :4], torch.full((2, 4, 4), 1 / 4), atol=1e-6)
    assert probs[1, :, :, 4:].abs().max() == 0  # padding keys get no weight


def test_2quad_rows_sum_to_one_and_exact_matches_softmax():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    for kind in ("2quad", "exact"):
        model = HEFriendlyBert(small_config(softmax=kind)).eval()
        _, probs = model.layers[0].attn(x, mask)
        sums = probs.sum(-1)
        assert torch.allclose(sums[0], torch.ones_like(sums[0]), atol=1e-5)
        assert torch.allclose(sums[1, :, :3], torch.ones(2, 3), atol=1e-5)


def test_affine_norm_folds_exactly():
    norm = AffineNorm(16)
    norm.train()
    for _ in range(50):
        norm(torch.randn(8, 5, 16) * 3 + 1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    norm.eval()
    x = torch.randn(4, 16)
    scale, shift = norm.folded()
    assert torch.allclose(norm(x), x * scale + shift, atol=1e-5)


# ---- shapes and padding ---------------------------------------------------------------------------

@pytest.mark.parametrize("approx", [
    dict(softmax="2quad_fixed", gelu="quad", layernorm="affine"),
    dict(softmax="exact", gelu="exact", layernorm="exact"),
    dict(softmax="2quad", gelu="fit", layernorm="affine", pooler="poly"),
])
def test_shapes_and_padding_invariance(approx):
    torch.manual_seed(1)
    cfg = small_config(**approx)
    model = HEFriendlyBert(cfg)
    model.train()
    model(torch.randint(1, 200, (4, 9)))  # running statistics
    model.eval()
    ids = torch.randint(1, 200, (1, 6))
    out = model(ids)
    assert out.logits.shape == (1, cfg.num_labels)
    assert len(out.hidden_states) == cfg.num_layers + 1
    assert out.hidden_states[0].shape == (1, 6, cfg.hidden_size)
    assert [a.shape for a in out.attentions] == [(1, cfg.num_heads, 6, 6)] * cfg.num_layers
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    out_p = model(padded, (padded != 0).long())
    assert torch.allclose(out.logits, out_p.logits, atol=1e-5), "padding changed the logits"
    # batching with a longer sentence changes nothing either
    other = torch.randint(1, 200, (1, 11))
    batch = torch.cat([padded, other], 0)
    out_b = model(batch, (batch != 0).long())
    assert torch.allclose(out.logits[0], out_b.logits[0], atol=1e-5)


def test_too_long_input_is_refused():
    model = HEFriendlyBert(small_config())
    with pytest.raises(ValueError, match="max_position"):
        model(torch.ones(1, 41, dtype=torch.long))


def test_bad_model_config_names_the_field():
    with pytest.raises(ConfigError, match="softmax"):
        HEConfig(softmax="sigmoid")
    with pytest.raises(ConfigError, match="gelu_coeffs"):
        HEConfig(gelu_coeffs=[1.0, 2.0])


def test_depth_per_layer():
    d = multiplicative_depth(HEConfig())
    assert d == {"attention": 5, "ffn": 3, "layer": 8}
    assert multiplicative_depth(HEConfig(softmax="2quad"))["layer"] == 9


def test_ranges_recorded_and_saved(tmp_path):
    model = HEFriendlyBert(small_config())
    model.train()
    model(torch.randint(1, 200, (3, 8)))
    model.save_pretrained(tmp_path)
    ranges = json.loads((tmp_path / "config.json").read_text())["ranges"]
    assert set(ranges) == {"layers.0.softmax", "layers.0.gelu", "layers.1.softmax", "layers.1.gelu"}
    loaded = HEFriendlyBert.from_pretrained(tmp_path)
    ids = torch.randint(1, 200, (2, 5))
    model.eval()
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)


# ---- the shipped model ------------------------------------------------------------------------------

@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped model yet")
def test_shipped_model_is_complete_and_he_friendly():
    files = {p.name for p in SHIPPED.iterdir()}
    assert {"model.safetensors", "config.json", "metrics.json", "tokenizer.json", "vocab.txt"} <= files
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 20 * 2 ** 20
    model = HEFriendlyBert.from_pretrained(SHIPPED)
    cfg = model.config
    assert cfg.is_he_friendly()
    for i in range(cfg.num_layers):
        for name in ("softmax", "gelu"):
            lo, hi = cfg.ranges[f"layers.{i}.{name}"]
            assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    assert not missing, f"metrics.json lacks {missing}"


@pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(), reason="no shipped model yet")
def test_shipped_model_reproduces_its_dev_accuracy():
    from tokenizers import Tokenizer

    from cipherbert.data import sentiment_splits

    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    model = HEFriendlyBert.from_pretrained(SHIPPED)
    tok = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    dev = sentiment_splits()[0].dev
    assert len(dev) == metrics["dev_size"]
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dev), 128):
            chunk = dev[start:start + 128]
            enc = [tok.encode(ex.text).ids[: cfg_max(model)] for ex in chunk]
            n = max(len(e) for e in enc)
            ids = torch.tensor([e + [0] * (n - len(e)) for e in enc])
            logits = model(ids, (ids != 0).long()).logits
            correct += int((logits.argmax(-1) == torch.tensor([ex.label for ex in chunk])).sum())
    assert abs(correct / len(dev) - metrics["he_friendly_accuracy"]) < 0.003


def cfg_max(model) -> int:
    return model.config.max_position


# ---- label names and the per-token head -----------------------------------------------------------

def test_label_map_round_trips_through_config_json(tmp_path):
    names = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    model = HEFriendlyBert(small_config(num_labels=6, id2label=dict(enumerate(names))))
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["id2label"] == {str(i): n for i, n in enumerate(names)}  # JSON keys are strings, as in HF
    assert raw["label2id"] == {n: i for i, n in enumerate(names)}
    again = HEFriendlyBert.from_pretrained(tmp_path).config
    assert again.id2label == dict(enumerate(names)) and again.labels == names and again == model.config


def test_label_maps_default_to_hf_names_and_must_agree():
    assert small_config(num_labels=3).labels == ["LABEL_0", "LABEL_1", "LABEL_2"]
    assert small_config(num_labels=2, label2id={"neg": 0, "pos": 1}).id2label == {0: "neg", 1: "pos"}
    with pytest.raises(ConfigError, match="disagree"):
        small_config(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 1, "pos": 0})
    with pytest.raises(ConfigError, match="every label id"):
        small_config(num_labels=3, id2label={0: "a", 1: "b"})
    with pytest.raises(ConfigError, match="repeats a name"):
        small_config(num_labels=2, id2label={0: "a", 1: "a"})


def test_shipped_sentiment_model_names_its_labels():
    cfg = HEConfig.load(SHIPPED)
    assert cfg.labels == ["negative", "positive"] and cfg.task == "text-classification"


def test_token_classification_head_gives_one_row_per_token(tmp_path):
    cfg = small_config(num_labels=5, task="token-classification")
    model = HEFriendlyBert(cfg).eval()
    ids = torch.randint(5, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(ids, mask)
    assert out.logits.shape == (3, 9, 5)
    # no pooling: a token's logits depend on the others only through attention, so a padded row matches
    # the same sentence alone on its valid tokens
    alone = model(ids[1:2, :6], torch.ones(1, 6, dtype=torch.long)).logits
    torch.testing.assert_close(out.logits[1, :6], alone[0], atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    assert HEFriendlyBert.from_pretrained(tmp_path).config.task == "token-classification"
    with pytest.raises(ConfigError, match="no pooler"):
        small_config(task="token-classification", pooler="tanh")
