"""Exact metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from ctredge import metrics as M
from ctredge.errors import DataError


def brute_auc(y, p):
    pos = [s for s, t in zip(p, y) if t == 1]
    neg = [s for s, t in zip(p, y) if t == 0]
    score = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return score / (len(pos) * len(neg))


def test_auc_hand_cases():
    assert M.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    # ties: one positive tied with one negative counts 1/2 -> (1 + 0.5) / 2
    assert M.auc([0, 1, 0, 1], [0.2, 0.2, 0.1, 0.9]) == 0.875
    assert M.auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(M.auc([1, 1], [0.2, 0.3]))


def test_auc_matches_brute_force_with_many_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = rng.integers(0, 10, 300) / 10  # heavy ties
    assert M.auc(y, p) == pytest.approx(brute_auc(y, p), abs=1e-12)


def test_logloss_calibration_ne():
    assert M.logloss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert M.logloss([1], [1.0]) == pytest.approx(-math.log(1 - 1e-7), abs=1e-9)
    assert M.calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)
    # predicting the base rate gives normalized entropy 1
    assert M.normalized_entropy([1, 0, 0, 0], [0.25] * 4) == pytest.approx(1.0)


def test_errors():
    with pytest.raises(DataError, match="length"):
        M.auc([0, 1], [0.1])
    with pytest.raises(DataError, match="0 or 1"):
        M.auc([0, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="NaN"):
        M.logloss([0, 1], [0.1, float("nan")])


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    ref = y * 0.3 + rng.random(2000)
    same = M.paired_bootstrap_auc_delta(y, ref, ref, resamples=50)
    assert same.delta == 0 and same.low == 0 and same.high == 0
    worse = M.paired_bootstrap_auc_delta(y, ref, ref + rng.random(2000), resamples=50)
    assert worse.delta < 0 and worse.low <= worse.delta <= worse.high < 0


def _naive_bootstrap(y, ref, cand, resamples, seed, confidence=0.95):
    """The paired bootstrap as first written: sort each drawn resample."""
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(resamples):
        idx = rng.integers(0, y.size, y.size)
        deltas.append(M.auc(y[idx], cand[idx]) - M.auc(y[idx], ref[idx]))
    a = (1 - confidence) / 2
    return np.nanquantile(deltas, [a, 1 - a])


def test_paired_bootstrap_by_weights_equals_sorting_each_resample():
    rng = np.random.default_rng(4)
    y = (rng.random(1500) < 0.2).astype(int)
    ref = np.round(y * 0.3 + rng.random(1500), 2)  # ties
    cand = np.round(ref + rng.normal(0, 0.1, 1500), 2)
    fast = M.paired_bootstrap_auc_delta(y, ref, cand, resamples=30, seed=7)
    lo, hi = _naive_bootstrap(y.astype(float), ref, cand, 30, 7)
    assert fast.low == pytest.approx(lo, abs=1e-12) and fast.high == pytest.approx(hi, abs=1e-12)


@pytest.mark.parametrize("delta, low, high, budget, expected", [
    (0.0, -0.0004, 0.0004, 0.0005, "met"),           # the whole interval within budget
    (-0.0003, -0.0005, -0.0001, 0.0005, "met"),      # lower bound exactly at -budget
    (0.001, -0.003, 0.004, 0.0005, "not resolved"),  # 20k rows: +-0.0035 around a gain
    (-0.0008, -0.004, 0.002, 0.0005, "not resolved"),
    (-0.003, -0.004, -0.0006, 0.0005, "missed"),     # upper bound below -budget
    (-0.0059, -0.0149, 0.0029, 0.0005, "missed"),    # point loss over 4 budgets
    (-0.0019, -0.006, 0.002, 0.0005, "not resolved"),
    (0.0, 0.0, 0.0, 0.0, "met"),
    (-1e-4, -2e-4, 1e-4, 0.0, "missed"),             # budget 0: any point loss is over 4 x 0
    (float("nan"), float("nan"), float("nan"), 0.0005, "not resolved"),
])
def test_budget_verdict_on_constructed_intervals(delta, low, high, budget, expected):
    assert M.budget_verdict(delta, low, high, budget) == expected
    assert expected in M.VERDICTS
