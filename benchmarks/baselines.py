"""Two cheap, strong baselines beside the deep models in ``ctredge bench``'s accuracy table.

* ``baseline-lr``: a hashed logistic regression (scikit-learn, L-BFGS) on a
  one-hot of every categorical id, every pairwise cross of categorical fields
  hashed into :data:`~.baseline_features.CROSS_BUCKETS` buckets, quantile bins
  of the dense features (edges from the training rows) and simple history
  features (:mod:`.baseline_features`); its L2 strength is chosen on the valid
  rows from :data:`LR_GRID`.
* ``baseline-lgbm``: LightGBM on the raw dense features, per categorical field
  its training-row count and a capped frequency code (categorical), and the
  same history features; early stopping on the valid rows.

Both are fit on exactly the **train** part of the trained artifact's
:class:`ctredge.dataplan.DataPlan` (read from its files, verified by sha256),
tuned on its **valid** part, and scored on the very rows the accuracy table
scored the deep models on (its test rows, handed in), with the same exact
metrics (:mod:`ctredge.metrics`) and, when the reference model's predictions
are given, the same paired bootstrap dAUC.

scikit-learn and lightgbm are an optional extra (``pip install
'ctredge[baselines]'``); without them :func:`baselines` returns a "not
measured" record saying so, and the bench goes on.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable

import numpy as np

from ctredge import metrics as M
from ctredge.dataplan import DataPlan
from ctredge.errors import ArtifactError, DataError
from ctredge.features import FeatureSpec
from ctredge.reader import Batch

log = logging.getLogger("ctredge.benchmarks")

LR_MODEL = "baseline-lr"
LGBM_MODEL = "baseline-lgbm"
BASELINES = (LR_MODEL, LGBM_MODEL)
#: inverse L2 strengths tried for the logistic regression (picked by valid logloss)
LR_GRID = (0.003, 0.01, 0.03)
#: the training part is read into memory only up to this many bytes on disk
MAX_TRAIN_BYTES = 2 * 2 ** 30
INSTALL_HINT = "pip install 'ctredge[baselines]' (scikit-learn, lightgbm)"

Fitter = Callable[[Any, Batch, Batch, Batch], tuple[np.ndarray, dict[str, Any]]]


def missing_packages() -> list[str]:
    """The baselines' packages that cannot be imported (empty when both are there)."""
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("lightgbm", "lightgbm"), ("scipy", "scipy")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    return missing


def plan_parts(manifest: dict[str, Any], spec: FeatureSpec) -> tuple[Batch, Batch]:
    """The train and valid rows of a trained manifest's data plan (files verified by sha256).

    Raises:
        ArtifactError: the manifest records no data plan.
        DataError: a file changed or is missing, or the training part is too big to read into memory.
    """
    plan = DataPlan.from_manifest(manifest.get("data")).verify()
    if plan.part_bytes("train") > MAX_TRAIN_BYTES:
        raise DataError(f"the training part is {plan.part_bytes('train'):,} bytes on disk; the baselines read it "
                        f"into memory only up to {MAX_TRAIN_BYTES:,}")
    parts = plan.read_parts(spec, ("train", "valid"))
    return parts["train"], parts["valid"]


