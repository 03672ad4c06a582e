"""Accuracy of the full Keras model and of every ONNX variant in a repository, on the same rows.

:func:`accuracy_table` scores, on one set of labelled rows:

* the full Keras model of the trained artifact (TensorFlow imported lazily; when
  TensorFlow is not installed or no trained folder is given, ``ctr-fp32`` — the
  validated ONNX export of that model — is the reference, and the table says so);
* every model folder of the repository (``REPO/<name>/<highest version>/model.onnx``),
  over the accuracy budget or not; ``REPO/index.json``, when present, adds each
  variant's budget verdict, but every metric is recomputed here.

Which rows: when ``data_path`` is (by sha256) a data file of the trained
artifact's manifest, the manifest's held-out **test** rows of that file (the
split of ``ctredge train``: same seed, same fractions, so the same rows the
compression budget was judged on); otherwise every row of ``data_path``.  The
result records which (``rows_source``).

Per model: exact AUC; ΔAUC against the reference with a paired bootstrap 95%
interval (:func:`ctredge.metrics.paired_bootstrap_auc_delta`: each resample
draws rows with replacement and scores both models on the same draw); logloss;
calibration (mean predicted / observed click rate, and both rates); normalized
entropy; AUC as % of the reference's with MLPerf's 99% and 99.9% lines
(``pct_of_full_auc >= 99`` / ``>= 99.9``); bytes on disk (every file of the
version folder except ``manifest.json``; ``model.keras`` for the Keras model)
and that size as a multiple of ``ctr-fp32``'s.  When the data has a truth
sidecar (``ctredge datagen``), its Bayes-optimal AUC — the AUC of the true
click probabilities over the whole file — is the ceiling.

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
from typing import Any

import numpy as np

from ctredge import metrics as M
from ctredge.artifacts import read_manifest, sha256_file
from ctredge.errors import ArtifactError, DataError
from ctredge.features import METADATA_KEY, FeatureSpec
from ctredge.reader import SPLIT_NAMES, Batch, SplitSpec, iter_raw, read_all, resolve_spec, sidecar_path, to_batch

log = logging.getLogger("ctredge.benchmarks")

#: name of the full Keras model in every benchmark table
FULL_MODEL = "keras-full"
#: the ONNX variant standing for the full model when TensorFlow is absent, and the bytes baseline
FP32_MODEL = "ctr-fp32"
MLPERF_LINES = (99.0, 99.9)


def model_order(name: str) -> tuple[int, str]:
    """Sort key: the full model, then ``compress all``'s variants in their order, then the rest by name."""
    from ctredge.compress.variants import VARIANTS

    known = [FULL_MODEL, *VARIANTS]
    return (known.index(name), "") if name in known else (len(known), name)


