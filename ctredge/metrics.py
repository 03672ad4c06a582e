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
    """
    y, r = _check(labels, reference)
    _, c = _check(labels, candidate)
    delta = auc(y, c) - auc(y, r)
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    n = y.size
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        deltas[i] = auc(y[idx], c[idx]) - auc(y[idx], r[idx])
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(deltas, [alpha, 1 - alpha])
    return PairedDelta(float(delta), float(lo), float(hi), resamples)
