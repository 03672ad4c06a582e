"""Training and evaluation: click logs -> a trained-model artifact folder.

``train(cfg, model_cfg)`` builds the :class:`ctredge.dataplan.DataPlan` of its
files, reads the rows through the hub reader, fits a Keras model with the one
training loop (:mod:`ctredge.train.loop`: early stopping on the *exact*
validation AUC, best weights restored), scores the test rows with the hub's
exact metrics and writes::

    OUT/model.keras          the Keras model
    OUT/feature_spec.json    the FeatureSpec
    OUT/train_config.json    TrainConfig
    OUT/model_config.json    ModelConfig
    OUT/manifest.json        the data plan (files with sha256, parts, split), metrics, library versions

Later stages re-read exactly the same held-out rows from the manifest's plan.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ctredge import metrics as M
from ctredge.artifacts import read_manifest, staged_dir, write_manifest
from ctredge.config import config_to_dict, load_config, save_config
from ctredge.dataplan import DataPlan, HeldOut
from ctredge.errors import ConfigError, DataError
from ctredge.features import FeatureSpec
from ctredge.reader import ReadStats, read_all, resolve_spec, sidecar_path
from ctredge.train.loop import compile_ctr, fit, keras_predict, score

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
    batch_size: int = 256
    epochs: int = 5
    learning_rate: float = 2e-3
    lr_decay_epochs: int = 1  # cosine decay to LR_FLOOR x the rate over this many epochs, then flat (0 = constant)
    patience: int = 1
    seed: int = 0
    split_valid: float = 0.1
    split_test: float = 0.1
    shuffle_rows: int = 65_536
    max_memory_bytes: int = 1 << 30
    skip_bad_rows: bool = False
    verbose: int = 1
    min_count: int = 5  # ids seen fewer times in the training rows share their feature's row 0 (1 = all kept)
    dp_epsilon: float | None = None  # DP-SGD to this epsilon (ctredge.train.dp); None = ordinary training
    dp_delta: float | None = None  # None: 1/n_train rounded down to a power of ten
    # DP-SGD's own optimisation settings, chosen by valid AUC on the demo data (README, Differential privacy):
    # Adam normalises each coordinate by its noise and moves every embedding row about one learning rate per
    # step in a random direction, so DP-SGD uses SGD with momentum, large Poisson batches and a wide clip
    # (chosen in scratch runs at epsilon 8, one epoch, by valid AUC: Adam < SGD < SGD + momentum, clip 30 over
    # 10 and 100; those runs are not kept, so no figures are cited; the kept figures: README, "Differential privacy")
    dp_clip: float = 30.0  # per-example gradient L2 clipping norm
    dp_batch_size: int = 1024  # expected Poisson batch (q = dp_batch_size / n_train); replaces batch_size
    dp_learning_rate: float = 0.03
    dp_momentum: float = 0.9
    text: bool = True  # use the spec's text features (False: the same rows, a model without them)
    text_encoder: str = ""  # encoder folder (model.onnx + tokenizer.json) for a spec with text features

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("train: at least one --data file is required")
        if isinstance(self.lr_decay_epochs, bool) or not isinstance(self.lr_decay_epochs, int) or self.lr_decay_epochs < 0:
            raise ConfigError(f"train: lr_decay_epochs must be an integer >= 0, got {self.lr_decay_epochs!r}")
        for name in ("batch_size", "epochs", "shuffle_rows", "min_count"):
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
        if self.dp_epsilon is not None:
            from ctredge.train.dp import check_settings

            check_settings(self.dp_epsilon, self.dp_delta, self.dp_clip)
            if isinstance(self.dp_batch_size, bool) or not isinstance(self.dp_batch_size, int) or self.dp_batch_size < 1:
                raise ConfigError(f"train: dp_batch_size must be an integer >= 1, got {self.dp_batch_size!r}")
            if not self.dp_learning_rate > 0 or not 0 <= self.dp_momentum < 1:
                raise ConfigError(f"train: dp_learning_rate must be > 0 and dp_momentum in [0, 1), got "
                                  f"{self.dp_learning_rate!r} and {self.dp_momentum!r}")


def data_plan(cfg: TrainConfig) -> DataPlan:
    """Where this run's train/valid/test rows come from (files hashed; recorded in the manifest).

    Raises:
        DataError: a data file is missing.
    """
    return DataPlan.from_files(cfg.data, cfg.valid, cfg.test, seed=cfg.seed, split_valid=cfg.split_valid,
                               split_test=cfg.split_test)


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
    from ctredge.train.wide import SELECT_MIN_VALID_ROWS, fit_wide, wide_layer

    model_cfg = model_cfg or ModelConfig()
    if cfg.dp_epsilon is not None:
        from ctredge.train import dp

        cfg, model_cfg = dp.private_configs(cfg, model_cfg)
    spec = resolve_spec(cfg.data[0], cfg.spec, buckets=cfg.criteo_buckets)
    if spec.text and not cfg.text:
        spec = spec.without_text()   # the reader still drops the text columns
    if spec.text and not cfg.text_encoder:
        raise ConfigError(f"train: the spec has text features {[t.name for t in spec.text]}: give the encoder "
                          f"folder (--text-encoder REPO/text-encoder/1, python -m ctredge.export.text_encoder) or "
                          f"train without them (--no-text)")
    keras.utils.set_random_seed(cfg.seed)
    plan = data_plan(cfg)
    stats = ReadStats()
    t_read = time.perf_counter()
    held = plan.read_held_out(spec, max_memory_bytes=cfg.max_memory_bytes, skip_bad_rows=cfg.skip_bad_rows,
                              stats=stats)
    valid, test = held.valid, held.test
    text_cfg = None
    if spec.text:
        if held.streamed:
            raise ConfigError("train: text features need the training rows in memory (raise --max-memory-bytes "
                              "or use fewer rows)")
        text_cfg, model_cfg = _prepare_text(spec, model_cfg, cfg.text_encoder, held)
    rows: Any = held.train if not held.streamed else Source(*plan.source("train"))
    n_train = None if held.streamed else len(held.train)  # type: ignore[arg-type]
    ds = train_dataset(rows, spec, batch_size=cfg.batch_size, seed=cfg.seed,
                       shuffle_rows=cfg.shuffle_rows, skip_bad_rows=cfg.skip_bad_rows)
    log.info("data read in %.1fs: train %s rows, valid %d, test %d", time.perf_counter() - t_read,
             n_train if n_train is not None else "(streamed)", len(valid), len(test))

    train_rows = held.train if not held.streamed else Source(*plan.source("train"))
    remap = None
    if cfg.min_count > 1:
        remap, model_cfg = training_vocabulary(spec, model_cfg, train_rows, cfg.min_count, cfg.skip_bad_rows)
    model = build_model(spec, model_cfg)
    if remap is not None:
        set_remap(model, remap)
    fill_data_layers(model, spec, train_rows, skip_bad_rows=cfg.skip_bad_rows)
    if text_cfg is not None:
        from ctredge.train.text import fill_title_table

        fill_title_table(model, text_cfg.pop("ids"), text_cfg.pop("embeddings"))
    screen = model_cfg.wide and model_cfg.wide_select and model_cfg.wide_pairs is None \
        and wide_layer(model) is not None and bool(wide_layer(model).pairs)
    if screen and len(valid) < SELECT_MIN_VALID_ROWS:
        log.info("wide part: every pair crossed: the pair screen needs >= %d valid rows, this data has %d",
                 SELECT_MIN_VALID_ROWS, len(valid))
        screen = False
    if screen:
        model, model_cfg, wide = screened_wide_part(model, spec, model_cfg, train_rows, valid)
    else:
        wide = fit_wide(model, spec, train_rows, valid)
    if cfg.dp_epsilon is not None:
        compile_ctr(model, cfg.dp_learning_rate, optimizer=dp.optimizer(cfg))
    else:
        compile_ctr(model, learning_rate_schedule(cfg, n_train))
    dp_record = None
    if cfg.dp_epsilon is not None:
        fitted, dp_record = dp.train_private(model, held, cfg, say=_epoch_line if cfg.verbose else None)
    else:
        fitted = fit(model, ds, valid, epochs=cfg.epochs, patience=cfg.patience, verbose=cfg.verbose,
                     say=_epoch_line if cfg.verbose else None)
    metrics = {
        **score(model, valid, test), "test_rows": len(test), "valid_rows": len(valid), "train_rows": n_train,
        "epochs": fitted.epochs, "best_epoch": fitted.best_epoch or fitted.epochs,
        "train_seconds": round(fitted.seconds, 2),
        "seconds_per_epoch": round(fitted.seconds / max(fitted.epochs, 1), 2),
        "history": {"val_auc": fitted.val_auc, "val_logloss": fitted.val_logloss, "loss": fitted.loss},
        "bad_rows_skipped": stats.bad_rows,
    }
    if wide is not None:
        metrics["wide"] = wide
    if dp_record is not None:
        metrics["dp"] = dp_record
    if text_cfg is not None:
        metrics["text"] = text_cfg
    truth = _truth_for(cfg.data[0])
    if truth is not None:
        metrics["bayes_auc_file"] = truth.get("bayes_auc")
    with staged_dir(cfg.out) as tmp:
        model.save(tmp / MODEL_FILE)
        spec.save(str(tmp / SPEC_FILE))
        save_config(cfg, tmp / TRAIN_CONFIG_FILE)
        save_config(model_cfg, tmp / MODEL_CONFIG_FILE)
        manifest = write_manifest(
            tmp, stage="train",
            config={"train": config_to_dict(cfg), "model": config_to_dict(model_cfg)},
            metrics=metrics, data=plan.to_manifest(),
            signature={"inputs": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec.input_signature().items()},
                       "outputs": {"ctr": {"dtype": "float32", "shape": [None, 1]}}},
            extra={"params": model_summary(model), "model": model_cfg.model},
        )
    return manifest


def _prepare_text(spec: FeatureSpec, model_cfg: Any, encoder_dir: str, held: Any) -> tuple[dict[str, Any], Any]:
    """Encode the text of the held rows: query embeddings into every part's feeds, the training titles.

    Returns ``({"ids", "embeddings", figures...}, model_cfg with text_rows)``; the
    title table is filled from the training rows only.
    """
    import dataclasses

    from ctredge.artifacts import manifest_hash
    from ctredge.errors import ArtifactError
    from ctredge.textenc import SentenceEncoder
    from ctredge.train.text import add_query_embeddings, title_rows

    t0 = time.perf_counter()
    encoder = SentenceEncoder(encoder_dir, intra_op_threads=min(2, os.cpu_count() or 1))
    add_query_embeddings(spec, [held.train, held.valid, held.test], encoder)
    t_query = time.perf_counter() - t0
    ids, titles = title_rows(spec, held.train)
    embeddings = encoder.encode(titles)
    try:
        manifest_sha = manifest_hash(encoder_dir)
    except (ArtifactError, OSError):  # an encoder folder without a manifest (tests build tiny ones)
        manifest_sha = None
    log.info("text: queries encoded in %.1fs, %d titles in %.1fs", t_query, len(ids),
             time.perf_counter() - t0 - t_query)
    figures = {"encoder": os.path.abspath(encoder_dir), "encoder_manifest_sha256": manifest_sha,
               "titles": int(len(ids)),
               "dim": int(encoder.dim), "encode_seconds": round(time.perf_counter() - t0, 1)}
    return {"ids": ids, "embeddings": embeddings, **figures}, dataclasses.replace(model_cfg, text_rows=len(ids) + 1)


#: the cosine decay ends at this fraction of the learning rate
LR_FLOOR = 0.05
#: the decay takes at least this many steps: on a small log an epoch is a few steps, too few to learn in
MIN_DECAY_STEPS = 500


def learning_rate_schedule(cfg: TrainConfig, n_train: int | None) -> Any:
    """The learning rate: cosine decay from ``learning_rate`` to ``LR_FLOOR`` of it over ``lr_decay_epochs``.

    Deep CTR models overfit from their second pass over the ids (the "one-epoch
    phenomenon", Zhang et al., CIKM 2022): the most is learned in the first epoch,
    and letting its rate fall to near zero by the end of it gave +0.006 test AUC on
    the demo data over a constant rate (README, "Training recipe").  Returns a float
    (constant) when decay is off or the training rows are streamed (count unknown).
    The decay lasts at least :data:`MIN_DECAY_STEPS` steps (a 1,000-row log has 3 per epoch).
    """
    if not cfg.lr_decay_epochs or not n_train:
        return cfg.learning_rate
    steps = max(cfg.lr_decay_epochs * -(-n_train // cfg.batch_size), MIN_DECAY_STEPS)
    return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, steps, alpha=LR_FLOOR)


def _batches(rows: Any, spec: FeatureSpec, skip_bad_rows: bool) -> Any:
    return [rows] if hasattr(rows, "feeds") else rows.batches(spec, 65_536, skip_bad_rows)


def training_vocabulary(spec: FeatureSpec, model_cfg: Any, rows: Any, min_count: int,
                        skip_bad_rows: bool = False) -> tuple[Any, Any]:
    """The vocabulary of the training rows: ids seen fewer than ``min_count`` times go out of vocabulary.

    Returns ``(remap, model_cfg with vocab_rows)``: the int32 remap of
    :func:`ctredge.vocab.vocab_remap` (rare ids share their feature's row 0) and
    the config whose tables have only the kept rows.
    """
    import dataclasses

    from ctredge.vocab import count_rows, vocab_remap

    counts, _ = count_rows(_batches(rows, spec, skip_bad_rows), spec)
    remap, kept = vocab_remap(counts, spec, min_count)
    log.info("vocabulary: %d of %d embedding rows seen >= %d times in the training rows", len(kept),
             spec.total_buckets, min_count)
    return remap, dataclasses.replace(model_cfg, vocab_rows=int(len(kept)))


def screened_wide_part(model: Any, spec: FeatureSpec, model_cfg: Any, rows: Any, valid: Any) -> tuple[Any, Any, dict]:
    """The wide part with the pairs :func:`ctredge.train.wide.select_pairs` keeps, if that beats every pair on valid.

    Fits the wide part twice, crossing every pair and crossing the screened
    pairs, and keeps the one with the lower valid logloss (the screen's one-step
    gains are noisy on a small valid part, where it can drop pairs that help).
    Returns ``(model, model_cfg with wide_pairs, the fit record)``; the record's
    ``pairs`` holds the screen, the all-pairs fit and which was kept.
    """
    from ctredge.train.models import WIDE_LOGIT
    from ctredge.train.wide import fit_wide, select_pairs, wide_layer

    chosen, screen = select_pairs(model, spec, rows, valid)
    every = fit_wide(model, spec, rows, valid)
    screened_cfg = dataclasses.replace(model_cfg, wide_pairs=tuple(chosen))
    screened = rebuild_with(model, spec, screened_cfg, skip=(WIDE_LOGIT,))
    wide = fit_wide(screened, spec, rows, valid)
    keep = wide["valid_logloss"] <= every["valid_logloss"]
    screen["every_pair"] = {k: every[k] for k in ("C", "valid_auc", "valid_logloss")}
    screen["kept"] = "screened" if keep else "every pair"
    log.info("wide part: %s kept (valid logloss %.6f screened, %.6f every pair)", screen["kept"],
             wide["valid_logloss"], every["valid_logloss"])
    if not keep:
        every_cfg = dataclasses.replace(model_cfg, wide_pairs=tuple(range(len(wide_layer(model).pairs))))
        return model, every_cfg, {**every, "pairs": screen}
    return screened, screened_cfg, {**wide, "pairs": screen}


def rebuild_with(model: Any, spec: FeatureSpec, model_cfg: Any, skip: tuple[str, ...] = ()) -> Any:
    """A model built from ``model_cfg`` holding ``model``'s weights, layer by layer, except the layers in ``skip``.

    For a config change that alters no weight outside ``skip`` (the wide part's pairs).
    """
    from ctredge.train.models import build_model

    new = build_model(spec, model_cfg)
    for layer in model.layers:
        if layer.weights and layer.name not in skip:
            new.get_layer(layer.name).set_weights(layer.get_weights())
    return new


def set_remap(model: Any, remap: np.ndarray) -> None:
    """Put the vocabulary ``remap`` into every remapped ``SharedEmbedding`` of a freshly built model."""
    from ctredge.train.layers import SharedEmbedding

    for layer in model.layers:
        if isinstance(layer, SharedEmbedding) and layer.remap is not None:
            layer.remap.assign(remap.astype(np.int32))


#: rows of the training data the dense quantile edges are computed from (the first ones)
QUANTILE_ROWS = 1_000_000


def fill_data_layers(model: Any, spec: FeatureSpec, rows: Any, *, skip_bad_rows: bool = False) -> None:
    """Fill the statistics a model keeps from its training rows, for the layers it has.

    ``ItemAttributes`` (``history_attributes``): each item's most frequent
    category, brand, ... among the rows where it is the candidate.
    ``DenseBuckets`` (``dense_buckets``): the quantile edges of each dense feature
    (of the first :data:`QUANTILE_ROWS` rows).  Takes the model, the spec and the
    training rows (a :class:`~ctredge.reader.Batch` or a streamed ``Source``); one
    pass, keeping only the columns needed.
    """
    from ctredge.train.models import DENSE_BUCKETS, HISTORY_ATTRIBUTES, attribute_fields
    from ctredge.vocab import item_attribute_table, quantile_edges

    names = {layer.name for layer in model.layers}
    want_attr, want_dense = HISTORY_ATTRIBUTES in names, DENSE_BUCKETS in names
    if not (want_attr or want_dense):
        return
    item, fields = spec.item_feature_index, attribute_fields(spec)
    cols = [item, *fields] if want_attr else []
    cats, denses, n_dense = [], [], 0
    for b in _batches(rows, spec, skip_bad_rows):
        if want_attr:
            cats.append(b.feeds["cat"][:, cols])
        if want_dense and n_dense < QUANTILE_ROWS:
            denses.append(b.feeds["dense"][:QUANTILE_ROWS - n_dense])
            n_dense += len(denses[-1])
    if want_attr:
        table = item_attribute_table(np.concatenate(cats), 0, list(range(1, len(cols))), spec.cat[item].buckets)
        model.get_layer(HISTORY_ATTRIBUTES).set_weights([table])
        log.info("history attributes: %d item buckets with known %s", int((table[:, 0] > 0).sum()),
                 ", ".join(spec.cat[j].name for j in fields))
    if want_dense:
        layer = model.get_layer(DENSE_BUCKETS)
        edges = quantile_edges(np.concatenate(denses), layer.n_edges)
        layer.edges.assign(edges)
        log.info("dense buckets: %d quantile edges per feature from %d training rows", layer.n_edges, n_dense)


def _truth_for(data_path: str) -> dict[str, Any] | None:
    import json

    path = sidecar_path(data_path, "truth")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    return None


def _epoch_line(epoch: int, auc: float, logloss: float, eligible: bool) -> None:
    print(f"  epoch {epoch}: valid AUC {auc:.5f}  logloss {logloss:.5f}", flush=True)


@dataclass
class TrainedModel:
    """A verified ``train`` (or ``prune``) artifact in memory: what every later stage starts from.

    ``folder`` is where it was read; ``model`` the Keras model; ``manifest`` the
    verified manifest; ``model_config`` / ``train_config`` its configs.
    """

    folder: Path
    model: Any
    spec: FeatureSpec
    manifest: dict[str, Any]
    model_config: Any
    train_config: TrainConfig

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "TrainedModel":
        """Verify and load an artifact folder.  Raises what :func:`load_trained` raises."""
        from ctredge.train.models import ModelConfig

        model, spec, manifest = load_trained(folder)
        return cls(Path(folder), model, spec, manifest, load_config(ModelConfig, Path(folder) / MODEL_CONFIG_FILE),
                   load_config(TrainConfig, Path(folder) / TRAIN_CONFIG_FILE))

    @property
    def plan(self) -> DataPlan:
        """The data plan its manifest records.  Raises :class:`ArtifactError` when it records none."""
        return DataPlan.from_manifest(self.manifest.get("data"))

    def read_rows(self, train_files: tuple[str, ...] = ()) -> tuple[DataPlan, HeldOut]:
        """Its verified data plan and the rows read from it, as training read them (memory limit, bad rows).

        ``train_files`` gives the training files a new place (same content).

        Raises:
            ArtifactError: the manifest records no data plan.
            DataError: a data file is missing or changed since training, or a part is empty.
        """
        plan = self.plan.relocated(train_files) if train_files else self.plan
        plan = plan.verify()
        tc = self.train_config
        return plan, plan.read_held_out(self.spec, max_memory_bytes=tc.max_memory_bytes,
                                        skip_bad_rows=tc.skip_bad_rows)


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
        batch = DataPlan.from_manifest(manifest.get("data")).read("test", spec, skip_bad_rows=skip_bad_rows)
    else:
        batch = read_all(data, spec, skip_bad_rows=skip_bad_rows)
    if len(batch) == 0:
        raise DataError(f"no rows to evaluate in {data or 'the test split'}")
    return M.summary(batch.labels, keras_predict(model, batch.feeds))
