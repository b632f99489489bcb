"""pipeline/stats.py: every statistic a stage reports, against closed forms,
scipy/sklearn references and simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from adaras.pipeline.stats import (
    auroc,
    expected_calibration_error,
    mcnemar_p,
    min_detectable_effect,
    paired_bootstrap,
    score_heads,
    wilson_ci,
    youden_threshold,
)


def test_wilson_interval_matches_the_pilot_table_and_the_closed_form():

    lo, hi = wilson_ci(13, 40)  # stage 0, candidate A: 0.325 [0.20, 0.48]
    assert round(lo, 2) == 0.20 and round(hi, 2) == 0.48
    k, n, z = 7, 40, 1.959963984540054
    ph = k / n
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    assert wilson_ci(k, n) == pytest.approx([centre - half, centre + half], abs=1e-9)
    assert wilson_ci(0, 0) == [0.0, 1.0]


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    base = np.array([True] * 50 + [False] * 50)
    other = base.copy()
    other[50:60] = True  # 10 fixed
    other[0:2] = False  # 2 broken
    assert mcnemar_p(base, other) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_p(base, other) == pytest.approx(binomtest(10, 12, 0.5).pvalue)
    assert mcnemar_p(base, base.copy()) == 1.0
    assert mcnemar_p(other, base) == mcnemar_p(base, other)  # two-sided


def test_the_minimum_detectable_effect_has_80_percent_power():
    rng = np.random.default_rng(0)
    n, discordant = 240, 0.15
    mde = min_detectable_effect(n, discordant)
    assert 0 < mde < discordant
    assert min_detectable_effect(4 * n, discordant) == pytest.approx(mde / 2, rel=0.15)
    assert min_detectable_effect(n, 0.0) is None
    # simulate McNemar at that effect: fixed/broken among discordant problems
    p_fixed = (discordant + mde) / 2 / discordant
    hits = 0
    trials = 1500
    for _ in range(trials):
        d = rng.binomial(n, discordant)
        fixed = rng.binomial(d, p_fixed)
        hits += d > 0 and binomtest(fixed, d, 0.5).pvalue < 0.05
    assert 0.72 < hits / trials < 0.88  # the normal approximation, checked by simulation


def test_expected_calibration_error():
    rng = np.random.default_rng(0)
    p = np.full(1000, 0.7)
    y = (np.arange(1000) < 500).astype(float)  # 50% observed where 70% was predicted
    assert expected_calibration_error(y, p)["ece"] == pytest.approx(0.2)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(float)  # calibrated by construction
    assert expected_calibration_error(y, p)["ece"] < 0.02
    bins = expected_calibration_error(y, p)["bins"]
    assert sum(b[2] for b in bins) == 20000


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.5
    same = paired_bootstrap(base, base.copy(), 2000)
    assert same == [0.0, 0.0]
    better = base | (rng.random(400) < 0.3)  # strictly fixes some problems
    lo, hi = paired_bootstrap(base, better, 2000)
    true = better.mean() - base.mean()
    assert 0 < lo < true < hi


def test_youden_threshold_separates_separable_scores():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    t = youden_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert youden_threshold(np.zeros(4, int), p[:4]) == 0.5


def test_score_heads_gives_each_head_its_own_numbers_on_shared_resamples():
    """A head's AUROC, ECE and their CIs are the plain statistics, inside their
    intervals, and do not depend on which head is scored beside it (the same
    resamples); each head after the first carries the first's paired AUROC gain
    over it, whose CI is zero for a head against itself."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    wrong = rng.random(300) < 0.5
    good = np.clip(0.5 + 0.3 * np.where(wrong, 1, -1) + rng.normal(0, 0.2, 300), 0.01, 0.99)
    weak = np.clip(0.5 + 0.05 * np.where(wrong, 1, -1) + rng.normal(0, 0.2, 300), 0.01, 0.99)
    both = score_heads(wrong, {"good": good, "weak": weak}, seed=3, n=300)
    alone = score_heads(wrong, {"good": good}, seed=3, n=300)
    assert both["good"] == alone["good"]
    assert both["good"]["auroc"] == pytest.approx(roc_auc_score(wrong, good))
    assert both["good"]["calibration"] == expected_calibration_error(wrong.astype(float), good)
    for h in ("good", "weak"):
        lo, hi = both[h]["auroc_ci95"]
        assert lo <= both[h]["auroc"] <= hi
    assert both["weak"]["gain"] == pytest.approx(both["good"]["auroc"] - both["weak"]["auroc"])
    assert 0 < both["weak"]["gain_ci95"][0] <= both["weak"]["gain"]  # clearly the better head
    assert "gain" not in both["good"] and "gain" not in alone["good"]
    same = score_heads(wrong, {"a": good, "b": good}, seed=3, n=100)
    assert same["b"]["gain"] == 0 and same["b"]["gain_ci95"] == [0.0, 0.0]
    # a third head changes neither the others' numbers nor their gains
    three = score_heads(wrong, {"good": good, "weak": weak, "a": good}, seed=3, n=300)
    assert three["good"] == both["good"] and three["weak"] == both["weak"]
    assert three["a"]["gain_ci95"] == [0.0, 0.0]
    # one class: calibration and its CI, no AUROC; no answers: calibration only
    one = score_heads(np.ones(20, bool), {"h": good[:20]}, seed=0, n=50)["h"]
    assert "auroc" not in one and "ece_ci95" in one and auroc(np.ones(20), good[:20]) is None
    assert set(score_heads(np.zeros(0, bool), {"h": np.zeros(0)}, seed=0)["h"]) == {"calibration"}


def test_a_score_head_is_ranked_not_calibrated():
    """A ranking that is not a probability (an answer's length in tokens) gets
    AUROC and its CI, no ECE; the probability head beside it keeps exactly its
    own numbers, and the paired gain compares the two on the same resamples."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    wrong = rng.random(300) < 0.5
    p = np.clip(0.5 + 0.3 * np.where(wrong, 1, -1) + rng.normal(0, 0.2, 300), 0.01, 0.99)
    tokens = rng.integers(100, 1300, 300) + 200 * wrong  # longer when wrong, weakly
    got = score_heads(wrong, {"head": p, "length": tokens}, seed=5, n=300, scores=("length",))
    assert set(got["length"]) == {"auroc", "auroc_ci95", "gain", "gain_ci95"}
    assert got["length"]["auroc"] == pytest.approx(roc_auc_score(wrong, tokens))
    lo, hi = got["length"]["auroc_ci95"]
    assert 0.5 < lo <= got["length"]["auroc"] <= hi
    assert got["head"] == score_heads(wrong, {"head": p}, seed=5, n=300)["head"]
    assert got["length"]["gain_ci95"][0] > 0
    # read as a probability, the same tokens would get a meaningless ECE
    assert "calibration" in score_heads(wrong, {"length": tokens}, seed=5, n=20)["length"]