def fit_lr(enc: Any, train: Batch, valid: Batch, test: Batch) -> tuple[np.ndarray, dict[str, Any]]:
    """The hashed logistic regression: fit on ``train`` per C of :data:`LR_GRID`, keep the best valid logloss.

    Each C is an inverse L2 strength; the fits go from the strongest to the weakest, warm-started.

    Returns ``(test predictions, info)``; ``info`` has the grid's valid figures and the C kept.
    """
    from sklearn.linear_model import LogisticRegression

    x_train = enc.sparse(train)
    # columns no training row sets would get weight 0 under L2: drop them (same model, far fewer columns)
    used = np.unique(x_train.indices)
    x_train, x_valid, x_test = x_train[:, used], enc.sparse(valid)[:, used], enc.sparse(test)[:, used]
    best, grid = None, []
    # strongest L2 first, each fit warm-started from the last (lbfgs on the sparse matrix)
    model = LogisticRegression(solver="lbfgs", max_iter=300, warm_start=True)
    for c in sorted(LR_GRID):
        model.set_params(C=c)
        model.fit(x_train, train.labels)
        p = model.predict_proba(x_valid)[:, 1]
        row = {"C": c, "valid_logloss": M.logloss(valid.labels, p), "valid_auc": M.auc(valid.labels, p),
               "iterations": int(model.n_iter_[0])}
        grid.append(row)
        if best is None or row["valid_logloss"] < best[0]["valid_logloss"]:
            best = (row, copy.deepcopy(model))
    assert best is not None
    info = {"C": best[0]["C"], "grid": grid, "columns_used": int(x_train.shape[1]),
            "nonzeros_per_row": int(x_train.nnz // max(x_train.shape[0], 1)),
            "valid_auc": best[0]["valid_auc"], "valid_logloss": best[0]["valid_logloss"]}
    return best[1].predict_proba(x_test)[:, 1], info


LGBM_PARAMS = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 100,
               "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 10.0,
               "cat_smooth": 50.0, "cat_l2": 10.0, "max_cat_threshold": 32, "num_threads": 2, "verbose": -1,
               "seed": 0, "deterministic": True, "force_row_wise": True}
LGBM_ROUNDS = 1000
LGBM_PATIENCE = 30


def fit_lgbm(enc: Any, train: Batch, valid: Batch, test: Batch) -> tuple[np.ndarray, dict[str, Any]]:
    """LightGBM on :meth:`Encoder.tabular` features, early-stopped on the valid logloss.

    Returns ``(test predictions, info)``; ``info`` has the rounds kept and the valid figures.
    """
    import lightgbm as lgb

    x_train, names, categorical = enc.tabular(train)
    x_valid, x_test = enc.tabular(valid)[0], enc.tabular(test)[0]
    dtrain = lgb.Dataset(x_train, train.labels, feature_name=names, categorical_feature=categorical,
                         free_raw_data=False)
    dvalid = lgb.Dataset(x_valid, valid.labels, reference=dtrain)
    booster = lgb.train(LGBM_PARAMS, dtrain, num_boost_round=LGBM_ROUNDS, valid_sets=[dvalid],
                        callbacks=[lgb.early_stopping(LGBM_PATIENCE, verbose=False)])
    rounds = int(booster.best_iteration or booster.current_iteration())
    p_valid = booster.predict(x_valid, num_iteration=rounds)
    info = {"rounds": rounds, "features": len(names), "valid_auc": M.auc(valid.labels, p_valid),
            "valid_logloss": M.logloss(valid.labels, p_valid)}
    return booster.predict(x_test, num_iteration=rounds), info


FITTERS: dict[str, Fitter] = {LR_MODEL: fit_lr, LGBM_MODEL: fit_lgbm}
DESCRIPTIONS = {LR_MODEL: "baseline: hashed LR (ids, pairwise crosses, dense bins, history)",
                LGBM_MODEL: "baseline: LightGBM (dense, id counts + codes, history)"}


