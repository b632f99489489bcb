"""The study's statistics, one owner for every number a stage reports:
paired comparisons of correctness (bootstrap CI, exact McNemar, minimum
detectable effect), proportions (Wilson), and how well a failure predictor's
p_fail scores answers (AUROC, ECE, Youden's cut, bootstrap CIs over answers).

Conventions: `base` / `other` are bool arrays of correctness per problem, in
the same problem order; `wrong` / `y` mark failures (1 = the answer is wrong),
`p` the predicted failure probability of each.
"""

from __future__ import annotations

import numpy as np

# Resamples for an AUROC's or ECE's bootstrap CI: one sklearn call per resample per
# head makes these the slow intervals, so they take at most this many (--bootstrap
# sets fewer); at the default, the old fixed count.
MAX_SCORE_RESAMPLES = 2000


def paired_bootstrap(base: np.ndarray, other: np.ndarray, n: int, seed: int = 0) -> list[float]:
    """95% CI of mean(other - base) resampling problems (paired)."""
    rng = np.random.default_rng(seed)
    diff = other.astype(float) - base.astype(float)
    idx = rng.integers(0, diff.size, size=(n, diff.size))
    means = diff[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def wilson_ci(k: int, n: int) -> list[float]:
    """Wilson score 95% interval of a proportion k/n ([0, 1] when n is 0)."""
    from scipy.stats import binomtest

    if n == 0:
        return [0.0, 1.0]
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def mcnemar_p(base: np.ndarray, other: np.ndarray) -> float:
    """Exact two-sided McNemar p-value of paired correctness: a binomial test
    of the fixed count among the discordant problems (1.0 when none differ)."""
    from scipy.stats import binomtest

    fixed, broken = int((other & ~base).sum()), int((~other & base).sum())
    return float(binomtest(fixed, fixed + broken, 0.5).pvalue) if fixed + broken else 1.0


def min_detectable_effect(n: int, discordant: float, power: float = 0.8,
                          level: float = 0.05) -> float | None:
    """Smallest accuracy change |fixed - broken| / n that a two-sided McNemar
    test at `level` detects with `power` on n paired problems when a fraction
    `discordant` of them differ (Connor 1987's normal approximation, solved
    for the effect). None when nothing is discordant."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    if n < 1 or discordant <= 0:
        return None
    za = norm.ppf(1 - level / 2)

    def achieved(d: float) -> float:  # power at effect d minus the target
        return norm.cdf((d * np.sqrt(n) - za * np.sqrt(discordant))
                        / np.sqrt(max(discordant - d * d, 1e-12))) - power

    hi = discordant * (1 - 1e-9)
    if achieved(hi) < 0:
        return None
    return float(brentq(achieved, 1e-9, hi))


def auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUROC of p against y; None unless y holds both classes."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if np.unique(y).size == 2 else None


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The p_fail cut that maximises TPR - FPR on (y, p); 0.5 when y has one class."""
    from sklearn.metrics import roc_curve

    if np.unique(y).size < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thr[best], 0.0, 1.0))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict:
    """ECE of probabilities p for binary outcomes y over equal-width bins, and
    the per-bin (mean p, observed rate, count) for a reliability plot."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            conf, rate = float(p[m].mean()), float(y[m].mean())
            ece += m.mean() * abs(conf - rate)
            table.append([conf, rate, int(m.sum())])
    return {"ece": float(ece), "bins": table}


def score_heads(wrong: np.ndarray, heads: dict[str, np.ndarray], seed: int,
                n: int = MAX_SCORE_RESAMPLES, scores: tuple[str, ...] = ()) -> dict:
    """For each head's p_fail of the same answers: `calibration` (ECE and its
    bins), `ece_ci95`, and, when `wrong` holds both classes, `auroc` and
    `auroc_ci95`; each CI a percentile bootstrap over answers (n resamples;
    those with one class are skipped for AUROC). Every head after the first
    also gets the first head's AUROC gain over it, `gain` (the first's AUROC
    minus its own) and `gain_ci95` (on the same resamples: paired). Every head
    sees the same resamples for a given seed, so a head's numbers do not
    depend on which heads score beside it.
    Resampling adds noise, which only raises ECE, so the ECE interval sits
    high: for a well-calibrated head the point estimate lies near its lower
    end or below it. Heads named in `scores` are rankings, not probabilities
    (an answer's length, say): they get AUROC only, no calibration."""
    y = np.asarray(wrong).astype(int)
    out = {h: {} if h in scores else
           {"calibration": expected_calibration_error(y.astype(float), q)}
           for h, q in heads.items()}
    if not y.size:
        return out
    rng = np.random.default_rng(seed)
    first = next(iter(heads))
    draws = {h: {"auroc": [], "ece": [], "gain": []} for h in heads}
    for _ in range(n):
        i = rng.integers(0, y.size, y.size)
        aucs = {h: auroc(y[i], q[i]) for h, q in heads.items()}
        for h, q in heads.items():
            if h not in scores:
                draws[h]["ece"].append(
                    expected_calibration_error(y[i].astype(float), q[i])["ece"])
            if aucs[h] is not None:  # both classes drawn: every head has one
                draws[h]["auroc"].append(aucs[h])
                draws[h]["gain"].append(aucs[first] - aucs[h])

    def ci(values):
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    for h, q in heads.items():
        if h not in scores:
            out[h]["ece_ci95"] = ci(draws[h]["ece"])
        if (a := auroc(y, q)) is not None:
            out[h].update(auroc=a, auroc_ci95=ci(draws[h]["auroc"]))
            if h != first:
                out[h].update(gain=out[first]["auroc"] - a, gain_ci95=ci(draws[h]["gain"]))
    return out


def brier(wrong: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of the failure probability against the outcome."""
    return float(np.mean((np.asarray(p, dtype=float) - np.asarray(wrong, dtype=float)) ** 2))


def selective_accuracy(wrong: np.ndarray, score: np.ndarray,
                       coverages: tuple[float, ...] = (0.5, 0.7, 0.9)) -> dict[str, float | None]:
    """Accuracy of the answers a policy keeps when it answers only the fraction
    `c` with the lowest failure score (ties kept in order): {"0.5": acc, ...}."""
    wrong = np.asarray(wrong, dtype=bool)
    order = np.argsort(np.asarray(score, dtype=float), kind="stable")
    out = {}
    for c in coverages:
        k = int(round(c * wrong.size))
        out[f"{c:g}"] = float(1 - wrong[order[:k]].mean()) if k else None
    return out


def calibration_slope(wrong: np.ndarray, p: np.ndarray, seed: int = 0,
                      n: int = MAX_SCORE_RESAMPLES) -> dict:
    """The slope of a logistic regression of the outcome on logit(p): 1 for a
    calibrated head, below 1 when it is overconfident; with a bootstrap 95% CI
    over answers (None without both classes)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(wrong).astype(int)
    x = np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1)).reshape(-1, 1)

    def slope(i):
        if np.unique(y[i]).size < 2:
            return None
        return float(LogisticRegression(C=1e6, max_iter=10000).fit(x[i], y[i]).coef_[0, 0])

    point = slope(np.arange(y.size))
    if point is None:
        return {"slope": None, "slope_ci95": None}
    rng = np.random.default_rng(seed)
    draws = [s for _ in range(n) if (s := slope(rng.integers(0, y.size, y.size))) is not None]
    return {"slope": point,
            "slope_ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}
