"""Training and evaluation: click logs -> a trained-model artifact folder.

``train(cfg, model_cfg)`` reads the data through the hub reader, fits a Keras
model (Adam, binary cross-entropy) with a progress bar showing running AUC and
logloss, stops early on the *exact* validation AUC (best weights restored),
scores the test rows with the hub's exact metrics and writes::

    OUT/model.keras          the Keras model
    OUT/feature_spec.json    the FeatureSpec
    OUT/train_config.json    TrainConfig
    OUT/model_config.json    ModelConfig
    OUT/manifest.json        data files (sha256), split, metrics, library versions

Later stages re-read exactly the same held-out rows from the manifest.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ctredge import metrics as M
from ctredge.artifacts import read_manifest, sha256_file, staged_dir, write_manifest
from ctredge.config import config_to_dict, load_config, save_config
from ctredge.errors import ConfigError, DataError
from ctredge.features import FeatureSpec
from ctredge.reader import SPLIT_NAMES, Batch, ReadStats, SplitSpec, read_all, resolve_spec, sidecar_path

log = logging.getLogger("ctredge.train")

MODEL_FILE = "model.keras"
SPEC_FILE = "feature_spec.json"
TRAIN_CONFIG_FILE = "train_config.json"
MODEL_CONFIG_FILE = "model_config.json"


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (saved as ``train_config.json``)."""

    data: tuple[str, ...]
    out: str
    valid: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    spec: str | None = None  # JSON path or "criteo"; default: <data>.spec.json
    criteo_buckets: int = 100_000
    batch_size: int = 1024
    epochs: int = 5
    learning_rate: float = 1e-3
    patience: int = 1
    seed: int = 0
    split_valid: float = 0.1
    split_test: float = 0.1
    shuffle_rows: int = 65_536
    max_memory_bytes: int = 1 << 30
    skip_bad_rows: bool = False
    verbose: int = 1

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("train: at least one --data file is required")
        for name in ("batch_size", "epochs", "shuffle_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train: {name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"train: learning_rate must be > 0, got {self.learning_rate}")
        if self.patience < 0:
            raise ConfigError(f"train: patience must be >= 0, got {self.patience}")
        if not self.valid and not 0 < self.split_valid < 1:
            raise ConfigError(f"train: without --valid, split_valid must be in (0, 1), got {self.split_valid}")
        if not self.test and not 0 < self.split_test < 1:
            raise ConfigError(f"train: without --test, split_test must be in (0, 1), got {self.split_test}")


def _split(cfg: TrainConfig) -> SplitSpec | None:
    """The deterministic split used for the parts not given as files (None if both are)."""
    if cfg.valid and cfg.test:
        return None
    return SplitSpec(seed=cfg.seed, valid=0.0 if cfg.valid else cfg.split_valid,
                     test=0.0 if cfg.test else cfg.split_test)


def data_plan(cfg: TrainConfig) -> dict[str, Any]:
    """Where train/valid/test rows come from: files and split (recorded in the manifest)."""
    split = _split(cfg)
    parts = {}
    for part, files in (("train", cfg.data), ("valid", cfg.valid), ("test", cfg.test)):
        if files and part != "train":
            parts[part] = {"paths": list(files), "split_part": None}
        else:
            parts[part] = {"paths": list(cfg.data), "split_part": part if split is not None else None}
    return {
        "parts": parts,
        "split": None if split is None else {"seed": split.seed, "valid": split.valid, "test": split.test},
    }


def read_part(plan: dict[str, Any], part: str, spec: FeatureSpec, *, skip_bad_rows: bool = False,
              stats: ReadStats | None = None) -> Batch:
    """Read one part (``train``/``valid``/``test``) of a :func:`data_plan` into memory."""
    info = plan["parts"][part]
    split = plan.get("split")
    sp = SplitSpec(**split) if (split and info["split_part"]) else None
    return read_all(info["paths"], spec, skip_bad_rows=skip_bad_rows, stats=stats,
                    split=sp, part=info["split_part"] if sp else None)


def read_parts(plan: dict[str, Any], spec: FeatureSpec, *, skip_bad_rows: bool = False,
               stats: ReadStats | None = None) -> dict[str, Batch]:
    """Read every part of a :func:`data_plan` into memory, each distinct file set once."""
    out: dict[str, Batch] = {}
    split = SplitSpec(**plan["split"]) if plan.get("split") else None
    groups: dict[tuple[str, ...], list[str]] = {}
    for part, info in plan["parts"].items():
        if info["split_part"] and split is not None:
            groups.setdefault(tuple(info["paths"]), []).append(part)
        else:
            out[part] = read_all(info["paths"], spec, skip_bad_rows=skip_bad_rows, stats=stats)
    for paths, parts in groups.items():
        rows = read_all(list(paths), spec, skip_bad_rows=skip_bad_rows, stats=stats)
        codes = split.codes(rows.file_no, rows.line_no)  # type: ignore[union-attr]
        for part in parts:
            out[part] = rows.take(codes == SPLIT_NAMES.index(plan["parts"][part]["split_part"]))
    return out


def predict(model: Any, feeds: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """Click probabilities ``[B]`` of a Keras model on a feed dict (no progress bar)."""
    if not len(next(iter(feeds.values()))):
        return np.zeros(0, dtype=np.float32)
    out = model.predict(feeds, batch_size=batch_size, verbose=0)
    if isinstance(out, dict):
        out = out["ctr"]
    return np.asarray(out, dtype=np.float32).reshape(-1)


def train(cfg: TrainConfig, model_cfg: Any = None) -> dict[str, Any]:
    """Train a model and write the artifact folder ``cfg.out``.

    Takes the train and model configs (model default: ``ModelConfig()``, dcnv2).
    Returns the manifest written.

    Raises:
        DataError: unreadable data, no spec, or an empty train/valid/test part.
        ConfigError: invalid settings.
    """
    from ctredge.train.data import Source, train_dataset
    from ctredge.train.models import ModelConfig, build_model, model_summary

    model_cfg = model_cfg or ModelConfig()
    spec = resolve_spec(cfg.data[0], cfg.spec, buckets=cfg.criteo_buckets)
    keras.utils.set_random_seed(cfg.seed)
    plan = data_plan(cfg)
    stats = ReadStats()
    t_read = time.perf_counter()
    tinfo = plan["parts"]["train"]
    streamed = sum(os.path.getsize(p) for p in tinfo["paths"]) > cfg.max_memory_bytes
    if streamed:
        valid = read_part(plan, "valid", spec, skip_bad_rows=cfg.skip_bad_rows, stats=stats)
        test = read_part(plan, "test", spec, skip_bad_rows=cfg.skip_bad_rows, stats=stats)
        split = SplitSpec(**plan["split"]) if plan["split"] and tinfo["split_part"] else None
        rows: Any = Source(tinfo["paths"], split, "train" if split else None)
        n_train = None
    else:
        parts = read_parts(plan, spec, skip_bad_rows=cfg.skip_bad_rows, stats=stats)
        rows, valid, test = parts["train"], parts["valid"], parts["test"]
        n_train = len(rows)
    for part, batch in (("valid", valid), ("test", test)):
        if len(batch) == 0 or batch.labels.min() == batch.labels.max():
            raise DataError(f"the {part} part has {len(batch)} rows and needs both clicks and non-clicks; "
                            f"give more data or a larger split fraction")
    ds = train_dataset(rows, spec, batch_size=cfg.batch_size, seed=cfg.seed,
                       shuffle_rows=cfg.shuffle_rows, skip_bad_rows=cfg.skip_bad_rows)
    log.info("data read in %.1fs: train %s rows, valid %d, test %d", time.perf_counter() - t_read,
             n_train if n_train is not None else "(streamed)", len(valid), len(test))

    model = build_model(spec, model_cfg)
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc", num_thresholds=1000),
                 keras.metrics.BinaryCrossentropy(name="logloss")],
    )
    exact = _ExactValidation(valid, cfg.verbose)
    stopper = keras.callbacks.EarlyStopping(monitor="val_auc_exact", mode="max", patience=cfg.patience,
                                            restore_best_weights=True, verbose=0)
    t0 = time.perf_counter()
    hist = model.fit(ds, epochs=cfg.epochs, callbacks=[exact, stopper], shuffle=False,
                     verbose=cfg.verbose)
    train_seconds = time.perf_counter() - t0
    epochs_run = len(hist.history.get("loss", []))
    best_epoch = int(np.argmax(exact.aucs)) + 1 if exact.aucs else epochs_run

    p_test = predict(model, test.feeds)
    test_m = M.summary(test.labels, p_test)
    p_valid = predict(model, valid.feeds)
    metrics = {
        "test_auc": test_m["auc"], "test_logloss": test_m["logloss"],
        "test_calibration": test_m["calibration"], "test_normalized_entropy": test_m["normalized_entropy"],
        "test_click_rate": test_m["click_rate"], "test_rows": len(test),
        "valid_auc": M.auc(valid.labels, p_valid), "valid_logloss": M.logloss(valid.labels, p_valid),
        "valid_rows": len(valid), "train_rows": n_train,
        "epochs": epochs_run, "best_epoch": best_epoch,
        "train_seconds": round(train_seconds, 2), "seconds_per_epoch": round(train_seconds / max(epochs_run, 1), 2),
        "history": {"val_auc": exact.aucs, "val_logloss": exact.loglosses,
                    "loss": [float(x) for x in hist.history.get("loss", [])]},
        "bad_rows_skipped": stats.bad_rows,
    }
    truth = _truth_for(cfg.data[0])
    if truth is not None:
        metrics["bayes_auc_file"] = truth.get("bayes_auc")
    data_info = _data_info(plan)
    with staged_dir(cfg.out) as tmp:
        model.save(tmp / MODEL_FILE)
        spec.save(str(tmp / SPEC_FILE))
        save_config(cfg, tmp / TRAIN_CONFIG_FILE)
        save_config(model_cfg, tmp / MODEL_CONFIG_FILE)
        manifest = write_manifest(
            tmp, stage="train",
            config={"train": config_to_dict(cfg), "model": config_to_dict(model_cfg)},
            metrics=metrics, data=data_info,
            signature={"inputs": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec.input_signature().items()},
                       "outputs": {"ctr": {"dtype": "float32", "shape": [None, 1]}}},
            extra={"params": model_summary(model), "model": model_cfg.model},
        )
    return manifest


