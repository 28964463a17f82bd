"""The statistics of the privacy audit: the one-run epsilon lower bound and LiRA's membership scores.

Pure numpy/scipy, no training: dp_training/audit.py trains the models and calls these.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

# Fractions of the m canaries the one-run audit guesses on (half "in" from the top scores, half "out" from
# the bottom); the rest abstain. Fixed in advance, and the audit's confidence is split over them (Bonferroni).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)


def steinke_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (eps, delta)-DP algorithm: Steinke, Nasr & Jagielski 2023.

    "Privacy Auditing with One (1) Training Run", NeurIPS 2023 (arXiv:2305.08846), main theorem
    (Theorem 3.1): m canaries, each included independently with probability 1/2, an auditor who guesses
    on r of them (abstaining on the rest) and gets W correct. If the training algorithm is
    (eps, delta)-DP then for every v

        P[W >= v] <= f(v) + 2 m delta * max_{i in 1..v} (f(v - i) - f(v)) / i,
        f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v],

    which is the p-value of observing v correct guesses under the null hypothesis "(eps, delta)-DP"
    (the paper's Algorithm for the p-value in its appendix computes exactly this sum).
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m} r={r} v={v}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v] = cdf(v - 1) - cdf(v - i - 1)
    window = stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)
    alpha = float(np.max(window / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def eps_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """The largest eps whose null hypothesis "(eps, delta)-DP" is rejected at level alpha (0 if none).

    The p-value grows with eps (a less private algorithm makes many correct guesses more likely), so the
    rejected eps form an interval [0, eps*); eps* is found by bisection.
    """
    if r == 0 or steinke_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while steinke_p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if steinke_p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(scores: np.ndarray, included: np.ndarray, k_in: int, k_out: int) -> tuple[int, int]:
    """(guesses r, correct v): the k_in highest scores guessed in, the k_out lowest guessed out."""
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_in], order[len(order) - k_out :] if k_out else order[:0]
    return k_in + k_out, int(included[top].sum() + (~included[bottom]).sum())


def one_run_bound(
    scores: dict[str, np.ndarray],
    included: np.ndarray,
    delta: float,
    alpha: float = 0.05,
    fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> dict:
    """The one-run audit's lower bound, best over a pre-declared family of (score, guess count) choices.

    Each choice is a test at level alpha / (number of choices) (Bonferroni), so the reported maximum is a
    valid (1 - alpha)-confidence lower bound on epsilon even though the best choice is picked afterwards.
    """
    m = len(included)
    included = included.astype(bool)
    family = len(scores) * len(fractions)
    level = alpha / family
    tried = []
    for name, s in scores.items():
        for f in fractions:
            r = max(2, int(round(f * m)))
            r_, v = guess_counts(np.asarray(s, dtype=np.float64), included, r // 2, r - r // 2)
            tried.append(
                {"score": name, "guesses": r_, "correct": v, "eps_lower_bound": eps_lower_bound(m, r_, v, delta, level)}
            )
    best = max(tried, key=lambda t: t["eps_lower_bound"])
    return {
        "eps_lower_bound": best["eps_lower_bound"],
        "best": best,
        "tried": tried,
        "canaries": m,
        "included": int(included.sum()),
        "delta": delta,
        "confidence": 1 - alpha,
        "bonferroni_family": family,
        "max_possible": eps_lower_bound(m, m, m, delta, level),
    }


# --- LiRA (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022) ---


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j: LiRA's per-example statistic."""
    z = np.nan_to_num(logits.astype(np.float64), nan=0.0, posinf=1e6, neginf=-1e6)
    rows = np.arange(len(labels))
    zy = z[rows, labels]
    others = z.copy()
    others[rows, labels] = -np.inf
    top = others.max(-1)
    return zy - (top + np.log(np.exp(others - top[:, None]).sum(-1)))


def lira_online(phi: np.ndarray, inclusion: np.ndarray, target: int) -> np.ndarray:
    """Online LiRA scores of every record against model `target`, the other models as shadows.

    phi, inclusion: (models, records). Per record, Gaussians fitted to phi over the shadows that trained
    on it (in) and those that did not (out); with few shadows per record the variances are global
    (pooled over records), as the paper recommends for small shadow counts. Score = log N(phi_target;
    in) - log N(phi_target; out): higher means "member".
    """
    shadows = np.delete(np.arange(len(phi)), target)
    p, inc = phi[shadows], inclusion[shadows].astype(bool)
    n_in, n_out = inc.sum(0), (~inc).sum(0)
    mu_in = np.where(n_in > 0, (p * inc).sum(0) / np.maximum(n_in, 1), np.nan)
    mu_out = np.where(n_out > 0, (p * ~inc).sum(0) / np.maximum(n_out, 1), np.nan)
    mu_in = np.where(np.isnan(mu_in), np.nanmean(mu_in), mu_in)
    mu_out = np.where(np.isnan(mu_out), np.nanmean(mu_out), mu_out)
    var_in = max(float(((p - mu_in) ** 2 * inc).sum() / max(inc.sum() - 1, 1)), 1e-6)
    var_out = max(float(((p - mu_out) ** 2 * ~inc).sum() / max((~inc).sum() - 1, 1)), 1e-6)
    x = phi[target]
    return stats.norm.logpdf(x, mu_in, math.sqrt(var_in)) - stats.norm.logpdf(x, mu_out, math.sqrt(var_out))


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial confidence interval for k successes out of n."""
    if n == 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> dict:
    """TPR at the largest threshold whose false-positive rate is at most `fpr`, with a 95% CI on the TPR.

    The interval is Clopper-Pearson over the members for that (empirically chosen) threshold; the
    achieved FPR and its own interval are reported beside it.
    """
    members = members.astype(bool)
    neg = np.sort(scores[~members])[::-1]
    allowed = int(math.floor(fpr * len(neg)))  # false positives we may have
    threshold = neg[allowed] if allowed < len(neg) else -np.inf  # strictly above this score -> "member"
    tp, fp = int((scores[members] > threshold).sum()), int((neg > threshold).sum())
    n_pos, n_neg = int(members.sum()), len(neg)
    return {
        "tpr": tp / max(n_pos, 1),
        "tpr_ci95": clopper_pearson(tp, n_pos),
        "fpr": fp / max(n_neg, 1),
        "fpr_ci95": clopper_pearson(fp, n_neg),
        "true_positives": tp,
        "members": n_pos,
        "false_positives": fp,
        "non_members": n_neg,
    }


def lira_evaluate(phi: np.ndarray, inclusion: np.ndarray) -> dict:
    """Every model in turn is the target (the others its shadows); decisions pooled over targets."""
    from sklearn.metrics import roc_auc_score, roc_curve

    scores = np.concatenate([lira_online(phi, inclusion, t) for t in range(len(phi))])
    members = inclusion.astype(bool).reshape(-1)
    fpr, tpr, _ = roc_curve(members, scores)
    grid = np.logspace(-4, 0, 49)
    return {
        "auc": float(roc_auc_score(members, scores)),
        "roc": {"fpr": grid.tolist(), "tpr": np.interp(grid, fpr, tpr).tolist()},
        "at_0_1pct_fpr": tpr_at_fpr(scores, members, 0.001),
        "at_1pct_fpr": tpr_at_fpr(scores, members, 0.01),
        "targets": len(phi),
        "shadows_per_target": len(phi) - 1,
        "decisions": len(scores),
    }
