"""``ctredge compress all``: every compressed variant, judged by one accuracy budget.

From a trained artifact this builds the model repository the server reads::

    REPO/<name>/<version>/model.onnx   (+ manifest.json: parent, quantization, metrics)
    REPO/<name>/config.json            serving config (dynamic batching off where it changes answers)
    REPO/index.json                    {"models": [{name, version, source, quantization, size_bytes,
                                        rss_bytes, model_sha256, test_auc, test_logloss, ..., dauc,
                                        dauc_ci, within_budget, written}],
                                        "reference": {trained manifest hash, Keras figures, test rows,
                                        bootstrap settings, budget}}

(paths through :class:`ctredge.layout.RepositoryLayout`).  ``ctredge bench``
takes the figures from ``index.json`` when it describes the same rows and files.

=====================  ===============  =====================================
name                   from             quantization
=====================  ===============  =====================================
``ctr-fp32``           trained          none: the full model in ONNX
``ctr-fp16``           trained          fp16, fp32 I/O
``ctr-int8``           trained          int8 static QDQ + row-wise int8 embeddings
``ctr-int8-dynamic``   trained          int8 dynamic (per-batch activation scales)
``ctr-pruned``         pruned           none
``ctr-edge``           pruned           int8 static QDQ + row-wise int4 embeddings
=====================  ===============  =====================================

The budget: AUC of the variant minus AUC of the full *Keras* model on the
held-out test rows of the trained artifact's manifest, with a paired bootstrap
95% interval; a variant that loses more than ``budget`` is listed with
``within_budget: false`` and written only with ``allow_over_budget``.

The int8 gate: every static int8 variant (``ctr-int8``, ``ctr-edge``) is also
scored with ONNX Runtime's optimizations off, where QuantizeLinear /
DequantizeLinear run as float ops (:mod:`ctredge.compress.int8check`).  One whose
fused int8 predictions differ from that float simulation by more than
``int8_tolerance`` is refused (listed with ``refused``: the reason; not written,
whatever ``allow_over_budget`` says): its kernels break the quantization on this
CPU.  Its manifest's ``extra.int8`` and its index entry's ``int8`` record the
quantization config, both figures and AUCs, the int16 overflow fraction of its
U8S8 kernels on x86 without VNNI, and the ISA it was compressed on; the server
re-checks that ISA at load.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctredge import metrics as M
from ctredge.artifacts import manifest_hash, read_manifest, sha256_file, staged_dir, write_manifest
from ctredge.compress.int8check import DEFAULT_TOLERANCE
from ctredge.config import config_to_dict
from ctredge.errors import ConfigError
from ctredge.features import METADATA_KEY

log = logging.getLogger("ctredge.compress")

#: name -> (source: "full" | "pruned", quantization kind or None)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "ctr-fp32": ("full", None),
    "ctr-fp16": ("full", "fp16"),
    "ctr-int8": ("full", "int8-static+emb-int8"),
    "ctr-int8-dynamic": ("full", "int8-dynamic"),
    "ctr-pruned": ("pruned", None),
    "ctr-edge": ("pruned", "int8-static+emb-int4"),
}
#: the dAUC interval's confidence level
BOOTSTRAP_CONFIDENCE = 0.95
#: serving-config notes for variants whose answers depend on batch-mates
NO_BATCHING = {
    "ctr-int8-dynamic": "dynamic int8 computes activation scales per batch, so a row's answer changes "
                        "with its batch-mates; dynamic batching is off so answers do not depend on load",
}


@dataclass(frozen=True)
class CompressConfig:
    """Settings of ``compress all`` (saved in every variant's manifest)."""

    variants: tuple[str, ...] = tuple(VARIANTS)
    budget: float = 0.0005
    allow_over_budget: bool = False
    version: int = 1
    bootstrap: int = 200
    calibration_rows: int = 4096
    eval_rows: int = 0  # 0 = every held-out test row
    opset: int = 17
    sparsity: float = 0.5
    structured: float = 0.5
    vocab_min_count: int = 2
    prune_epochs: int = 2
    measure_rss: bool = True
    seed: int = 0
    #: max |fused int8 - float-simulated| probability on the test rows; over it an int8 variant is refused
    #: even with allow_over_budget (its kernels disagree with its own quantization); why 0.01: int8check
    int8_tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise ConfigError(f"compress all: unknown variant(s) {unknown or '(none given)'}; "
                              f"expected some of {list(VARIANTS)}")
        if not self.budget >= 0:
            raise ConfigError(f"compress all: budget must be >= 0, got {self.budget}")
        if not self.int8_tolerance >= 0:
            raise ConfigError(f"compress all: int8_tolerance must be >= 0, got {self.int8_tolerance}")
        if self.version < 1 or self.bootstrap < 10:
            raise ConfigError(f"compress all: version must be >= 1 and bootstrap >= 10, "
                              f"got {self.version} and {self.bootstrap}")


def _reusable(folder: Path, parent: str | os.PathLike[str]) -> bool:
    """An artifact folder that verifies and was made from exactly this parent."""
    try:
        m = read_manifest(folder)
    except Exception:  # any problem: rebuild it
        return False
    return (m.get("parent") or {}).get("manifest_sha256") == manifest_hash(parent)


def _prepare_sources(trained: Any, plan: Any, held: Any, work: Path, cfg: CompressConfig, need_pruned: bool,
                     force: bool) -> dict[str, Path]:
    """The ONNX exports the variants start from: the full model, and the pruned one when needed.

    An export (or the pruned artifact) that verifies and was made from exactly
    its parent is reused; otherwise it is made from the model in memory.
    """
    from ctredge.compress.prune import PruneConfig, prune_trained
    from ctredge.export.onnx import ExportConfig, export, export_model

    sources = {"full": work / "export-full"}
    if force or not _reusable(sources["full"], trained.folder):
        log.info("exporting the full model to ONNX")
        export_model(trained.model, trained.spec, trained.manifest, trained.folder, sources["full"],
                     ExportConfig(opset=cfg.opset, name="ctr-fp32"))
    if need_pruned:
        pruned = work / "pruned"
        pruned_model = None
        if force or not _reusable(pruned, trained.folder):
            log.info("pruning (sparsity %.2f, structured %.2f, vocab min count %d)",
                     cfg.sparsity, cfg.structured, cfg.vocab_min_count)
            pruned_manifest, pruned_model = prune_trained(
                trained, plan, held, pruned, PruneConfig(sparsity=cfg.sparsity, structured=cfg.structured,
                                                         vocab_min_count=cfg.vocab_min_count,
                                                         epochs=cfg.prune_epochs, seed=cfg.seed,
                                                         verbose=1 if sys.stdout.isatty() else 2))
        sources["pruned"] = work / "export-pruned"
        if force or pruned_model is not None or not _reusable(sources["pruned"], pruned):
            log.info("exporting the pruned model to ONNX")
            pcfg = ExportConfig(opset=cfg.opset, name="ctr-pruned")
            if pruned_model is None:
                export(pruned, sources["pruned"], pcfg)
            else:
                export_model(pruned_model, trained.spec, pruned_manifest, pruned, sources["pruned"], pcfg)
    return sources


def compress_all(trained_dir: str | os.PathLike[str], repo: str | os.PathLike[str],
                 cfg: CompressConfig | None = None, *, work_dir: str | os.PathLike[str] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """``ctredge compress all``: load a trained artifact and its rows, then :func:`compress_trained`.

    Returns the index dict written to ``REPO/index.json``.

    Raises:
        ArtifactError: the trained artifact fails verification or records no data plan.
        DataError: its data files are missing or changed since training.
        ValidationError: an export disagrees with Keras.
    """
    from ctredge.train.train import TrainedModel

    trained = TrainedModel.load(trained_dir)
    plan, held = trained.read_rows()
    return compress_trained(trained, plan, held, repo, cfg, work_dir=work_dir, force=force)


def compress_trained(trained: Any, plan: Any, held: Any, repo: str | os.PathLike[str],
                     cfg: CompressConfig | None = None, *, work_dir: str | os.PathLike[str] | None = None,
                     force: bool = False) -> dict[str, Any]:
    """Build every variant of ``cfg.variants`` of a trained model already in memory into the repository ``repo``.

    Takes the :class:`ctredge.train.train.TrainedModel`, its verified
    :class:`ctredge.dataplan.DataPlan` and the rows read from it (a
    :class:`ctredge.dataplan.HeldOut`), the repository folder, the config, the
    work folder for the exports and the pruned artifact (default
    ``REPO-work`` beside the repository) and whether to redo reusable ones.
    Each variant is scored against the Keras model on the test rows; one that
    loses more than the budget is listed with ``within_budget: false`` and
    written only with ``allow_over_budget``; a static int8 variant over the
    fused-vs-simulated ``int8_tolerance`` is refused (module docstring).
    Returns the index dict written to ``REPO/index.json``.

    Raises:
        ValidationError: an export disagrees with Keras.
    """
    from ctredge.compress.quantize import quantize, save_model
    from ctredge.compress.scoring import ort_predict, session_rss_bytes
    from ctredge.export.onnx import set_metadata
    from ctredge.layout import RepositoryLayout
    from ctredge.train.loop import keras_predict

    cfg = cfg or CompressConfig()
    layout = RepositoryLayout(repo)
    work = Path(work_dir) if work_dir else layout.root.parent / f"{layout.root.name}-work"
    test, valid = held.test, held.valid
    if cfg.eval_rows:
        test = test.take(np.arange(min(cfg.eval_rows, len(test))))
    calib = valid.take(np.arange(min(cfg.calibration_rows, len(valid))))
    calibration = [calib.take(np.arange(i, min(i + 256, len(calib)))).feeds for i in range(0, len(calib), 256)]
    log.info("held-out rows: %d test, %d calibration", len(test), len(calib))
    p_ref = keras_predict(trained.model, test.feeds)
    ref = M.summary(test.labels, p_ref)
    need_pruned = any(VARIANTS[v][0] == "pruned" for v in cfg.variants)
    sources = _prepare_sources(trained, plan, held, work, cfg, need_pruned, force)

    layout.root.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in cfg.variants:
        source, kind = VARIANTS[name]
        t0 = time.perf_counter()
        src_path = sources[source] / "model.onnx"
        proto = _load_onnx(src_path) if kind is None else quantize(src_path, kind, calibration)
        set_metadata(proto, {"ctredge.model_name": name, "ctredge.model_version": str(cfg.version),
                             "ctredge.quantization": kind or "none"})
        p = ort_predict(proto, test.feeds)
        entry = _score(name, source, kind, p, p_ref, test.labels, cfg)
        int8 = None
        if kind is not None and "int8-static" in kind.split("+"):
            int8 = int8_record(proto, test.feeds, test.labels, p, calib.feeds, cfg.int8_tolerance)
            entry["int8"] = {k: v for k, v in int8.items() if k != "layers"}
            if not int8["within_tolerance"]:
                entry["written"] = False
                entry["refused"] = (f"fused int8 output differs from its float simulation by "
                                    f"{int8['fused_vs_simulated']['max_abs_diff']:.4f} (tolerance "
                                    f"{cfg.int8_tolerance}) on {int8['isa']['model_name']}")
        if entry["written"]:
            final = layout.version_dir(name, cfg.version)
            with staged_dir(final) as tmp:
                save_model(proto, tmp / "model.onnx")
                write_manifest(tmp, stage="variant", config=config_to_dict(cfg), parent=sources[source],
                               metrics={**entry, "reference_keras_auc": ref["auc"], "test_rows": len(test)},
                               data=trained.manifest["data"],
                               extra={"budget": cfg.budget, **({"int8": int8} if int8 is not None else {})})
            _write_serving_config(layout.model_dir(name), name)
            entry["size_bytes"] = layout.version_bytes(name, cfg.version)
            entry["model_sha256"] = sha256_file(layout.model_path(name, cfg.version))
            entry["rss_bytes"] = session_rss_bytes(layout.model_path(name, cfg.version)) if cfg.measure_rss else None
        elif entry.get("refused"):
            log.warning("%s refused: %s; not written", name, entry["refused"])
            entry["size_bytes"] = len(proto.SerializeToString())
            entry["rss_bytes"] = None
        else:
            log.warning("%s loses %.5f AUC (budget %.5f): not written (use --allow-over-budget)",
                        name, -entry["dauc"], cfg.budget)
            entry["size_bytes"] = len(proto.SerializeToString())
            entry["rss_bytes"] = None
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("%-17s %9s bytes  AUC %.5f  dAUC %+.5f [%+.5f, %+.5f]  %s", name, f"{entry['size_bytes']:,}",
                 entry["test_auc"], entry["dauc"], *entry["dauc_ci"],
                 "within budget" if entry["within_budget"] else "OVER BUDGET")
        entries.append(entry)
    index = {"models": entries, "reference": {
        "trained": str(trained.folder), "keras_test_auc": ref["auc"], "keras_summary": ref,
        "test_rows": len(test), "budget": cfg.budget, "bootstrap": cfg.bootstrap, "seed": cfg.seed,
        "confidence": BOOTSTRAP_CONFIDENCE, "trained_manifest_sha256": manifest_hash(trained.folder),
        "feature_spec_key": METADATA_KEY, "int8_tolerance": cfg.int8_tolerance}}
    layout.write_index(index)
    return index


def _load_onnx(path: Path) -> Any:
    import onnx

    return onnx.load(str(path))


def _score(name: str, source: str, kind: str | None, p: np.ndarray, p_ref: np.ndarray, labels: np.ndarray,
           cfg: CompressConfig) -> dict[str, Any]:
    """A variant's index entry: its test figures, its paired-bootstrap dAUC against Keras, the budget verdict."""
    delta = M.paired_bootstrap_auc_delta(labels, p_ref, p, resamples=cfg.bootstrap, seed=cfg.seed,
                                         confidence=BOOTSTRAP_CONFIDENCE)
    within = -delta.delta <= cfg.budget
    summary = M.summary(labels, p)
    return {
        "name": name, "version": cfg.version, "source": source, "quantization": kind or "none",
        "test_auc": summary["auc"], "test_logloss": summary["logloss"],
        "test_calibration": summary["calibration"], "mean_prediction": summary["mean_prediction"],
        "click_rate": summary["click_rate"], "normalized_entropy": summary["normalized_entropy"],
        "dauc": delta.delta, "dauc_ci": [delta.low, delta.high], "within_budget": bool(within),
        "max_abs_diff_vs_keras": float(np.max(np.abs(p - p_ref))),
        "written": bool(within or cfg.allow_over_budget),
    }


def int8_record(proto: Any, feeds: Any, labels: np.ndarray, p_fused: np.ndarray, calib_feeds: Any,
                tolerance: float) -> dict[str, Any]:
    """What a static int8 variant's manifest records: config, ISA, fused-vs-simulated figures, int16 overflow.

    Takes the quantized model, the test feeds and labels, its fused predictions
    on them, the calibration feeds (for the overflow measurement) and the
    tolerance.  Returns ``{"config", "isa", "fused_vs_simulated", "tolerance",
    "within_tolerance", "overflow_fraction", "saturation_kernel", "layers",
    "may_saturate_without_vnni"}`` (:mod:`ctredge.compress.int8check`).
    """
    from ctredge.compress.int8check import fused_vs_simulated, saturation_risk
    from ctredge.compress.qconfig import METADATA_QUANTIZATION_CONFIG
    from ctredge.cpuinfo import cpu_isa
    from ctredge.export.onnx import read_metadata

    fused = fused_vs_simulated(proto, feeds, labels, p_fused=p_fused)
    risk = saturation_risk(proto, calib_feeds)
    frac = risk["overflow_fraction"]
    return {"config": json.loads(read_metadata(proto).get(METADATA_QUANTIZATION_CONFIG, "{}")), "isa": cpu_isa(),
            "fused_vs_simulated": fused, "tolerance": tolerance,
            "within_tolerance": bool(fused["max_abs_diff"] <= tolerance), "overflow_fraction": frac,
            "saturation_kernel": risk["kernel"], "layers": risk["layers"],
            "may_saturate_without_vnni": frac is None or frac > 0}


def _write_serving_config(model_dir: Path, name: str) -> None:
    from ctredge.serving_config import DynamicBatching, ServingConfig, write_serving_config

    write_serving_config(model_dir, ServingConfig(dynamic_batching=DynamicBatching(enabled=name not in NO_BATCHING),
                                                  notes=NO_BATCHING.get(name, "")))