def _truth_for(data_path: str) -> dict[str, Any] | None:
    import json

    path = sidecar_path(data_path, "truth")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return None


def _data_info(plan: dict[str, Any]) -> dict[str, Any]:
    files = sorted({p for part in plan["parts"].values() for p in part["paths"]})
    return {
        "files": [{"path": os.path.abspath(p), "sha256": sha256_file(p), "bytes": os.path.getsize(p)} for p in files],
        **plan,
    }


class _ExactValidation(keras.callbacks.Callback):
    """Exact validation AUC/logloss (the hub's metrics) at every epoch end, for early stopping."""

    def __init__(self, valid: Batch, verbose: int) -> None:
        super().__init__()
        self.valid = valid
        self.verbose = verbose
        self.aucs: list[float] = []
        self.loglosses: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        p = predict(self.model, self.valid.feeds)
        a, ll = M.auc(self.valid.labels, p), M.logloss(self.valid.labels, p)
        self.aucs.append(round(a, 6))
        self.loglosses.append(round(ll, 6))
        if logs is not None:
            logs["val_auc_exact"] = a
            logs["val_logloss_exact"] = ll
        if self.verbose:
            print(f"  epoch {epoch + 1}: valid AUC {a:.5f}  logloss {ll:.5f}", flush=True)


