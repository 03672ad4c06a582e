"""Fitting the wide part (:class:`ctredge.train.layers.WideLogit`) before the deep part trains.

The wide part is a hashed logistic regression inside the model: one weight per
categorical id, per hashed pair of ids, per dense quantile bucket and per match
feature.  :func:`fit_wide` fits it exactly as such (L2-regularised, L-BFGS,
scikit-learn) on the **training** rows, picks the L2 strength by the **valid**
logloss from :data:`C_GRID`, and writes the weights into the layer; the deep part
then trains on top of it (the wide weights are not trainable), learning what
the regression misses.  The design matrix is built from the layer's own
``columns`` (the very int64 rows the graph gathers) and the model's own match
features, so the regression and the served graph cannot disagree
(``tests/train/test_wide.py`` checks the logits match).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import numpy as np

from ctredge import metrics as M
from ctredge.errors import ConfigError
from ctredge.features import INPUT_CAT, INPUT_DENSE, FeatureSpec
from ctredge.reader import Batch, concat_batches

log = logging.getLogger("ctredge.train")

#: inverse L2 strengths tried (the one with the best valid logloss is kept)
C_GRID = (0.003, 0.01, 0.03)
#: at most this many training rows fit the wide part (the first ones)
MAX_ROWS = 2_000_000
#: L-BFGS iterations per strength
MAX_ITER = 300
#: a pair of fields is crossed when its screened step lowers the valid logloss by more than this (select_pairs)
SELECT_MIN_GAIN = 0.0
#: ``ctredge train`` screens the pairs only with at least this many valid rows; with fewer, the one-step gains are
#: noise and every pair is crossed.  On the 1,000 shared Criteo rows (100 valid rows per fold) the screen cost 0.012
#: mean AUC over 5 folds (0.7022 -> 0.6904, ``python -m ctredge.benchmarks.kfold ... [--all-pairs]``); on the demo
#: data (20,042 valid rows) it added 0.0039 on 200k held-out rows
SELECT_MIN_VALID_ROWS = 5_000
_CHUNK = 65_536


def wide_layer(model: Any) -> Any:
    """The model's WideLogit layer, or None."""
    from ctredge.train.models import WIDE_LOGIT

    names = {layer.name for layer in model.layers}
    return model.get_layer(WIDE_LOGIT) if WIDE_LOGIT in names else None


def _match_model(model: Any, layer: Any) -> Any:
    import keras

    return keras.Model(inputs=model.inputs, outputs=layer.input[-1]) if layer.n_match else None


def columns(layer: Any, batch: Batch) -> np.ndarray:
    """The int64 table rows the layer gathers for ``batch``: ``[B, n_cat + P + n_dense]`` (``WideLogit.columns``)."""
    import tensorflow as tf

    n = len(batch)
    cols = []
    for start in range(0, n, _CHUNK):
        cat = tf.constant(batch.feeds[INPUT_CAT][start:start + _CHUNK])
        dense = tf.constant(batch.feeds[INPUT_DENSE][start:start + _CHUNK]) if layer.n_dense else None
        cols.append(layer.columns(cat, dense).numpy())
    return np.concatenate(cols) if cols else np.zeros((0, 1), np.int64)


def design(model: Any, batch: Batch, cols: np.ndarray | None = None) -> Any:
    """The wide part's design matrix for ``batch``: scipy CSR ``[B, n_rows + n_match]`` (one-hot rows, match values).

    ``cols``: the table rows to use instead of the layer's own (a subset of its columns).
    """
    import scipy.sparse as sp

    from ctredge.train.loop import keras_predict

    layer = wide_layer(model)
    n = len(batch)
    cols = columns(layer, batch) if cols is None else cols
    width = cols.shape[1]
    onehot = sp.csr_matrix((np.ones(n * width, np.float32), cols.reshape(-1),
                            np.arange(0, n * width + 1, width, dtype=np.int64)), shape=(n, layer.n_rows))
    sub = _match_model(model, layer)
    if sub is None:
        return onehot
    matches = keras_predict(sub, batch.feeds).astype(np.float32).reshape(n, layer.n_match)
    return sp.hstack([onehot, sp.csr_matrix(matches)], format="csr")