def baselines(manifest: dict[str, Any] | None, spec: FeatureSpec, test: Batch, *,
              reference: np.ndarray | None = None, reference_name: str | None = None,
              bootstrap: int = 200, seed: int = 0, confidence: float = 0.95,
              rows_source: str | None = None, keep_predictions: bool = False) -> dict[str, Any]:
    """Fit both baselines on the manifest's training rows and score them on ``test``.

    Takes the trained artifact's manifest (its data plan gives the train and
    valid rows), the spec that reads them, the test rows the accuracy table
    scored, optionally the reference model's predictions on those rows (for the
    paired dAUC), the bootstrap settings and where the test rows came from.
    Returns ``{"status": "measured" | "not measured", "reason": str, "rows": [...], ...}``;
    each row is an accuracy-table row (``kind: "baseline"``) with the exact
    metrics, ``fit_seconds``, ``train_rows``, ``valid_rows``, ``test_rows`` and the
    fit's ``info`` (and, with ``keep_predictions``, its test ``predictions``).
    A baseline that fails is a row with its ``error``; missing packages or a
    missing data plan give "not measured" with the reason.
    """
    missing = missing_packages()
    if missing:
        return {"status": "not measured", "reason": f"{', '.join(missing)} not installed ({INSTALL_HINT})",
                "rows": []}
    if manifest is None:
        return {"status": "not measured", "reason": "no trained artifact: the baselines are fit on its data plan's "
                                                    "training rows", "rows": []}
    if rows_source not in (None, "test split", "test file"):
        return {"status": "not measured", "reason": f"the scored rows are {rows_source!r}, not the trained "
                                                    f"artifact's held-out test rows", "rows": []}
    from ctredge.benchmarks.baseline_features import Encoder

    t0 = time.perf_counter()
    try:
        train, valid = plan_parts(manifest, spec)
    except (ArtifactError, DataError) as exc:
        return {"status": "not measured", "reason": f"{type(exc).__name__}: {exc}", "rows": []}
    read_s = time.perf_counter() - t0
    if len(train) == 0 or train.labels.min() == train.labels.max():
        return {"status": "not measured", "reason": f"the training part has {len(train)} rows, "
                                                    f"not both classes", "rows": []}
    enc = Encoder.fit(spec, train)
    rows = []
    for name, fit in FITTERS.items():
        t1 = time.perf_counter()
        row: dict[str, Any] = {"name": name, "kind": "baseline", "version": None, "path": None,
                               "quantization": DESCRIPTIONS[name], "bytes": None, "scored": True,
                               "train_rows": len(train), "valid_rows": len(valid), "test_rows": len(test)}
        try:
            p, info = fit(enc, train, valid, test)
            row.update(_scored(test.labels, np.asarray(p, dtype=np.float64), reference, bootstrap, seed,
                               confidence), info=info)
            if keep_predictions:
                row["predictions"] = np.asarray(p, dtype=np.float64)
        except Exception as exc:  # one baseline's failure is reported, the other still runs
            row.update(scored=False, error=f"{type(exc).__name__}: {exc}")
            log.warning("baselines: %s failed: %s", name, row["error"])
        row["fit_seconds"] = row["seconds"] = time.perf_counter() - t1
        if row["scored"]:
            log.info("baselines: %-14s AUC %.5f  logloss %.5f  calib %.3f  (%.1fs, %d train rows)", name,
                     row["auc"], row["logloss"], row["calibration"], row["fit_seconds"], len(train))
        rows.append(row)
    return {"status": "measured", "reason": "", "rows": rows, "reference": reference_name,
            "train_rows": len(train), "valid_rows": len(valid), "test_rows": len(test),
            "read_seconds": read_s, "seconds": time.perf_counter() - t0}


def _scored(labels: np.ndarray, p: np.ndarray, reference: np.ndarray | None, bootstrap: int, seed: int,
            confidence: float) -> dict[str, Any]:
    """The accuracy-table figures of one baseline's test predictions."""
    s = M.summary(labels, p)
    out: dict[str, Any] = {k: s[k] for k in ("auc", "logloss", "calibration", "mean_prediction", "click_rate",
                                             "normalized_entropy")}
    out.update(dauc=None, dauc_ci=[None, None], pct_of_full_auc=None)
    if reference is not None:
        d = M.paired_bootstrap_auc_delta(labels, reference, p, resamples=bootstrap, confidence=confidence,
                                         seed=seed)
        ref_auc = M.auc(labels, reference)
        out.update(dauc=d.delta, dauc_ci=[d.low, d.high], pct_of_full_auc=100.0 * s["auc"] / ref_auc)
    return out


__all__ = ["LR_MODEL", "LGBM_MODEL", "BASELINES", "LR_GRID", "baselines", "fit_lr", "fit_lgbm",
           "missing_packages", "plan_parts"]
