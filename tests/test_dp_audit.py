"""The privacy audit: Steinke et al.'s one-run bound on known cases, LiRA's statistics, a tiny real audit."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

pytest.importorskip("opacus")
pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing", "ignore:Secure RNG turned off", "ignore:Optimal order is the largest alpha"
)

from dp_training.auditing import (  # noqa: E402
    clopper_pearson,
    eps_lower_bound,
    lira_evaluate,
    one_run_bound,
    steinke_p_value,
    tpr_at_fpr,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("m", [100, 1000])
def test_all_correct_guesses_give_the_papers_maximum(m):
    # delta = 0: P[Binomial(m, q) >= m] = q^m < 0.05  <=>  eps < logit(0.05^(1/m))
    assert eps_lower_bound(m, m, m, 0.0) == pytest.approx(logit(0.05 ** (1 / m)), abs=1e-6)
    # the delta term of Theorem 3.1 only lowers it, and by little at delta = 1e-5
    with_delta = eps_lower_bound(m, m, m, 1e-5)
    assert logit(0.05 ** (1 / m)) - 0.1 < with_delta < logit(0.05 ** (1 / m))


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    from scipy import stats

    m, r, v, eps, delta = 1000, 100, 80, 1.0, 1e-5
    q = math.exp(eps) / (1 + math.exp(eps))
    f = lambda x: stats.binom.sf(x - 1, r, q)  # noqa: E731  P[Binomial(r, q) >= x]
    expected = f(v) + 2 * m * delta * max((f(v - i) - f(v)) / i for i in range(1, v + 1))
    assert steinke_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    assert steinke_p_value(m, r, v, eps, 0.0) == pytest.approx(f(v), rel=1e-9)


def test_more_correct_guesses_give_a_higher_bound():
    bounds = [eps_lower_bound(1000, 200, v, 1e-5) for v in (100, 130, 160, 190, 200)]
    assert bounds[0] == 0.0
    assert all(a < b for a, b in zip(bounds[1:], bounds[2:], strict=False))


def test_random_guesses_give_about_zero():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        included = rng.random(1000) < 0.5
        bounds.append(one_run_bound({"noise": rng.normal(size=1000)}, included, 1e-5)["eps_lower_bound"])
    assert np.mean(bounds) < 0.05 and max(bounds) < 0.5


def test_bound_is_valid_for_randomised_response():
    """An eps-DP auditor's guesses (randomised response) exceed eps in at most ~5% of trials."""
    rng = np.random.default_rng(1)
    eps, m = 1.0, 1000
    q = math.exp(eps) / (1 + math.exp(eps))
    above = 0
    for _ in range(200):
        v = int(rng.binomial(m, q))
        above += eps_lower_bound(m, m, v, 0.0) > eps
    assert above <= 20  # 5% of 200 is 10; a generous margin for the simulation's own noise


def test_separable_scores_give_a_large_bound():
    rng = np.random.default_rng(2)
    included = rng.random(1000) < 0.5
    result = one_run_bound({"perfect": included + 0.01 * rng.normal(size=1000)}, included, 1e-5)
    assert result["eps_lower_bound"] > 4.0
    assert result["eps_lower_bound"] <= result["max_possible"] + 1e-9


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(0.812914, abs=1e-5)


def test_tpr_at_fpr_counts_and_interval():
    scores = np.r_[np.arange(100, 200), np.arange(0, 1000)].astype(float)
    members = np.r_[np.ones(100), np.zeros(1000)].astype(bool)
    # 1% of the 1,000 non-members may score above the threshold: 999..990 -> threshold 989
    out = tpr_at_fpr(scores, members, 0.01)
    assert out["false_positives"] <= 10 and out["fpr"] <= 0.01
    assert out["tpr"] == 0.0  # members score 100..199, all below the threshold
    assert out["tpr_ci95"][0] == 0.0


