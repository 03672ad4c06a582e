"""Pruning of a trained Keras CTR model: vocabulary, structured and unstructured, fine-tuned.

``prune(trained_dir, out_dir, PruneConfig(...))`` reads a ``train`` (or ``prune``)
artifact, re-reads exactly its train/valid/test rows from the recorded data plan
and writes a ``prune`` artifact with the same layout (``model.keras``,
``feature_spec.json``, ``train_config.json``, ``model_config.json`` describing the
smaller architecture, ``prune_config.json``, ``manifest.json``), so
``load_trained`` and ``ctredge.export.onnx.export`` take it unchanged.  Pure
Keras 3: no tensorflow-model-optimization (legacy Keras only), no wrapper layers.

The steps, in order:

1. **Vocabulary** (``vocab_min_count`` = N > 0): every bucket of every categorical
   feature (and every non-padding history id, in the item feature's rows) is
   counted over the training rows; buckets seen fewer than N times collapse onto
   their feature's reserved row 0.  The embedding table keeps only the surviving
   rows and an int32 ``remap`` (global row -> new row) is gathered before it
   (``SharedEmbedding(kept_rows=...)``), so the ``cat`` input contract does not change.
2. **Structured** (``structured`` = f): each hidden layer of the deep MLP keeps
   its ``round((1 - f) * units)`` highest-scoring units.  A unit's score is
   ``||[w_in; b]||_2 * ||w_out||_2`` (incoming kernel column plus bias, times the
   outgoing kernel row): ReLU is positively homogeneous, so scaling a unit's
   incoming weights by ``c`` and its outgoing ones by ``1/c`` changes neither the
   function nor this product, while either norm alone would change.  DCN-v2's
   cross layers get rank ``r`` through a truncated SVD of ``W`` (``W ~= V U``,
   the Eckart-Young optimum): a full ``D x D`` kernel becomes rank
   ``round((1 - f) * D / 2)`` and a rank-``r`` one rank ``round((1 - f) * r)``,
   so a cross layer keeps about ``1 - f`` of its kernel parameters.  A physically
   smaller model is rebuilt with ``build_model`` and the surviving weights copied.
   The wide part (``wide_sparsity`` = w): its ``round(w * n)`` smallest-magnitude
   weights (ids, hashed crosses, dense buckets; never the bias or the match
   weights) are set to 0 at once.  They are fitted, non-trainable weights, so
   the fine-tuning of the deep part (with distillation) learns around them; a
   mostly-zero table is then stored as its non-zero rows
   (:mod:`ctredge.compress.sparse`).  Measured on the demo dcnv2 (valid AUC,
   no fine-tuning, ``python -m ctredge.benchmarks.prune_sweep``): 0.76353 at 0,
   0.76321 at 0.75, 0.76333 at 0.9.
3. **Unstructured** (``sparsity`` = s_f): the kernels of Dense, Conv1D, cross and
   attention layers with at least :data:`MIN_PRUNABLE` weights (never embeddings
   or biases) follow the polynomial schedule of Zhu & Gupta ("To prune, or not to
   prune", 2017), ``s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (T - t_0))**3``
   with ``s_i = 0``, during fine-tuning.  Every ``frequency`` steps each layer's
   mask is recomputed (its ``round(s_t * n)`` smallest ``|w|`` are zeroed, i.e.
   ``|w| >= `` the layer's threshold survive); between updates the mask is applied
   after every optimizer step through the variable's constraint, so pruned
   weights stay exactly 0.  At the end the masks are applied once more and
   dropped: the saved model holds plain layers with exact zeros.
4. **Fine-tuning with distillation from the parent**: the parent's click
   probabilities ``p_parent`` are predicted once on the training rows and the
   fine-tuning labels become ``alpha * y + (1 - alpha) * p_parent`` (binary
   cross-entropy takes soft labels).  Each ``alpha`` of ``distill_alphas`` is a
   full fine-tune from the same shrunk weights (Adam, fresh optimizer, same
   seed); once the schedule has reached its final sparsity, the exact
   validation AUC (``ctredge.metrics.auc``) of each epoch picks that run's best
   weights (early stopping with ``patience``).
5. **The best candidate on valid**: "epoch 0" (the shrunk weights with the
   final magnitude masks applied at once, no fine-tuning) and every alpha's
   best epoch compete on the validation AUC; the winner is kept.  The manifest
   records every candidate's valid AUC, the chosen ``alpha`` (None for epoch
   0) and the parent bar: the parent's valid AUC, the kept model's, and whether
   the kept model reached it (``metrics.parent_bar.kept``).  A pruned model
   never *is* the parent (it is smaller), so a loss is recorded and flagged by
   ``compress all``, not hidden.  The valid rows chose alpha and epoch, so the
   honest loss is measured on the test rows (or ``compress all --eval-data``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ctredge.artifacts import staged_dir, write_manifest
from ctredge.config import config_to_dict, save_config
from ctredge.dataplan import DataPlan, HeldOut
from ctredge.errors import ArtifactError, ConfigError, DataError
from ctredge.features import FeatureSpec
from ctredge.reader import Batch
from ctredge.vocab import count_rows, vocab_remap  # noqa: F401  (re-exported with the pruning API)
from ctredge.compress.magnitude import (  # noqa: F401  (re-exported: the pruning API in one place)
    MIN_PRUNABLE, MagnitudePruning, magnitude_mask, polynomial_sparsity, prunable_weights, sparsity_of,
)
from ctredge.train import layers as L

log = logging.getLogger("ctredge.compress")

PRUNE_CONFIG_FILE = "prune_config.json"


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one pruning run (saved as ``prune_config.json``).

    ``sparsity``: final fraction of zeros in each pruned kernel, in [0, 1).
    ``wide_sparsity``: fraction of the wide part's weights zeroed by magnitude, in [0, 1).
    ``structured``: fraction of hidden units removed from each MLP layer (and of
    cross-layer kernel parameters, by rank), in [0, 1).  ``cross_rank``: force
    this rank for DCN-v2's cross layers instead (0 = derive from ``structured``).
    ``vocab_min_count``: embedding buckets seen fewer times in the training rows
    share their feature's row 0 (0 = off).  ``epochs`` (0 = one-shot, no
    fine-tuning), ``batch_size``, ``learning_rate``, ``patience``: fine-tuning.
    ``begin_step`` / ``end_step`` / ``frequency``: the sparsity schedule in
    optimizer steps; ``end_step = -1`` ends the ramp after the first half of the
    epochs (``ceil(epochs / 2)``, at least one).  ``data``: click-log files that
    replace the training files recorded in the parent's manifest (same content,
    checked by sha256: e.g. the data moved).  ``seed``: shuffling and init.

    Raises:
        ConfigError: a value of the wrong type or out of range, naming the field,
            what was expected and what came.
    """

    sparsity: float = 0.5
    structured: float = 0.5
    vocab_min_count: int = 0
    cross_rank: int = 0
    wide_sparsity: float = 0.0
    epochs: int = 3
    batch_size: int = 1024
    learning_rate: float = 1e-3
    patience: int = 1
    begin_step: int = 0
    end_step: int = -1
    frequency: int = 100
    seed: int = 0
    data: tuple[str, ...] = ()
    verbose: int = 1
    #: weights of the hard label in the fine-tuning labels ``alpha*y + (1-alpha)*p_parent``; each is a fine-tune,
    #: the best on valid is kept (1.0 = no distillation).  Measured on the demo data (dcnv2, 2 epochs, valid AUC
    #: of each alpha's best epoch; parent 0.72055): 0 -> 0.72081, 0.25 -> 0.71808, 0.5 -> 0.71697, 1 -> 0.71245
    #: (``ctredge compress prune --distill-alphas 0,0.25,0.5,1``), so the two best are tried
    distill_alphas: tuple[float, ...] = (0.0, 0.25)

    def __post_init__(self) -> None:
        for name in ("sparsity", "structured", "wide_sparsity"):
            _check_fraction(name, getattr(self, name))
        _check_number("learning_rate", self.learning_rate, "a number > 0", lambda v: v > 0)
        for name, minimum in (("vocab_min_count", 0), ("cross_rank", 0), ("epochs", 0), ("batch_size", 1),
                              ("patience", 0), ("begin_step", 0), ("frequency", 1), ("end_step", -1),
                              ("seed", 0), ("verbose", 0)):
            _check_int(name, getattr(self, name), minimum)
        if self.end_step != -1 and self.end_step <= self.begin_step:
            raise ConfigError(f"prune: end_step: expected -1 (automatic) or an integer > begin_step="
                              f"{self.begin_step}, got {self.end_step!r}")
        if isinstance(self.data, (str, bytes)) or not isinstance(self.data, (tuple, list)) \
                or not all(isinstance(p, str) and p for p in self.data):
            raise ConfigError(f"prune: data: expected a list of file paths, got {self.data!r}")
        object.__setattr__(self, "data", tuple(self.data))
        alphas = self.distill_alphas
        if isinstance(alphas, (str, bytes)) or not isinstance(alphas, (tuple, list)) or not alphas:
            raise ConfigError(f"prune: distill_alphas: expected a non-empty list of numbers in [0, 1], got {alphas!r}")
        for a in alphas:
            _check_number("distill_alphas", a, "numbers in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        object.__setattr__(self, "distill_alphas", tuple(float(a) for a in alphas))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"prune: {name}: expected an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any, what: str, ok: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(value) or not ok(value):
        raise ConfigError(f"prune: {name}: expected {what}, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    _check_number(name, value, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)


# ---------------------------------------------------------------------- vocabulary
def _full_table(layer: Any) -> np.ndarray:
    """A SharedEmbedding's table as ``[total_buckets, dim]`` (undoing an earlier remap)."""
    table = layer.embeddings.numpy()
    return table if layer.remap is None else table[layer.remap.numpy()]


def _collapsed_rows(layer: Any, spec: FeatureSpec) -> np.ndarray:
    """Global rows an earlier vocabulary pruning already sent to their feature's row 0."""
    if layer.remap is None:
        return np.zeros(spec.total_buckets, dtype=bool)
    remap = layer.remap.numpy()
    collapsed = remap == remap[np.repeat(spec.offsets, spec.buckets)]
    collapsed[spec.offsets] = False
    return collapsed


# ---------------------------------------------------------------------- structured
def unit_scores(w_in: np.ndarray, b_in: np.ndarray, w_out: np.ndarray) -> np.ndarray:
    """Score of each hidden unit: ``||[w_in[:, k]; b_in[k]]||_2 * ||w_out[k, :]||_2``."""
    incoming = np.sqrt((w_in ** 2).sum(axis=0) + b_in ** 2)
    return incoming * np.linalg.norm(w_out, axis=1)


def _new_cross_rank(old_rank: int, dim: int, cfg: PruneConfig) -> int:
    if cfg.cross_rank:
        return cfg.cross_rank
    if not cfg.structured:
        return old_rank
    if old_rank:
        return max(1, int(round((1 - cfg.structured) * old_rank)))
    rank = max(1, int(round((1 - cfg.structured) * dim / 2)))
    return rank if 2 * dim * rank < dim * dim else 0  # low rank only when it is smaller


def _cross_weights(layer: Any, new_rank: int) -> list[np.ndarray]:
    """Weights of a rank-``new_rank`` cross layer approximating ``layer`` (truncated SVD)."""
    bias = layer.bias.numpy()
    if new_rank == layer.rank:
        return layer.get_weights()
    w = layer.kernel.numpy() if not layer.rank else layer.v.numpy() @ layer.u.numpy()
    if not new_rank:
        return [w, bias]
    p, s, qt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    r = min(new_rank, s.size)
    root = np.sqrt(s[:r])
    v = np.zeros((w.shape[0], new_rank))
    u = np.zeros((new_rank, w.shape[1]))
    v[:, :r], u[:r] = p[:, :r] * root, root[:, None] * qt[:r]
    return [v.astype(w.dtype), u.astype(w.dtype), bias]


def shrink(model: Any, spec: FeatureSpec, model_cfg: Any, cfg: PruneConfig,
           counts: np.ndarray | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """Vocabulary + structured pruning, one shot, no training.

    Takes the trained Keras model, its spec and ModelConfig, the PruneConfig and
    the training-row counts of every global embedding row (needed when
    ``vocab_min_count`` > 0).  Returns ``(smaller model, its ModelConfig, report)``;
    the report lists the kept units, ranks and embedding rows.

    Raises:
        ArtifactError: the model does not have the layers its ModelConfig describes.
        ConfigError: ``vocab_min_count`` > 0 without counts.
    """
    from ctredge.train.models import CROSS_LAYER, build_model, mlp_chain

    changes: dict[str, Any] = {}
    report: dict[str, Any] = {}
    tables = [layer for layer in model.layers if isinstance(layer, L.SharedEmbedding)]
    remap = kept = None
    if tables:
        before_rows = int(tables[0].embeddings.shape[0])
        if cfg.vocab_min_count:
            if counts is None:
                raise ConfigError("prune: vocab_min_count > 0 needs the training-row counts")
            counts = np.where(_collapsed_rows(tables[0], spec), 0, counts)
            remap, kept = vocab_remap(counts, spec, cfg.vocab_min_count)
            changes["vocab_rows"] = int(kept.size) if kept.size < spec.total_buckets else 0
            if not changes["vocab_rows"]:
                remap = kept = None
        after_rows = before_rows if not cfg.vocab_min_count else (
            int(kept.size) if kept is not None else spec.total_buckets)
        report["vocab_rows"] = {"before": before_rows, "after": after_rows, "buckets": spec.total_buckets}

    mlp = mlp_chain(model_cfg)
    field, units = mlp.field, mlp.units
    keeps: list[np.ndarray] = []
    for i, u in enumerate(units):
        layer = _layer(model, mlp.hidden[i])
        nxt = _layer(model, mlp.hidden[i + 1] if i + 1 < len(units) else mlp.next_layer)
        w_in, b_in = layer.get_weights()
        if keeps:
            w_in = w_in[keeps[-1]]
        n_keep = max(1, u - int(round(u * cfg.structured)))
        scores = unit_scores(w_in, b_in, nxt.get_weights()[0])
        keeps.append(np.sort(np.argsort(-scores, kind="stable")[:n_keep]))
    changes[field] = tuple(int(k.size) for k in keeps)
    report["units"] = {"before": list(units), "after": list(changes[field])}

    if model_cfg.model == "dcnv2" and model_cfg.cross_layers:
        dim = int(_layer(model, CROSS_LAYER.format(0)).bias.shape[0])
        changes["cross_rank"] = _new_cross_rank(model_cfg.cross_rank, dim, cfg)
        report["cross_rank"] = {"before": model_cfg.cross_rank, "after": changes["cross_rank"], "width": dim}

    new_cfg = dataclasses.replace(model_cfg, **changes)
    new_model = build_model(spec, new_cfg)
    chain = {name: i for i, name in enumerate(mlp.hidden)}
    if units:
        chain[mlp.next_layer] = len(units)
    for layer in model.layers:
        if not layer.weights:
            continue
        target = _layer(new_model, layer.name)
        if isinstance(layer, L.SharedEmbedding):
            if not cfg.vocab_min_count:  # the parent's table (and remap, if any) as they are
                weights = layer.get_weights()
            else:
                table = _full_table(layer)
                weights = [table] if kept is None else [table[kept], remap]
        elif isinstance(layer, L.CrossLayer):
            weights = _cross_weights(layer, target.rank)
        elif layer.name in chain:
            i = chain[layer.name]
            w, b = layer.get_weights()
            if i > 0:
                w = w[keeps[i - 1]]
            if i < len(keeps):
                w, b = w[:, keeps[i]], b[keeps[i]]
            weights = [w, b]
        else:
            weights = layer.get_weights()
        want = [tuple(v.shape) for v in target.weights]
        if [tuple(w.shape) for w in weights] != want:
            raise ArtifactError(f"layer {layer.name!r}: weights of shapes {[w.shape for w in weights]} do not "
                                f"fit the rebuilt layer's {want}; does model_config.json describe model.keras?")
        target.set_weights(weights)
    report["wide"] = prune_wide(new_model, cfg.wide_sparsity)
    return new_model, new_cfg, report


def prune_wide(model: Any, sparsity: float) -> dict[str, Any] | None:
    """Zero the ``round(sparsity * n)`` smallest-magnitude weights of the model's wide table (in place).

    Returns ``{"weights", "nonzero_before", "nonzero_after", "sparsity"}``, or None
    when the model has no wide part or ``sparsity`` is 0.
    """
    from ctredge.train.wide import wide_layer

    layer = wide_layer(model)
    if layer is None or not sparsity:
        return None
    table = layer.table.numpy()
    kept = np.where(magnitude_mask(table, sparsity), table, np.zeros_like(table))
    layer.table.assign(kept)
    return {"weights": int(table.size), "nonzero_before": int(np.count_nonzero(table)),
            "nonzero_after": int(np.count_nonzero(kept)), "sparsity": float(sparsity)}


def _layer(model: Any, name: str) -> Any:
    try:
        return model.get_layer(name)
    except ValueError as exc:
        raise ArtifactError(f"the model has no layer {name!r} although its ModelConfig implies one") from exc


def _say(verbose: int, message: str) -> None:
    log.info(message)
    if verbose:
        print(f"prune: {message}", flush=True)


# ---------------------------------------------------------------------- distillation
def distillation_labels(labels: np.ndarray, p_parent: np.ndarray, alpha: float) -> np.ndarray:
    """Fine-tuning targets ``alpha * y + (1 - alpha) * p_parent`` as float32 ``[n]``.

    Takes the 0/1 labels, the parent's click probabilities on the same rows and
    the hard-label weight ``alpha`` in [0, 1] (1: the labels, 0: the parent's
    predictions only).

    Raises:
        ConfigError: ``alpha`` outside [0, 1] or the arrays differ in length.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"prune: distillation alpha must be in [0, 1], got {alpha!r}")
    y = np.asarray(labels, dtype=np.float32).reshape(-1)
    p = np.asarray(p_parent, dtype=np.float32).reshape(-1)
    if y.shape != p.shape:
        raise ConfigError(f"prune: {y.size} labels but {p.size} parent predictions")
    return (np.float32(alpha) * y + np.float32(1.0 - alpha) * p).astype(np.float32)


def _with_labels(batch: Batch, labels: np.ndarray) -> Batch:
    return Batch(batch.feeds, labels, batch.line_no, batch.file_no)


# ---------------------------------------------------------------------- the stage
def prune(trained_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          cfg: PruneConfig | None = None) -> dict[str, Any]:
    """Prune a trained artifact into a fine-tuned, smaller ``prune`` artifact at ``out_dir``.

    Takes the ``train`` (or ``prune``) artifact folder, the output folder and a
    :class:`PruneConfig`; loads the model and reads the rows of its data plan
    (checked by sha256; ``cfg.data`` gives the training files a new place), then
    runs :func:`prune_trained`.  Returns the manifest written.

    Raises:
        ConfigError: ``cfg`` is not a PruneConfig, or ``out_dir`` is the parent.
        ArtifactError: the parent fails verification (changed, missing files),
            records no data plan, or its model does not match its model_config.json.
        DataError: the recorded data files are missing or changed, or a part is empty.
    """
    from ctredge.train.train import TrainedModel

    cfg = _check_config(cfg, trained_dir, out_dir)
    trained = TrainedModel.load(trained_dir)
    plan, held = trained.read_rows(cfg.data)
    return prune_trained(trained, plan, held, out_dir, cfg)[0]


def _valid_auc(model: Any, valid: Batch) -> float:
    from ctredge import metrics as M
    from ctredge.train.loop import keras_predict

    return M.auc(valid.labels, keras_predict(model, valid.feeds))


def parent_bar(parent_valid_auc: float, valid_auc: float) -> dict[str, Any]:
    """The pruned model against the parent's valid AUC: ``{parent_valid_auc, valid_auc, valid_dauc, kept}``.

    ``kept`` is True when the pruned model's valid AUC is at least the parent's.
    """
    return {"parent_valid_auc": float(parent_valid_auc), "valid_auc": float(valid_auc),
            "valid_dauc": float(valid_auc - parent_valid_auc), "kept": bool(valid_auc >= parent_valid_auc)}


def _check_config(cfg: PruneConfig | None, trained_dir: Any, out_dir: Any) -> PruneConfig:
    cfg = PruneConfig() if cfg is None else cfg
    if not isinstance(cfg, PruneConfig):
        raise ConfigError(f"prune: expected a PruneConfig, got {type(cfg).__name__}")
    if Path(out_dir).resolve() == Path(trained_dir).resolve():
        raise ConfigError(f"prune: out_dir must differ from the trained artifact, got {out_dir} for both")
    return cfg


def _train_rows(plan: DataPlan, held: HeldOut, spec: FeatureSpec, skip: bool) -> tuple[Any, np.ndarray, int]:
    """``(rows for train_dataset, embedding-row counts, number of train rows)``, streamed or in memory."""
    from ctredge.train.data import Source

    if held.streamed:
        counts, n_train = count_rows(plan.iter_part("train", spec, skip_bad_rows=skip), spec)
        return Source(*plan.source("train")), counts, n_train
    counts, n_train = count_rows(iter([held.train]), spec)  # type: ignore[list-item]
    return held.train, counts, n_train


def prune_trained(trained: Any, plan: DataPlan, held: HeldOut, out_dir: str | os.PathLike[str],
                  cfg: PruneConfig) -> tuple[dict[str, Any], Any]:
    """Prune an artifact already in memory (:class:`ctredge.train.train.TrainedModel`) on rows already read.

    Takes the trained artifact, its verified data plan, the rows of that plan
    (:meth:`DataPlan.read_held_out`), the output folder and the config.  The
    trained model is read, never changed.  Returns ``(manifest written, pruned
    Keras model)``; the manifest's ``metrics`` hold the test/valid scores after
    pruning (``before``: the parent's, on the same rows) and ``extra`` the
    parameter counts, sparsity per kernel, embedding rows and kept units/ranks.
    Nothing is written when anything fails.

    Raises:
        ArtifactError: the model does not match its model_config.json.
        DataError: the train part has no rows.
    """
    from ctredge.train.data import train_dataset
    from ctredge.train.loop import compile_ctr, fit, keras_predict, score
    from ctredge.train.models import model_summary
    from ctredge.train.train import MODEL_CONFIG_FILE, MODEL_FILE, SPEC_FILE, TRAIN_CONFIG_FILE

    t_start = time.perf_counter()
    keras.utils.set_random_seed(cfg.seed)
    if (trained.manifest.get("metrics") or {}).get("dp") and (cfg.epochs or cfg.vocab_min_count):
        # a DP-SGD parent: counting or fine-tuning on its training rows would spend privacy that no accountant
        # recorded; magnitude and structured pruning of its weights alone are post-processing
        log.info("prune: the parent was trained with DP-SGD, so no fine-tuning and no vocabulary counts "
                 "(epochs %d -> 0, vocab_min_count %d -> 0): pruning its weights alone keeps its guarantee",
                 cfg.epochs, cfg.vocab_min_count)
        cfg = dataclasses.replace(cfg, epochs=0, vocab_min_count=0)
    spec, train_cfg, valid, test = trained.spec, trained.train_config, held.valid, held.test
    skip = train_cfg.skip_bad_rows
    rows, counts, n_train = _train_rows(plan, held, spec, skip)
    if not n_train:
        raise DataError("the train part of the recorded data plan has no rows")
    _say(cfg.verbose, f"rows: train {n_train}, valid {len(valid)}, test {len(test)}")

    before = score(trained.model, valid, test)
    params_before = model_summary(trained.model)
    new_model, new_cfg, report = shrink(trained.model, spec, trained.model_config, cfg, counts)
    after_shrink = score(new_model, valid, test)["valid_auc"]
    _say(cfg.verbose, f"vocabulary/structured pruning: params {params_before['total']:,} -> "
                      f"{model_summary(new_model)['total']:,}, valid AUC {before['valid_auc']:.5f} -> "
                      f"{after_shrink:.5f} before fine-tuning")

    targets = prunable_weights(new_model) if cfg.sparsity else []
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
    end = cfg.end_step if cfg.end_step != -1 else max(cfg.begin_step + 1,
                                                      max(1, math.ceil(cfg.epochs / 2)) * steps_per_epoch)
    shrunk = new_model.get_weights()
    # epoch 0: the final masks at once, no fine-tuning
    MagnitudePruning(targets, cfg.sparsity, cfg.begin_step, end, cfg.frequency).finalize()
    epoch0_auc = _valid_auc(new_model, valid)
    best = {"name": "epoch 0", "alpha": None, "valid_auc": epoch0_auc, "weights": new_model.get_weights(),
            "epochs": 0, "best_epoch": 0}
    candidates = [{"name": "epoch 0", "alpha": None, "valid_auc": epoch0_auc}]
    _say(cfg.verbose, f"epoch 0 (final masks at once, no fine-tuning): valid AUC {epoch0_auc:.5f}")
    alphas = cfg.distill_alphas
    p_parent = None
    if cfg.epochs and held.streamed and any(a < 1.0 for a in alphas):
        _say(cfg.verbose, "distillation skipped: the training rows are streamed from disk (alpha 1.0 only)")
        alphas = (1.0,)
    elif cfg.epochs and any(a < 1.0 for a in alphas):
        p_parent = keras_predict(trained.model, held.train.feeds)  # type: ignore[union-attr]
    for alpha in (alphas if cfg.epochs else ()):
        new_model.set_weights(shrunk)
        keras.utils.set_random_seed(cfg.seed)
        pruning = MagnitudePruning(targets, cfg.sparsity, cfg.begin_step, end, cfg.frequency)
        compile_ctr(new_model, cfg.learning_rate, logloss_metric=False)
        fit_rows = rows if alpha == 1.0 else _with_labels(held.train, distillation_labels(  # type: ignore[arg-type]
            held.train.labels, p_parent, alpha))  # type: ignore[union-attr]
        ds = train_dataset(fit_rows, spec, batch_size=cfg.batch_size, seed=cfg.seed,
                           shuffle_rows=train_cfg.shuffle_rows, skip_bad_rows=skip)
        _say(cfg.verbose, f"fine-tuning {cfg.epochs} epoch(s) with labels {alpha:g}*y + {1 - alpha:g}*p_parent, "
                          f"sparsity {cfg.sparsity} on {len(targets)} kernels (steps {cfg.begin_step}..{end}, "
                          f"every {cfg.frequency})")

        def say(epoch: int, auc: float, logloss: float, eligible: bool) -> None:
            _say(cfg.verbose, f"alpha {alpha:g} epoch {epoch}: valid AUC {auc:.5f} at sparsity "
                              f"{pruning.current:.3f}" + ("" if eligible else " (schedule still ramping)"))

        pruning.attach()
        try:  # the best weights are kept only once the schedule has reached its final sparsity
            fitted = fit(new_model, ds, valid, epochs=cfg.epochs, patience=cfg.patience, verbose=cfg.verbose,
                         callbacks=[pruning], eligible=lambda: pruning.done, say=say)
        finally:
            pruning.detach()
        pruning.finalize()
        auc = _valid_auc(new_model, valid)
        cand = {"name": f"alpha {alpha:g}", "alpha": alpha, "valid_auc": auc, "epochs": fitted.epochs,
                "best_epoch": fitted.best_epoch or fitted.epochs, "history": fitted.val_auc}
        candidates.append(cand)
        if auc > best["valid_auc"]:
            best = {**cand, "weights": new_model.get_weights()}
    new_model.set_weights(best["weights"])
    epochs_run = best["epochs"]  # of the candidate kept (0: epoch 0); every candidate's: epochs_total
    epochs_total = sum(c.get("epochs", 0) for c in candidates)
    best_epoch = best["best_epoch"]
    aucs = next((c["history"] for c in candidates if c["name"] == best["name"] and "history" in c), [])
    _say(cfg.verbose, f"kept {best['name']}: valid AUC {best['valid_auc']:.5f} (parent {before['valid_auc']:.5f})")
    sparsity = sparsity_of(targets)
    after = score(new_model, valid, test)
    params_after = model_summary(new_model)
    nonzero = params_after["total"] - sum(int(round(s * np.prod(w.shape))) for s, w in zip(sparsity.values(), targets))
    seconds = round(time.perf_counter() - t_start, 2)
    _say(cfg.verbose, f"test AUC {before['test_auc']:.5f} -> {after['test_auc']:.5f}, params "
                      f"{params_before['total']:,} -> {params_after['total']:,} ({nonzero:,} non-zero), {seconds}s")

    metrics = {**after, "before": before, "valid_auc_after_structured": after_shrink,
               "delta_test_auc": after["test_auc"] - before["test_auc"],
               "epochs": epochs_run, "epochs_total": epochs_total, "best_epoch": best_epoch, "seconds": seconds,
               "history": {"val_auc": aucs},
               "distillation": {"alphas": list(cfg.distill_alphas), "alphas_run": list(alphas if cfg.epochs else ()),
                                "chosen_alpha": best["alpha"], "kept": best["name"],
                                "candidates": [{k: v for k, v in c.items()} for c in candidates]},
               "parent_bar": parent_bar(before["valid_auc"], after["valid_auc"])}
    if (trained.manifest.get("metrics") or {}).get("dp"):
        metrics["dp"] = trained.manifest["metrics"]["dp"]  # the guarantee is the parent's (post-processing only)
    extra = {"model": new_cfg.model, "params": params_after, "params_before": params_before,
             "params_nonzero": nonzero, "sparsity": sparsity, "sparsity_target": cfg.sparsity,
             "vocab_rows": report.get("vocab_rows"), "units": report["units"], "wide": report.get("wide"),
             "cross_rank": report.get("cross_rank"), "train_rows": n_train}
    with staged_dir(out_dir) as tmp:
        new_model.save(tmp / MODEL_FILE)
        spec.save(str(tmp / SPEC_FILE))
        shutil.copyfile(trained.folder / TRAIN_CONFIG_FILE, tmp / TRAIN_CONFIG_FILE)
        save_config(new_cfg, tmp / MODEL_CONFIG_FILE)
        save_config(cfg, tmp / PRUNE_CONFIG_FILE)
        written = write_manifest(
            tmp, stage="prune", parent=trained.folder, metrics=metrics, data=plan.to_manifest(), extra=extra,
            config={"prune": config_to_dict(cfg), "model": config_to_dict(new_cfg),
                    "train": config_to_dict(train_cfg)},
            signature=trained.manifest.get("signature", {}),
        )
    return written, new_model


__all__ = ["PruneConfig", "prune", "prune_trained", "shrink", "prune_wide", "distillation_labels", "parent_bar", "polynomial_sparsity", "magnitude_mask", "count_rows",
           "vocab_remap", "unit_scores", "prunable_weights", "sparsity_of", "MagnitudePruning"]