def repository_models(repository: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every model folder of a repository: ``[{name, version, path, bytes}]`` in :func:`model_order`.

    The highest numeric version folder that holds a ``model.onnx`` is taken;
    ``bytes`` counts every file of that folder except ``manifest.json``.

    Raises:
        ArtifactError: the repository folder does not exist.
    """
    root = Path(repository)
    if not root.is_dir():
        raise ArtifactError(f"model repository {root} does not exist")
    out = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = sorted((int(v.name), v) for v in model_dir.iterdir()
                          if v.is_dir() and v.name.isdigit() and (v / "model.onnx").is_file())
        if not versions:
            continue
        version, folder = versions[-1]
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json")
        out.append({"name": model_dir.name, "version": version, "path": str(folder / "model.onnx"), "bytes": size})
    return sorted(out, key=lambda m: model_order(m["name"]))


def read_index(repository: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``REPO/index.json`` (written by ``ctredge compress all``) or None when absent or unreadable."""
    path = Path(repository) / "index.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def _manifest_sha_of(data_info: dict[str, Any], part_path: str) -> str | None:
    """sha256 the manifest recorded for a path of its data plan (paths may be relative to another cwd)."""
    files = data_info.get("files") or []
    norm = os.path.normpath(part_path)
    for f in files:
        fp = os.path.normpath(f.get("path", ""))
        if fp == norm or fp.endswith(os.sep + norm.lstrip(os.sep)):
            return f.get("sha256")
    return files[0].get("sha256") if len(files) == 1 else None


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
    test = (data_info.get("parts") or {}).get("test")
    if test:
        shas = [_manifest_sha_of(data_info, p) for p in test.get("paths", [])]
        split = data_info.get("split")
        if sha in shas and test.get("split_part") and split:
            k = shas.index(sha)
            sp = SplitSpec(**split)
            chunks = []
            for raw in iter_raw(data_path, spec, file_no=k):
                raw = raw.take(sp.codes(np.full(len(raw), k), raw.line_no) == SPLIT_NAMES.index("test"))
                if len(raw):
                    chunks.append(to_batch(raw, spec))
            batch = _concat(chunks, spec)
            info.update(rows_source="test split",
                        split={**split, "part": "test", "file_no": k},
                        note="the held-out test rows of the trained artifact's split: same seed, same fractions")
        elif sha in shas:
            info.update(rows_source="test file", note="the trained artifact's test file: every row")
        elif any(f.get("sha256") == sha for f in data_info.get("files") or []):
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


def _concat(chunks: list[Batch], spec: FeatureSpec) -> Batch:
    if not chunks:
        empty = {n: np.zeros((0,) + tuple(s[1:]), dtype=d) for n, (d, s) in spec.input_signature().items()}
        z = np.zeros(0, dtype=np.int64)
        return Batch(empty, np.zeros(0, dtype=np.float32), z, z)
    return Batch({k: np.concatenate([c.feeds[k] for c in chunks]) for k in chunks[0].feeds},
                 np.concatenate([c.labels for c in chunks]), np.concatenate([c.line_no for c in chunks]),
                 np.concatenate([c.file_no for c in chunks]))


def truth_of(data_path: str | os.PathLike[str], data_sha256: str | None = None) -> dict[str, Any] | None:
    """The Bayes-optimal AUC/logloss from the data's truth sidecar (synthetic data), or None.

    The sidecar's figures cover the whole file (every row), not only the test rows.
    A sidecar whose ``data_sha256`` differs from the data's is ignored.
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
    return {"bayes_auc": float(truth["bayes_auc"]), "bayes_logloss": truth.get("bayes_logloss"),
            "path": path, "scope": "whole file"}


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
                   max_rows: int | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Score the full model and every repository variant on the same labelled rows.

    Takes the model repository, the trained artifact folder (or None), the data
    file, the number of bootstrap resamples and their seed, and an optional cap
    on the rows scored.  Returns::

        {"reference": "keras-full" | "ctr-fp32", "reference_note": str | None,
         "rows": int, "rows_source": ..., "data": ..., "data_sha256": ..., "split": ...,
         "click_rate": float, "bootstrap": int, "confidence": 0.95, "seed": int,
         "bayes_auc": float | None, "truth": {...} | None, "budget": float | None,
         "fp32_bytes": int | None, "mlperf_lines": [99.0, 99.9], "seconds": float,
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
    keras_model, reference_note = _load_keras(trained_dir)
    if keras_model is None and not any(m["name"] == FP32_MODEL for m in models):
        raise ArtifactError(f"no reference model: {reference_note} and the repository {repository} has no "
                            f"{FP32_MODEL}")

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
    truth = truth_of(data_path, sha)
    fp32_bytes = next((m["bytes"] for m in models if m["name"] == FP32_MODEL), None)

    from ctredge.compress.scoring import ort_predict

    rows: list[dict[str, Any]] = []
    preds: dict[str, np.ndarray] = {}
    if keras_model is not None:
        from ctredge.train.train import predict as keras_predict

        t0 = time.perf_counter()
        preds[FULL_MODEL] = keras_predict(keras_model, batch.feeds)
        kbytes = (Path(trained_dir) / "model.keras").stat().st_size  # type: ignore[arg-type]
        rows.append({"name": FULL_MODEL, "kind": "keras", "version": None,
                     "path": str(Path(trained_dir) / "model.keras"), "quantization": "none (Keras, fp32)",
                     "bytes": kbytes, "seconds": time.perf_counter() - t0, "scored": True})
        reference = FULL_MODEL
    else:
        reference = FP32_MODEL
        log.info("accuracy: reference is %s (%s)", FP32_MODEL, reference_note)

    for m in models:
        t0 = time.perf_counter()
        mspec, kind = specs[m["name"]]
        row = {"name": m["name"], "kind": "onnx", "version": m["version"], "path": m["path"],
               "quantization": kind or (index_by.get(m["name"]) or {}).get("quantization"),
               "bytes": m["bytes"], "scored": True}
        try:
            feeds = batch.feeds
            if mspec is not None and mspec.to_json() != spec.to_json():
                # the model hashes its inputs differently: re-read the same rows with its spec
                feeds = evaluation_rows(manifest, data_path, mspec, max_rows=max_rows, data_sha256=sha)[0].feeds
            preds[m["name"]] = ort_predict(Path(m["path"]), feeds)
        except Exception as exc:  # any failure of one model is reported, the others still run
            row.update(scored=False, error=f"{type(exc).__name__}: {exc}")
            log.warning("accuracy: %s could not be scored: %s", m["name"], row["error"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    for name, e in index_by.items():  # listed by compress all but not written (over budget)
        if name not in {r["name"] for r in rows}:
            rows.append({"name": name, "kind": "onnx", "version": e.get("version"), "path": None,
                         "quantization": e.get("quantization"), "bytes": e.get("size_bytes"), "scored": False,
                         "error": "not written by compress all (over budget); index figures only",
                         "index_auc": e.get("test_auc"), "index_dauc": e.get("dauc")})
    if reference not in preds:
        raise ArtifactError(f"the reference model {reference} could not be scored: "
                            + next((r.get("error", "") for r in rows if r["name"] == reference), ""))

    rows.sort(key=lambda r: (r["name"] != reference, model_order(r["name"])))
    p_ref = preds[reference]
    ref_auc = M.auc(labels, p_ref)
    for row in rows:
        name = row["name"]
        e = index_by.get(name) or {}
        row["within_budget"] = e.get("within_budget")
        row.setdefault("index_dauc", e.get("dauc"))
        row["x_fp32_bytes"] = (row["bytes"] / fp32_bytes) if (fp32_bytes and row.get("bytes")) else None
        if name not in preds:
            continue
        p = preds[name]
        s = M.summary(labels, p)
        if name == reference:
            d = M.PairedDelta(0.0, 0.0, 0.0, 0)
        else:
            d = M.paired_bootstrap_auc_delta(labels, p_ref, p, resamples=bootstrap, confidence=confidence,
                                             seed=seed)
        pct = 100.0 * s["auc"] / ref_auc if ref_auc else float("nan")
        row.update(auc=s["auc"], dauc=d.delta, dauc_ci=[d.low, d.high], logloss=s["logloss"],
                   calibration=s["calibration"], mean_prediction=s["mean_prediction"],
                   click_rate=s["click_rate"], normalized_entropy=s["normalized_entropy"],
                   pct_of_full_auc=pct, mlperf_99=bool(pct >= MLPERF_LINES[0]),
                   mlperf_99_9=bool(pct >= MLPERF_LINES[1]),
                   max_abs_diff_vs_reference=float(np.max(np.abs(p - p_ref))))
        log.info("accuracy: %-17s AUC %.5f  dAUC %+.5f [%+.5f, %+.5f]  logloss %.5f  calib %.3f  %s bytes",
                 name, s["auc"], d.delta, d.low, d.high, s["logloss"], s["calibration"], f"{row['bytes']:,}")

    return {
        "reference": reference, "reference_note": reference_note, **info,
        "click_rate": float(labels.mean()), "bootstrap": int(bootstrap), "confidence": confidence,
        "seed": int(seed), "bayes_auc": truth["bayes_auc"] if truth else None, "truth": truth,
        "budget": ((index or {}).get("reference") or {}).get("budget"),
        "index": str(Path(repository) / "index.json") if index is not None else None,
        "repository": str(repository), "trained": str(trained_dir) if trained_dir is not None else None,
        "fp32_bytes": fp32_bytes, "mlperf_lines": list(MLPERF_LINES),
        "models": rows, "seconds": time.perf_counter() - t_start,
    }


__all__ = ["FULL_MODEL", "FP32_MODEL", "MLPERF_LINES", "accuracy_table", "evaluation_rows", "repository_models",
           "read_index", "truth_of", "model_order"]