def test_lira_separates_a_leaky_model_and_not_a_blind_one():
    rng = np.random.default_rng(3)
    models, records = 16, 400
    inclusion = rng.random((models, records)) < 0.5
    difficulty = rng.normal(0, 2, size=records)  # per-record offsets: what the shadows calibrate away
    leaky = difficulty + 1.5 * inclusion + rng.normal(0, 0.3, size=(models, records))
    blind = difficulty + rng.normal(0, 0.3, size=(models, records))
    strong, chance = lira_evaluate(leaky, inclusion), lira_evaluate(blind, inclusion)
    assert strong["auc"] > 0.9 and strong["at_1pct_fpr"]["tpr"] > 0.3
    assert abs(chance["auc"] - 0.5) < 0.05 and chance["at_1pct_fpr"]["tpr"] < 0.05


# --- a tiny real audit: real Opacus training, the bound computed and checked against its epsilon ---


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from cipherbert.data import load_sms_spam
    from tests.support.dp_fixtures import make_random_base

    examples = load_sms_spam()
    rng = random.Random(0)
    rows = rng.sample([e for e in examples if e.label == 1], 30) + rng.sample([e for e in examples if e.label == 0], 90)
    root = tmp_path_factory.mktemp("audit")
    base = make_random_base(
        root / "base",
        texts=[e.text for e in examples[:600]],
        vocab_size=300,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        max_position=48,
        num_layers=2,
    )
    data = root / "sms.csv"
    import csv

    with open(data, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows([e.text, e.label] for e in rows)
    return base, data, root


def test_tiny_audit_bound_is_below_epsilon(tiny_setup):
    from dp_training.audit import main

    base, data, root = tiny_setup
    results = root / "dp_audit.json"
    rc = main(
        [
            "--base",
            str(base),
            "--data",
            str(data),
            "--epsilons",
            "1",
            "--no-nodp",
            "--models",
            "3",
            "--canaries",
            "60",
            "--gradient-canaries",
            "60",
            "--canary-length",
            "8",
            "--natural",
            "20",
            "--epochs",
            "2",
            "--max-length",
            "24",
            "--work-dir",
            str(root / "work"),
            "--results",
            str(results),
            "--plot",
            str(root / "audit.png"),
        ]
    )
    assert rc == 0
    out = json.loads(results.read_text())
    (run,) = out["runs"]
    assert run["epsilon"] == 1.0 and run["canaries"] == 60 and run["models"] == 3
    assert 0 < run["epsilon_spent_max"] <= 1.0 + 1e-6
    # the bound was computed over real guesses and is a valid lower bound: never above epsilon
    for audit in ("input_canaries", "gradient_canaries"):
        assert run["one_run"][audit]["tried"] and run["one_run"][audit]["max_possible"] > 1.0
        assert 0.0 <= run["one_run"][audit]["eps_lower_bound"] <= run["epsilon"]
    assert 0.0 <= run["eps_lower_bound"] <= run["epsilon"]
    assert all(b <= run["epsilon"] for b in run["eps_lower_bound_every_target"])
    assert run["bound_within_epsilon"] is True
    for key in ("lira_tpr_at_0_1pct_fpr", "lira_tpr_at_1pct_fpr", "auc"):
        assert 0.0 <= run[key] <= 1.0
    assert out["delta"] > 0 and (root / "audit.png").stat().st_size > 0


@pytest.mark.slow
def test_audit_has_teeth_on_the_real_recipe(tmp_path):
    """The real base and SMS data, the product recipe: the non-DP run must show epsilon >= 1, epsilon 8 at most 8.

    A reduced version of `python -m dp_training.audit` (4 models per setting instead of 16, no epsilon 1/3):
    the numbers in README/docs come from the full run.
    """
    from cipherbert.launch import REPO
    from dp_training.audit import main

    base = REPO / "models" / "he-bert-tiny-rt"
    if not (base / "config.json").exists():
        pytest.skip("no distilled base model in models/")
    results = tmp_path / "dp_audit.json"
    assert (
        main(
            [
                "--base",
                str(base),
                "--epsilons",
                "8",
                "--models",
                "4",
                "--work-dir",
                str(tmp_path / "work"),
                "--results",
                str(results),
                "--plot",
                "",
            ]
        )
        == 0
    )
    runs = {r["epsilon"]: r for r in json.loads(results.read_text())["runs"]}
    assert runs[None]["eps_lower_bound"] >= 1.0
    assert runs[8.0]["eps_lower_bound"] <= 8.0 and runs[8.0]["bound_within_epsilon"]