def _first_rows(rows: Any, spec: FeatureSpec, limit: int) -> Batch:
    if isinstance(rows, Batch):
        return rows.take(np.arange(min(len(rows), limit))) if len(rows) > limit else rows
    parts: list[Batch] = []
    got = 0
    for b in rows.batches(spec, _CHUNK, False):
        parts.append(b)
        got += len(b)
        if got >= limit:
            break
    whole = concat_batches(parts, spec)
    return whole.take(np.arange(min(len(whole), limit))) if len(whole) > limit else whole


def _logistic_regression() -> Any:
    """scikit-learn's LogisticRegression class.

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as e:
        raise ConfigError("the wide part (ModelConfig.wide) is fitted with scikit-learn: pip install "
                          "'ctredge[train]' (scikit-learn), or train with wide off") from e
    return LogisticRegression


def _fit_lr(x_train: Any, y_train: np.ndarray, x_valid: Any, valid: Batch, grid: Iterable[float]) -> tuple:
    """L2 logistic regressions over ``grid`` (strongest first, warm-started); ``(best row, coef, intercept, table)``
    with the best by valid logloss."""
    lr = _logistic_regression()(solver="lbfgs", max_iter=MAX_ITER, warm_start=True)
    best, table = None, []
    for c in sorted(grid):
        lr.set_params(C=c)
        lr.fit(x_train, y_train)
        p = lr.predict_proba(x_valid)[:, 1]
        row = {"C": c, "valid_logloss": round(M.logloss(valid.labels, p), 6),
               "valid_auc": round(M.auc(valid.labels, p), 6), "iterations": int(lr.n_iter_[0])}
        table.append(row)
        if best is None or row["valid_logloss"] < best[0]["valid_logloss"]:
            best = (row, lr.coef_[0].copy(), float(lr.intercept_[0]))
    assert best is not None
    return (*best, table)


def _logloss_from_logits(y: np.ndarray, z: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def select_pairs(model: Any, spec: FeatureSpec, rows: Any, valid: Batch, *, max_rows: int = MAX_ROWS,
                 grid: Iterable[float] = C_GRID, min_gain: float = SELECT_MIN_GAIN) -> tuple[list[int], dict[str, Any]]:
    """Which of the wide part's pairs of fields to cross, screened one by one on the valid rows.

    A hashed cross of two fields that do not interact only adds noise: its
    buckets are shared with every other pair's, and one L2 strength must then
    both admit the real interactions and silence the rest.  The screen:

    1. fit the regression without crosses (ids, dense buckets, matches) on the
       training rows, the L2 strength ``C`` by valid logloss; its logits ``z``;
    2. for each pair, one Newton step of its bucket weights from 0 on the
       training rows, ``w_b = sum(y - p) / (sum p (1 - p) + 1 / C)`` over the rows in
       bucket ``b`` (the L2 regression's own step), and the valid logloss of
       ``z + w[bucket]``;
    3. keep the pairs that lower the valid logloss by more than ``min_gain``.

    Takes the built model (its ``WideLogit`` crossing every pair), the spec, the
    training rows, the valid rows.  Returns ``(indices into the layer's pairs,
    record for the manifest)``; the record's ``gains`` lists ``[pair, valid
    logloss gain]`` best first.  The test rows are never read.
    """
    from ctredge.vocab import quantile_edges

    layer = wide_layer(model)
    t0 = time.perf_counter()
    train = _first_rows(rows, spec, max_rows)
    if layer.n_dense:
        layer.edges.assign(quantile_edges(train.feeds[INPUT_DENSE], layer.n_edges))
    n_cat, n_pairs = len(layer.offsets), len(layer.pairs)
    cols_t, cols_v = columns(layer, train), columns(layer, valid)
    no_pairs = np.r_[0:n_cat, n_cat + n_pairs:cols_t.shape[1]]
    x_train, x_valid = design(model, train, cols_t[:, no_pairs]), design(model, valid, cols_v[:, no_pairs])
    used = np.unique(x_train.indices)
    x_train, x_valid = x_train[:, used], x_valid[:, used]
    row, coef, intercept, _ = _fit_lr(x_train, train.labels, x_valid, valid, grid)
    z_t = x_train @ coef + intercept
    z_v = x_valid @ coef + intercept
    y_t, y_v = train.labels.astype(np.float64), valid.labels.astype(np.float64)
    p_t = 1.0 / (1.0 + np.exp(-z_t))
    grad, hess, lam = y_t - p_t, p_t * (1.0 - p_t), 1.0 / row["C"]
    base = _logloss_from_logits(y_v, z_v)
    gains = []
    for k in range(n_pairs):
        seen, inv = np.unique(cols_t[:, n_cat + k], return_inverse=True)
        w = np.bincount(inv, weights=grad) / (np.bincount(inv, weights=hess) + lam)
        at = np.minimum(np.searchsorted(seen, cols_v[:, n_cat + k]), len(seen) - 1)
        step = np.where(seen[at] == cols_v[:, n_cat + k], w[at], 0.0)
        gains.append(base - _logloss_from_logits(y_v, z_v + step))
    chosen = [k for k in range(n_pairs) if gains[k] > min_gain]
    names = [f"{spec.cat[i].name} x {spec.cat[j].name}" for i, j in layer.pairs]
    info = {"method": "one Newton step per pair on the train rows, valid logloss gain", "C": row["C"],
            "min_gain": min_gain, "pairs": n_pairs, "chosen": [names[k] for k in chosen],
            "gains": [[names[k], round(gains[k], 7)] for k in np.argsort(gains, kind="stable")[::-1]],
            "seconds": round(time.perf_counter() - t0, 1)}
    log.info("wide part: %d of %d pairs of fields lower the valid logloss by > %g (best: %s) in %.1fs", len(chosen),
             n_pairs, min_gain, ", ".join(name for name, _ in info["gains"][:3]), info["seconds"])
    return chosen, info


def fit_wide(model: Any, spec: FeatureSpec, rows: Any, valid: Batch, *, max_rows: int = MAX_ROWS,
             grid: Iterable[float] = C_GRID) -> dict[str, Any] | None:
    """Fit the model's WideLogit (when it has one) on the training ``rows``; returns what was fitted, for the manifest.

    Takes the built model (vocabulary remap and data layers already filled), the
    spec, the training rows (a Batch or a streamed Source; the first ``max_rows``)
    and the valid rows (they choose the L2 strength).  Returns None for a model
    without a wide part, else ``{"C", "grid", "rows", "columns_used", "seconds",
    "valid_auc", "valid_logloss"}`` (the valid figures of the wide part alone).

    Raises:
        ConfigError: scikit-learn is not installed.
    """
    layer = wide_layer(model)
    if layer is None:
        return None
    _logistic_regression()  # a clear error before any work when scikit-learn is missing
    from ctredge.vocab import quantile_edges

    t0 = time.perf_counter()
    train = _first_rows(rows, spec, max_rows)
    if layer.n_dense:
        layer.edges.assign(quantile_edges(train.feeds[INPUT_DENSE], layer.n_edges))
    x_train, x_valid = design(model, train), design(model, valid)
    used = np.unique(x_train.indices)     # columns no training row sets keep weight 0 under L2
    x_train, x_valid = x_train[:, used], x_valid[:, used]
    *best, table = _fit_lr(x_train, train.labels, x_valid, valid, grid)
    full = np.zeros(layer.n_rows + layer.n_match, np.float32)
    full[used] = best[1]
    layer.table.assign(full[:layer.n_rows, None])
    if layer.n_match:
        layer.match_w.assign(full[layer.n_rows:, None])
    layer.bias.assign(np.array([best[2]], np.float32))
    info = {"C": best[0]["C"], "grid": table, "rows": len(train), "columns_used": int(len(used)),
            "seconds": round(time.perf_counter() - t0, 1), "valid_auc": best[0]["valid_auc"],
            "valid_logloss": best[0]["valid_logloss"]}
    log.info("wide part: logistic regression on %d training rows, %d columns, C=%s (valid AUC %.5f) in %.1fs",
             info["rows"], info["columns_used"], info["C"], info["valid_auc"], info["seconds"])
    return info


__all__ = ["C_GRID", "MAX_ROWS", "SELECT_MIN_GAIN", "SELECT_MIN_VALID_ROWS", "columns", "design", "fit_wide", "select_pairs", "wide_layer"]
