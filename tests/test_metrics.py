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
