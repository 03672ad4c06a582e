"""Exact CTR metrics: AUC, logloss, calibration, normalized entropy, paired bootstrap.

Training, compression and the benchmarks all call these, so a figure means the
same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ctredge.errors import DataError

_EPS = 1e-7


def _check(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(preds, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise DataError(f"labels and predictions differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise DataError("no rows to evaluate")
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError("labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise DataError(f"{int((~np.isfinite(p)).sum())} prediction(s) are NaN or infinite")
    return y, p


def auc(labels: np.ndarray, preds: np.ndarray) -> float:
    """Exact ROC AUC by ranks (Mann-Whitney U), tied scores get their average rank.

    Takes 0/1 labels and scores of the same length.  Returns the probability that a
    random positive scores above a random negative (ties count one half); NaN when
    only one class is present.

    Raises:
        DataError: lengths differ, labels not 0/1, non-finite scores, or no rows.
    """
    y, p = _check(labels, preds)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    # average ranks of tie groups (1-based)
    boundaries = np.flatnonzero(np.diff(sp)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [sp.size]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks_sorted = np.repeat(avg, ends - starts)
    rank_sum_pos = float(ranks_sorted[y[order] == 1].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log), predictions clipped to [1e-7, 1-1e-7]."""
    y, p = _check(labels, preds)
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibration(labels: np.ndarray, preds: np.ndarray) -> float:
    """Mean predicted click rate divided by the observed click rate (1.0 = calibrated)."""
    y, p = _check(labels, preds)
    observed = y.mean()
    return float(p.mean() / observed) if observed > 0 else float("nan")


def normalized_entropy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Logloss divided by the entropy of the observed click rate (He et al., 2014)."""
    y, p = _check(labels, preds)
    r = float(np.clip(y.mean(), _EPS, 1 - _EPS))
    base = -(r * np.log(r) + (1 - r) * np.log(1 - r))
    return logloss(y, p) / base


def summary(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """AUC, logloss, calibration, normalized entropy, click rates and row count."""
    y, p = _check(labels, preds)
    return {
        "auc": auc(y, p),
        "logloss": logloss(y, p),
        "calibration": calibration(y, p),
        "normalized_entropy": normalized_entropy(y, p),
        "click_rate": float(y.mean()),
        "mean_prediction": float(p.mean()),
        "rows": int(y.size),
    }


@dataclass(frozen=True)
class PairedDelta:
    """``candidate - reference`` of a metric with a paired bootstrap interval."""

    delta: float
    low: float
    high: float
    resamples: int


def _sorted_groups(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, tie-group id of each sorted row)`` of scores ``p``: one sort, reused by every resample."""
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    group = np.concatenate([[0], np.cumsum(np.diff(sp) != 0)])
    return order, group


def _weighted_auc(y_sorted: np.ndarray, w_sorted: np.ndarray, group: np.ndarray) -> float:
    """AUC of rows in score order with integer weights (multiplicities); ties count one half.

    Equal to :func:`auc` of the multiset where each row appears ``w`` times.
    """
    n_groups = int(group[-1]) + 1
    pos = np.bincount(group, weights=w_sorted * y_sorted, minlength=n_groups)
    neg = np.bincount(group, weights=w_sorted * (1.0 - y_sorted), minlength=n_groups)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def paired_bootstrap_auc_delta(
    labels: np.ndarray,
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDelta:
    """AUC(candidate) - AUC(reference) on the same rows, with a paired bootstrap CI.

    Each resample draws rows with replacement and scores both models on the same
    draw, so the interval reflects the difference, not each model's own noise.
    A resample is the multiset of ``rng.integers(0, n, n)``; its AUC is computed
    from each model's one sort with the rows' multiplicities as weights (O(n) per
    resample instead of a sort), the same figure as sorting the drawn rows.
    """
    y, r = _check(labels, reference)
    _, c = _check(labels, candidate)
    delta = auc(y, c) - auc(y, r)
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    n = y.size
    order_r, group_r = _sorted_groups(y, r)
    order_c, group_c = _sorted_groups(y, c)
    y_r, y_c = y[order_r], y[order_c]
    for i in range(resamples):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        deltas[i] = _weighted_auc(y_c, w[order_c], group_c) - _weighted_auc(y_r, w[order_r], group_r)
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(deltas, [alpha, 1 - alpha])
    return PairedDelta(float(delta), float(lo), float(hi), resamples)


#: the budget verdicts, in order of confidence
VERDICTS = ("met", "not resolved", "missed")
#: a point loss this many budgets large is "missed" even when the interval is too wide to exclude the budget
MISSED_POINT_FACTOR = 4.0


def budget_verdict(delta: float, low: float, high: float, budget: float,
                   missed_point_factor: float = MISSED_POINT_FACTOR) -> str:
    """Whether a paired dAUC interval resolves a loss budget: ``"met"``, ``"missed"`` or ``"not resolved"``.

    Takes the point dAUC (candidate - reference), its interval and the budget
    (the largest AUC loss allowed, >= 0).  ``"met"``: the interval's lower bound
    is >= -budget (the loss is within budget at the interval's confidence).
    ``"missed"``: the upper bound is < -budget (the loss exceeds the budget at
    that confidence), or the point loss exceeds ``missed_point_factor`` budgets
    (a loss that large is not called unresolved only because the rows are few).
    Otherwise ``"not resolved"``: the rows are too few to tell.
    """
    if not all(np.isfinite([delta, low, high])):
        return "not resolved"
    if low >= -budget:
        return "met"
    if high < -budget or -delta > missed_point_factor * budget:
        return "missed"
    return "not resolved"
