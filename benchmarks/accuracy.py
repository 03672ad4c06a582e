"""Accuracy of the full Keras model and of every ONNX variant in a repository, on the same rows.

:func:`accuracy_table` scores, on one set of labelled rows:

* the full Keras model of the trained artifact (TensorFlow imported lazily; when
  TensorFlow is not installed or no trained folder is given, ``ctr-fp32`` — the
  validated ONNX export of that model — is the reference, and the table says so);
* every model folder of the repository (``REPO/<name>/<latest version>/model.onnx``,
  :class:`ctredge.layout.RepositoryLayout`), over the accuracy budget or not.

``ctredge compress all`` already scored every variant against the full Keras
model on the trained artifact's test rows and recorded it in ``REPO/index.json``.
When the index describes exactly these rows and files (the same trained
manifest, test files, row count, bootstrap settings, and each variant's
``model.onnx`` by sha256), its figures are taken as they are and neither Keras
nor ONNX Runtime runs; otherwise every figure is computed here.  The result
says which (``figures``: ``"index.json"`` or ``"computed"``).

Which rows: when ``data_path`` is (by sha256) a test file of the trained
artifact's data plan (:class:`ctredge.dataplan.DataPlan`), the plan's held-out
**test** rows of that file (the split of ``ctredge train``, so the same rows the
compression budget was judged on); otherwise every row of ``data_path``.  The
result records which (``rows_source``).

Per model: exact AUC; ΔAUC against the reference with a paired bootstrap 95%
interval (:func:`ctredge.metrics.paired_bootstrap_auc_delta`: each resample
draws rows with replacement and scores both models on the same draw); logloss;
calibration (mean predicted / observed click rate, and both rates); normalized
entropy; AUC as % of the reference's with MLPerf's 99% and 99.9% lines
(``pct_of_full_auc >= 99`` / ``>= 99.9``); bytes on disk (every file of the
version folder except ``manifest.json``; ``model.keras`` for the Keras model)
and that size as a multiple of ``ctr-fp32``'s; the budget verdict ``compress
all`` recorded (``verdict``: met / not resolved / missed, and ``published``).
When the data has a truth sidecar (``ctredge datagen``), its Bayes-optimal AUC
is the ceiling, taken on the rows scored: the sidecar's ``test`` scope when
they are the default test part of the split that scope names, ``all`` when
every row is scored (e.g. a held-out ``--sample-seed`` file), else the whole
file's figure, labelled as such (``truth.scope``); the learnable ceiling
(``datagen --ceiling``) comes with the ``test`` scope.

ONNX models are scored by ONNX Runtime on the CPU (1 thread, batches of 4096
rows, as ``ctredge compress all`` scored them); the Keras model by
``model.predict``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge import metrics as M
from ctredge.artifacts import manifest_hash, read_manifest, sha256_file
from ctredge.dataplan import DataPlan
from ctredge.errors import ArtifactError, DataError
from ctredge.features import METADATA_KEY, FeatureSpec
from ctredge.layout import RepositoryLayout
from ctredge.reader import Batch, read_all, resolve_spec, sidecar_path

log = logging.getLogger("ctredge.benchmarks")

#: name of the full Keras model in every benchmark table
FULL_MODEL = "keras-full"
#: the ONNX variant standing for the full model when TensorFlow is absent, and the bytes baseline
FP32_MODEL = "ctr-fp32"
MLPERF_LINES = (99.0, 99.9)


def model_order(name: str) -> tuple[int, str]:
    """Sort key: the full model, then ``compress all``'s variants in their order, then the rest by name."""
    from ctredge.benchmarks.baselines import BASELINES
    from ctredge.compress.variants import VARIANTS

    known = [FULL_MODEL, *VARIANTS, *BASELINES]
    return (known.index(name), "") if name in known else (len(known), name)