def load_trained(folder: str | os.PathLike[str]) -> tuple[Any, FeatureSpec, dict[str, Any]]:
    """Verify and load a trained artifact: ``(keras model, spec, manifest)``.

    Raises:
        ArtifactError: the folder is not a verified ``train`` (or ``prune``) artifact.
    """
    import ctredge.train.layers  # noqa: F401  (registers the custom layers)

    manifest = read_manifest(folder, stage=("train", "prune"))
    spec = FeatureSpec.load(str(Path(folder) / SPEC_FILE))
    model = keras.models.load_model(Path(folder) / MODEL_FILE)
    return model, spec, manifest


def evaluate(folder: str | os.PathLike[str], data: str | None = None, *, skip_bad_rows: bool = False) -> dict[str, float]:
    """AUC, logloss, calibration of a trained artifact on ``data`` (default: its test rows)."""
    model, spec, manifest = load_trained(folder)
    if data is None:
        batch = read_part(manifest["data"], "test", spec, skip_bad_rows=skip_bad_rows)
    else:
        batch = read_all(data, spec, skip_bad_rows=skip_bad_rows)
    if len(batch) == 0:
        raise DataError(f"no rows to evaluate in {data or 'the test split'}")
    return M.summary(batch.labels, predict(model, batch.feeds))


def load_train_config(folder: str | os.PathLike[str]) -> TrainConfig:
    return load_config(TrainConfig, Path(folder) / TRAIN_CONFIG_FILE)