def repository_models(repository: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every model of a repository at its latest version: ``[{name, version, path, bytes}]`` in :func:`model_order`.

    ``bytes`` counts every file of that version folder except ``manifest.json``.

    Raises:
        ArtifactError: the repository folder does not exist.
    """
    entries = RepositoryLayout(repository).latest_models()
    return sorted((dict(vars(e)) for e in entries), key=lambda m: model_order(m["name"]))


def read_index(repository: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``REPO/index.json`` (written by ``ctredge compress all``) or None when absent or unreadable."""
    try:
        return RepositoryLayout(repository).read_index()
    except ArtifactError as exc:
        log.warning("ignoring the index: %s", exc)
        return None


def evaluation_rows(manifest: dict[str, Any] | None, data_path: str | os.PathLike[str], spec: FeatureSpec,
                    *, max_rows: int | None = None, data_sha256: str | None = None) -> tuple[Batch, dict[str, Any]]:
    """The labelled rows to score and a record of where they came from.

    Takes the trained artifact's manifest (or None), the data file, the spec
    that hashes it, an optional row cap (the first ``max_rows`` selected rows)
    and the file's sha256 when already known.  Returns ``(batch, info)``;
    ``info["rows_source"]`` is ``"test split"``, ``"test file"`` or ``"all rows"``.

    Raises:
        DataError: the data cannot be read, or no rows (or only one class) remain.
    """
    sha = data_sha256 or sha256_file(data_path)
    info: dict[str, Any] = {"data": str(data_path), "data_sha256": sha, "rows_source": "all rows"}
    batch: Batch | None = None
    data_info = (manifest or {}).get("data") or {}
    if data_info.get("parts"):
        batch, found = DataPlan.from_manifest(data_info).test_rows_in(data_path, sha, spec)
        source = found.pop("rows_source")
        info.update(found)
        if source == "test split":
            info.update(rows_source="test split", note="the held-out test rows of the trained artifact's split: "
                                                       "same seed, same fractions")
        elif source == "test file":
            info.update(rows_source="test file", note="the trained artifact's test file: every row")
        elif source == "training file":
            info["note"] = ("WARNING: this file is a training file of the trained artifact and its test rows "
                            "come from other files; every row is scored, so the figures are on training rows")
            log.warning("accuracy: %s", info["note"])
        else:
            info["note"] = "not a data file of the trained artifact: every row is scored"
    elif manifest is None:
        info["note"] = "no trained artifact: every row is scored"
    if batch is None:
        batch = read_all(data_path, spec)
    if max_rows is not None and len(batch) > max_rows:
        batch = batch.take(np.arange(int(max_rows)))
        info["max_rows"] = int(max_rows)
    if len(batch) == 0 or batch.labels.min() == batch.labels.max():
        raise DataError(f"accuracy needs rows with both clicks and non-clicks; {info['rows_source']} of "
                        f"{data_path} gave {len(batch)} row(s)")
    info["rows"] = len(batch)
    return batch, info


def truth_of(data_path: str | os.PathLike[str], data_sha256: str | None = None, *, rows_source: str | None = None,
             split: dict[str, Any] | None = None, rows: int | None = None) -> dict[str, Any] | None:
    """The Bayes-optimal AUC/logloss from the data's truth sidecar (synthetic data) for the rows scored, or None.

    Takes the data file, its sha256, and where the scored rows come from
    (``rows_source``, the split info of :func:`evaluation_rows` and the row
    count).  The figures are the sidecar's ``test`` scope when the rows are the
    test part of the split it names (with the learnable ``ceiling`` when
    recorded), ``all`` when every row of the file is scored, else the whole
    file's (``scope`` says which).  A sidecar whose ``data_sha256`` differs from
    the data's is ignored.
    """
    path = sidecar_path(data_path, "truth")
    if not os.path.isfile(path):
        return None
    try:
        truth = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring truth sidecar %s: %s", path, exc)
        return None
    if data_sha256 and truth.get("data_sha256") and truth["data_sha256"] != data_sha256:
        log.warning("ignoring truth sidecar %s: it describes another file (sha256 differs)", path)
        return None
    if truth.get("bayes_auc") is None:
        return None
    scopes = truth.get("scopes") or {}
    test = scopes.get("test") or {}
    tsplit = test.get("split") or {}
    if (rows_source == "test split" and split and test and (tsplit.get("seed"), tsplit.get("valid"), tsplit.get("test"))
            == (split.get("seed"), split.get("valid"), split.get("test")) and split.get("file_no", 0) == 0
            and (rows is None or rows == test.get("rows"))):
        out = {"bayes_auc": float(test["bayes_auc"]), "bayes_logloss": test.get("bayes_logloss"), "path": path,
               "scope": "the test rows scored", "rows": test.get("rows")}
        if truth.get("ceiling"):
            out["ceiling"] = truth["ceiling"]
        return out
    if rows_source in ("all rows", "other file", "test file") and scopes.get("all") and (
            rows is None or rows == scopes["all"].get("rows")):
        a = scopes["all"]
        return {"bayes_auc": float(a["bayes_auc"]), "bayes_logloss": a.get("bayes_logloss"), "path": path,
                "scope": "every row of the file, the rows scored", "rows": a.get("rows")}
    return {"bayes_auc": float(truth["bayes_auc"]), "bayes_logloss": truth.get("bayes_logloss"),
            "path": path, "scope": "whole file (not only the rows scored)"}


def _load_keras(trained_dir: str | os.PathLike[str] | None) -> tuple[Any, str | None]:
    """(keras model or None, reason when None)."""
    if trained_dir is None:
        return None, "no trained artifact given"
    try:
        import tensorflow  # noqa: F401
    except ImportError as exc:
        return None, f"TensorFlow is not installed ({exc})"
    from ctredge.train.train import load_trained

    model, _, _ = load_trained(trained_dir)
    return model, None


def _onnx_spec_and_kind(path: str) -> tuple[FeatureSpec | None, str | None]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    spec = FeatureSpec.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None
    return spec, meta.get("ctredge.quantization")


def accuracy_table(repository: str | os.PathLike[str], trained_dir: str | os.PathLike[str] | None,
                   data_path: str | os.PathLike[str], *, bootstrap: int = 200, seed: int = 0,
                   max_rows: int | None = None, confidence: float = 0.95,
                   with_baselines: bool = False, dp_trained: Sequence[str] = ()) -> dict[str, Any]:
    """Score the full model and every repository variant on the same labelled rows.

    Takes the model repository, the trained artifact folder (or None), the data
    file, the number of bootstrap resamples and their seed, an optional cap
    on the rows scored, and whether to fit the cheap baselines
    (:mod:`.baselines`: on the trained artifact's training rows, scored on these
    rows; their rows have ``kind: "baseline"`` and no bytes, and ``baselines``
    records their status).  Returns::

        {"reference": "keras-full" | "ctr-fp32", "reference_note": str | None,
         "rows": int, "rows_source": ..., "data": ..., "data_sha256": ..., "split": ...,
         "click_rate": float, "bootstrap": int, "confidence": 0.95, "seed": int,
         "bayes_auc": float | None, "truth": {...} | None, "budget": float | None,
         "fp32_bytes": int | None, "mlperf_lines": [99.0, 99.9], "seconds": float,
         "figures": "index.json" | "computed", "baselines": {"status", "reason", ...} | None,
         "models": [{"name", "kind": "keras" | "onnx", "version", "path", "quantization",
                     "bytes", "x_fp32_bytes", "auc", "dauc", "dauc_ci": [low, high], "logloss",
                     "calibration", "mean_prediction", "click_rate", "normalized_entropy",
                     "pct_of_full_auc", "mlperf_99", "mlperf_99_9", "within_budget", "index_dauc",
                     "scored", "error", "seconds"}, ...]}

    The reference is first in ``models``; a variant listed in ``index.json``
    but not written (over budget) appears with ``scored: False``; a model that
    fails to score appears with its ``error``.

    Raises:
        ArtifactError: the repository or the trained artifact is missing or fails verification.
        DataError: the data cannot be read or has one class only.
    """
    t_start = time.perf_counter()
    data_path = str(data_path)
    models = repository_models(repository)
    index = read_index(repository)
    index_by = {e.get("name"): e for e in (index or {}).get("models", [])}
    manifest = read_manifest(trained_dir, stage=("train", "prune")) if trained_dir is not None else None
    specs = {m["name"]: _onnx_spec_and_kind(m["path"]) for m in models}
    if trained_dir is not None:
        spec = FeatureSpec.load(str(Path(trained_dir) / "feature_spec.json"))
    else:
        spec = next((s for s, _ in specs.values() if s is not None), None) or resolve_spec(data_path)
    log.info("accuracy: reading rows of %s", data_path)
    sha = sha256_file(data_path)
    batch, info = evaluation_rows(manifest, data_path, spec, max_rows=max_rows, data_sha256=sha)
    labels = batch.labels
    log.info("accuracy: %d rows (%s), click rate %.4f", len(batch), info["rows_source"], float(labels.mean()))
    settings = {"bootstrap": int(bootstrap), "seed": int(seed), "confidence": confidence}
    for m in models:
        m["spec"], m["quantization"] = specs[m["name"]]
        m["quantization"] = m["quantization"] or (index_by.get(m["name"]) or {}).get("quantization")
    rows = _rows_from_index(index, trained_dir, manifest, models, spec, info, len(batch), settings, max_rows)
    if rows is not None:
        reference, reference_note, figures = FULL_MODEL, None, "index.json"
        preds: dict[str, np.ndarray] = {}
        log.info("accuracy: every figure from %s (same trained model, rows, files and settings)",
                 RepositoryLayout(repository).index_path)
    else:
        rows, reference, reference_note, preds = _computed_rows(repository, trained_dir, manifest, models, spec, batch,
                                                         data_path, sha, settings, max_rows)
        figures = "computed"
    _add_unwritten(rows, index_by)
    base = None
    ref_pred = None
    if with_baselines or dp_trained:
        ref_pred = preds.get(reference)
        if ref_pred is None and reference == FULL_MODEL:
            ref_pred = _keras_predictions(trained_dir, batch)
    if with_baselines:
        from ctredge.benchmarks.baselines import baselines

        base = baselines(manifest, spec, batch, reference=ref_pred, reference_name=reference if ref_pred is not None
                         else None, bootstrap=bootstrap, seed=seed, confidence=confidence,
                         rows_source=info["rows_source"])
        rows.extend(base.pop("rows"))
        if base["status"] != "measured":
            log.info("accuracy: baselines not measured: %s", base["reason"])
    if dp_trained:
        from ctredge.benchmarks.dp import dp_rows

        rows.extend(dp_rows(dp_trained, batch, ref_pred, manifest, bootstrap=bootstrap, seed=seed,
                            confidence=confidence))
    rows.sort(key=lambda r: (r["name"] != reference, model_order(r["name"])))
    fp32_bytes = next((m["bytes"] for m in models if m["name"] == FP32_MODEL), None)
    for row in rows:
        e = index_by.get(row["name"]) or {}
        row["within_budget"] = e.get("within_budget")
        row["verdict"] = e.get("verdict")
        row["published"] = e.get("published")
        row.setdefault("index_dauc", e.get("dauc"))
        row["x_fp32_bytes"] = (row["bytes"] / fp32_bytes) if (fp32_bytes and row.get("bytes")) else None
        if "auc" in row and row.get("kind") not in ("baseline", "dp"):
            log.info("accuracy: %-17s AUC %.5f  dAUC %+.5f [%+.5f, %+.5f]  logloss %.5f  calib %.3f  %s bytes",
                     row["name"], row["auc"], row["dauc"], *row["dauc_ci"], row["logloss"], row["calibration"],
                     f"{row['bytes']:,}")
    truth = truth_of(data_path, sha, rows_source=info["rows_source"], split=info.get("split"), rows=len(batch))
    return {
        "reference": reference, "reference_note": reference_note, **info,
        "click_rate": float(labels.mean()), **settings,
        "bayes_auc": truth["bayes_auc"] if truth else None, "truth": truth,
        "budget": ((index or {}).get("reference") or {}).get("budget"),
        "index": str(Path(repository) / "index.json") if index is not None else None,
        "repository": str(repository), "trained": str(trained_dir) if trained_dir is not None else None,
        "fp32_bytes": fp32_bytes, "mlperf_lines": list(MLPERF_LINES), "figures": figures,
        "models": rows, "baselines": base, "seconds": time.perf_counter() - t_start,
    }


def _figures(summary: dict[str, float], delta: Any, ref_auc: float, max_abs_diff: float) -> dict[str, Any]:
    """One model's accuracy figures from its summary, its paired dAUC and the reference's AUC."""
    pct = 100.0 * summary["auc"] / ref_auc if ref_auc else float("nan")
    return {"auc": summary["auc"], "dauc": delta.delta, "dauc_ci": [delta.low, delta.high],
            "logloss": summary["logloss"], "calibration": summary["calibration"],
            "mean_prediction": summary["mean_prediction"], "click_rate": summary["click_rate"],
            "normalized_entropy": summary["normalized_entropy"], "pct_of_full_auc": pct,
            "mlperf_99": bool(pct >= MLPERF_LINES[0]), "mlperf_99_9": bool(pct >= MLPERF_LINES[1]),
            "max_abs_diff_vs_reference": max_abs_diff}


def _keras_row(trained_dir: str | os.PathLike[str], seconds: float) -> dict[str, Any]:
    path = Path(trained_dir) / "model.keras"
    return {"name": FULL_MODEL, "kind": "keras", "version": None, "path": str(path),
            "quantization": "none (Keras, fp32)", "bytes": path.stat().st_size, "seconds": seconds, "scored": True}


def _onnx_row(m: dict[str, Any], seconds: float = 0.0) -> dict[str, Any]:
    return {"name": m["name"], "kind": "onnx", "version": m["version"], "path": m["path"],
            "quantization": m["quantization"], "bytes": m["bytes"], "scored": True, "seconds": seconds}


def _rows_from_index(index: dict[str, Any] | None, trained_dir: Any, manifest: dict[str, Any] | None,
                     models: list[dict[str, Any]], spec: FeatureSpec, info: dict[str, Any], n_rows: int,
                     settings: dict[str, Any], max_rows: int | None) -> list[dict[str, Any]] | None:
    """Every model's figures as ``compress all`` recorded them, or None when the index may not describe these rows.

    The index is used only when it was computed from this trained manifest, on
    the whole test part of its plan, that part being the one file given here,
    with the same bootstrap settings; and each model's ``model.onnx`` is the one
    it scored (sha256) and reads the trained model's FeatureSpec.
    """
    if index is None or manifest is None or max_rows is not None:
        return None
    ref = index.get("reference") or {}
    eval_file = ref.get("rows_source") == "eval file"
    if eval_file:  # compress all --eval-data: every row of that file, identified by its sha256
        if info["rows_source"] != "all rows" or (ref.get("eval_data") or {}).get("sha256") != info["data_sha256"]:
            return None
    elif info["rows_source"] != "test split":
        return None
    one_test_file = len(DataPlan.from_manifest(manifest.get("data")).parts["test"].paths) == 1
    if (ref.get("trained_manifest_sha256") != manifest_hash(trained_dir) or not (one_test_file or eval_file)
            or ref.get("test_rows") != n_rows or "keras_summary" not in ref
            or any(ref.get(k) != v for k, v in settings.items())):
        return None
    by = {e.get("name"): e for e in index.get("models", [])}
    ks = ref["keras_summary"]
    ref_auc = ks["auc"]
    rows = [{**_keras_row(trained_dir, 0.0), **_figures(ks, M.PairedDelta(0.0, 0.0, 0.0, 0), ref_auc, 0.0)}]
    for m in models:
        e = by.get(m["name"]) or {}
        if (e.get("version") != m["version"] or e.get("model_sha256") != sha256_file(m["path"])
                or m["spec"] is None or m["spec"].to_json() != spec.to_json() or "normalized_entropy" not in e):
            return None
        summary = {"auc": e["test_auc"], "logloss": e["test_logloss"], "calibration": e["test_calibration"],
                   "mean_prediction": e["mean_prediction"], "click_rate": e["click_rate"],
                   "normalized_entropy": e["normalized_entropy"]}
        delta = M.PairedDelta(e["dauc"], e["dauc_ci"][0], e["dauc_ci"][1], settings["bootstrap"])
        rows.append({**_onnx_row(m), **_figures(summary, delta, ref_auc, e["max_abs_diff_vs_keras"])})
    return rows


def _computed_rows(repository: Any, trained_dir: Any, manifest: dict[str, Any] | None, models: list[dict[str, Any]],
                   spec: FeatureSpec, batch: Batch, data_path: str, sha: str, settings: dict[str, Any],
                   max_rows: int | None) -> tuple[list[dict[str, Any]], str, str | None, dict[str, np.ndarray]]:
    """Score the Keras model (or ``ctr-fp32`` as the reference) and every variant on ``batch``.

    Returns ``(rows, reference name, why the reference is not the Keras model, predictions by model)``.

    Raises:
        ArtifactError: no reference model can be scored.
    """
    from ctredge.compress.scoring import ort_predict

    keras_model, reference_note = _load_keras(trained_dir)
    if keras_model is None and not any(m["name"] == FP32_MODEL for m in models):
        raise ArtifactError(f"no reference model: {reference_note} and the repository {repository} has no "
                            f"{FP32_MODEL}")
    rows: list[dict[str, Any]] = []
    preds: dict[str, np.ndarray] = {}
    reference = FP32_MODEL
    if keras_model is not None:
        from ctredge.train.loop import keras_predict

        t0 = time.perf_counter()
        preds[FULL_MODEL] = keras_predict(keras_model, batch.feeds)
        rows.append(_keras_row(trained_dir, time.perf_counter() - t0))
        reference = FULL_MODEL
    else:
        log.info("accuracy: reference is %s (%s)", FP32_MODEL, reference_note)
    for m in models:
        t0 = time.perf_counter()
        row = _onnx_row(m)
        try:
            feeds = batch.feeds
            if m["spec"] is not None and m["spec"].to_json() != spec.to_json():
                # the model hashes its inputs differently: re-read the same rows with its spec
                feeds = evaluation_rows(manifest, data_path, m["spec"], max_rows=max_rows, data_sha256=sha)[0].feeds
            preds[m["name"]] = ort_predict(Path(m["path"]), feeds)
        except Exception as exc:  # any failure of one model is reported, the others still run
            row.update(scored=False, error=f"{type(exc).__name__}: {exc}")
            log.warning("accuracy: %s could not be scored: %s", m["name"], row["error"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    if reference not in preds:
        raise ArtifactError(f"the reference model {reference} could not be scored: "
                            + next((r.get("error", "") for r in rows if r["name"] == reference), ""))
    labels, p_ref = batch.labels, preds[reference]
    ref_auc = M.auc(labels, p_ref)
    for row in rows:
        p = preds.get(row["name"])
        if p is None:
            continue
        if row["name"] == reference:
            d = M.PairedDelta(0.0, 0.0, 0.0, 0)
        else:
            d = M.paired_bootstrap_auc_delta(labels, p_ref, p, resamples=settings["bootstrap"],
                                             confidence=settings["confidence"], seed=settings["seed"])
        row.update(_figures(M.summary(labels, p), d, ref_auc, float(np.max(np.abs(p - p_ref)))))
    return rows, reference, reference_note, preds


def _keras_predictions(trained_dir: Any, batch: Batch) -> np.ndarray | None:
    """The full Keras model's predictions on ``batch`` (for the baselines' paired dAUC), or None without TensorFlow."""
    model, reason = _load_keras(trained_dir)
    if model is None:
        log.info("accuracy: no dAUC for the baselines: %s", reason)
        return None
    from ctredge.train.loop import keras_predict

    return keras_predict(model, batch.feeds)


def _add_unwritten(rows: list[dict[str, Any]], index_by: dict[str, dict[str, Any]]) -> None:
    """Append the variants ``compress all`` listed but did not write (over budget), with their index figures."""
    have = {r["name"] for r in rows}
    for name, e in index_by.items():
        if name not in have:
            rows.append({"name": name, "kind": "onnx", "version": e.get("version"), "path": None,
                         "quantization": e.get("quantization"), "bytes": e.get("size_bytes"), "scored": False,
                         "error": "not written by compress all: " + (e.get("not_written") or "over budget")
                                  + "; index figures only",
                         "index_auc": e.get("test_auc"), "index_dauc": e.get("dauc")})


__all__ = ["FULL_MODEL", "FP32_MODEL", "MLPERF_LINES", "accuracy_table", "evaluation_rows", "repository_models",
           "read_index", "truth_of", "model_order"]
