"""Differentially private training (DP-SGD): ``ctredge train --dp-epsilon E [--dp-delta D] [--dp-clip C]``.

The guarantee: (epsilon, delta)-DP with respect to adding or removing **one
row of the training part** of the click log (one impression with its label,
features and history), for everything the training rows influence in the
saved model.  How:

* :func:`private_configs` turns off what is computed from the training rows
  outside the gradient steps: the min-count vocabulary (``min_count = 1``),
  the wide part (fitted by L-BFGS, ``wide = False``), the item -> attribute
  table of the history (``history_attributes = False``), the dense quantile
  edges (``dense_buckets = 0``), batch normalisation (``dense_norm = False``,
  it mixes the examples of a batch) and dropout.  Each change is logged.
* Each step samples every training row independently with probability
  ``q = dp_batch_size / n_train`` (Poisson sampling, what the accountant
  assumes); :func:`clipped_gradient_sum` computes each sampled row's gradient of
  the loss w.r.t. every trainable variable with ``tf.vectorized_map``, clips its
  total L2 norm (all variables together) to ``C``, sums; :class:`DpSgd` adds
  Gaussian noise of standard deviation ``sigma * C`` to every coordinate of
  every variable's sum (the whole embedding table, not only the touched rows),
  divides by the expected batch size ``q * n_train`` and applies the result
  with SGD with momentum (:func:`optimizer`; post-processing).
* ``sigma`` is the smallest noise multiplier (bisection) for which Google's
  ``dp-accounting`` RDP accountant gives at most ``E`` after
  ``epochs * ceil(n_train / dp_batch_size)`` Poisson-sampled Gaussian steps.

Per-example gradients of the embedding table come from the tape as
``IndexedSlices`` (one slice per lookup); an example's squared norm sums the
slices of equal row first (``sum_{j,k: row_j == row_k} <v_j, v_k>``), so an id
looked up twice in one row (a candidate also in the history) is counted right.

Not covered: the validation rows choose the best epoch and early stopping and
are used without DP (they are held out, not trained on); the FeatureSpec
(hash buckets) is data-independent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from ctredge.errors import ConfigError

log = logging.getLogger("ctredge.train.dp")

#: what DpSgd samples with (recorded in the manifest)
SAMPLING = "poisson"
#: bisection bounds and tolerance of the noise multiplier
SIGMA_LO, SIGMA_HI, SIGMA_TOL = 1e-3, 1e3, 1e-4


# ------------------------------------------------------------------ accounting (dp-accounting)
def _accounting() -> Any:
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as e:  # pragma: no cover - the train extra installs it
        raise ConfigError("DP training needs Google's dp-accounting: pip install 'ctredge[train]' "
                          "(dp-accounting>=0.6,<0.7)") from e
    return dp_accounting, rdp


def epsilon_for(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` Poisson-sampled (rate ``q``) Gaussian steps of noise multiplier ``sigma`` at ``delta``.

    Computed by ``dp_accounting.rdp.RdpAccountant`` (add/remove-one neighbours).
    """
    dpa, rdp = _accounting()
    acc = rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(delta))


def noise_multiplier(epsilon: float, q: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier (within :data:`SIGMA_TOL`) whose accounted epsilon is at most ``epsilon``.

    Bisection on ``epsilon_for``, which falls as sigma grows; the result always
    satisfies ``epsilon_for(result, ...) <= epsilon``.

    Raises:
        ConfigError: epsilon not > 0, or no sigma up to :data:`SIGMA_HI` reaches it.
    """
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ConfigError(f"dp epsilon must be a finite number > 0, got {epsilon!r}")
    if epsilon_for(SIGMA_HI, q, steps, delta) > epsilon:
        raise ConfigError(f"dp epsilon {epsilon} is out of reach of {steps} steps at sampling rate {q:.4g} "
                          f"(noise multiplier {SIGMA_HI:g} still exceeds it): train fewer epochs or larger "
                          "batches, or on more rows")
    lo, hi = SIGMA_LO, SIGMA_HI
    if epsilon_for(lo, q, steps, delta) <= epsilon:
        return lo
    while hi - lo > SIGMA_TOL * max(1.0, lo):
        mid = math.sqrt(lo * hi) if hi / lo > 2 else (lo + hi) / 2
        if epsilon_for(mid, q, steps, delta) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def default_delta(n_train: int) -> float:
    """``1 / n_train`` rounded down to a power of ten (``40,000`` rows -> ``1e-5``)."""
    return 10.0 ** -math.ceil(math.log10(n_train) - 1e-12)


@dataclasses.dataclass(frozen=True)
class DpPlan:
    """The privacy settings of one run: target epsilon, delta, clip, sampling rate, steps and the noise multiplier."""

    epsilon: float
    delta: float
    clip: float
    q: float
    steps: int
    steps_per_epoch: int
    noise_multiplier: float
    n_train: int
    expected_batch: float

    def record(self, steps_run: int, seconds: float, rows_seen: int) -> dict[str, Any]:
        """What the manifest keeps (``metrics["dp"]``): the plan, the epsilon actually spent, rows/s."""
        spent = epsilon_for(self.noise_multiplier, self.q, steps_run, self.delta) if steps_run else 0.0
        return {"epsilon_target": self.epsilon, "epsilon": round(spent, 6), "delta": self.delta,
                "clip": self.clip, "noise_multiplier": round(self.noise_multiplier, 6), "sampling": SAMPLING,
                "q": self.q, "steps_planned": self.steps, "steps": steps_run, "expected_batch": self.expected_batch,
                "accountant": "dp_accounting.rdp.RdpAccountant (add/remove one training row)",
                "unit": "one training row", "train_seconds": round(seconds, 2),
                "train_rows_per_s": round(rows_seen / seconds, 1) if seconds > 0 else None}


def check_settings(epsilon: Any, delta: Any, clip: Any) -> None:
    """Refuse DP settings that no run could use: epsilon and clip must be finite > 0, delta in (0, 1).

    (``delta <= 1/n_train`` is checked by :func:`plan`, once the rows are counted.)

    Raises:
        ConfigError: a bad value, with what was expected.
    """
    for name, value in (("epsilon", epsilon), ("clip", clip)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"dp {name} must be a finite number > 0, got {value!r}")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1):
        raise ConfigError(f"dp delta must be a number in (0, 1/n_train], got {delta!r}")


def plan(epsilon: float, delta: float | None, clip: float, n_train: int, batch_size: int, epochs: int) -> DpPlan:
    """The :class:`DpPlan` for ``n_train`` rows, ``epochs`` epochs of ``ceil(n_train / batch_size)`` steps.

    ``delta`` None: :func:`default_delta`.

    Raises:
        ConfigError: epsilon not > 0, delta outside ``(0, 1/n_train]``, clip not > 0, or epsilon unreachable.
    """
    if not epsilon > 0 or not math.isfinite(epsilon):
        raise ConfigError(f"dp epsilon must be a finite number > 0, got {epsilon!r}")
    if not clip > 0 or not math.isfinite(clip):
        raise ConfigError(f"dp clip must be a finite number > 0, got {clip!r}")
    if n_train < 2:
        raise ConfigError(f"DP training needs at least 2 training rows, got {n_train}")
    delta = default_delta(n_train) if delta is None else float(delta)
    if not 0 < delta <= 1.0 / n_train:
        raise ConfigError(f"dp delta must be in (0, 1/n_train] = (0, {1.0 / n_train:.3g}] for {n_train} training "
                          f"rows, got {delta!r}")
    q = min(1.0, batch_size / n_train)
    per_epoch = -(-n_train // batch_size)
    steps = epochs * per_epoch
    sigma = noise_multiplier(epsilon, q, steps, delta)
    log.info("DP-SGD: epsilon %g, delta %.3g, clip %g, q %.5f, %d steps -> noise multiplier %.4f", epsilon, delta,
             clip, q, steps, sigma)
    return DpPlan(float(epsilon), delta, float(clip), q, steps, per_epoch, sigma, n_train, q * n_train)


# ------------------------------------------------------------------ configs
def optimizer(cfg: Any) -> Any:
    """DP-SGD's optimizer: SGD with ``cfg.dp_learning_rate`` and ``cfg.dp_momentum`` (a TrainConfig).

    Not Adam: Adam divides each coordinate by its running RMS, which for the
    rows a step does not touch is the noise's, so every embedding row would move
    about one learning rate per step in a random direction (measured: README).
    """
    import keras

    return keras.optimizers.SGD(cfg.dp_learning_rate, momentum=cfg.dp_momentum)


def private_configs(cfg: Any, model_cfg: Any) -> tuple[Any, Any]:
    """``(train config, model config)`` with everything computed from the training rows outside DP-SGD turned off.

    Logs each change: min-count vocabulary, wide part, history attributes, dense
    buckets, batch normalisation, dropout.  The returned configs are what is saved.
    """
    changes: dict[str, Any] = {}
    for name, off in (("wide", False), ("history_attributes", False), ("dense_buckets", 0), ("dense_norm", False),
                      ("dropout", 0.0)):
        if hasattr(model_cfg, name) and getattr(model_cfg, name) != off:
            changes[name] = off
    if changes:
        log.info("DP training: model %s (fitted from the training rows without DP, or mixing a batch's rows)",
                 ", ".join(f"{k}={v}" for k, v in changes.items()))
        model_cfg = dataclasses.replace(model_cfg, **changes)
    if cfg.min_count != 1:
        log.info("DP training: min_count=1 (the min-count vocabulary would be counted without DP)")
        cfg = dataclasses.replace(cfg, min_count=1)
    if getattr(cfg, "text", False):
        log.info("DP training: text=False (a spec's text features would fill the title table from the training "
                 "rows' titles without DP)")
        cfg = dataclasses.replace(cfg, text=False)
    return cfg, model_cfg


# ------------------------------------------------------------------ per-example gradients
def _loss(labels: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    """Per-example binary cross-entropy, as ``keras.losses.BinaryCrossentropy`` computes it."""
    import keras

    return keras.losses.binary_crossentropy(labels, probs)


#: how :func:`per_example_gradients` maps over the batch: ``loop`` (``tf.map_fn``, in-graph, one example at a
#: time) or ``vectorized`` (``tf.vectorized_map``); TF 2.21's pfor crashes (SIGSEGV) on the attention layers'
#: gradients (``RecencyAttention``), so ``loop`` is the default; ``vectorized`` works for ``history_pooling="mean"``
PER_EXAMPLE = ("loop", "vectorized")


def per_example_gradients(model: Any, feeds: dict[str, tf.Tensor], labels: tf.Tensor,
                          method: str = "loop") -> list[Any]:
    """Each example's gradient of its loss w.r.t. ``model.trainable_variables``, mapped over the batch.

    Returns one entry per variable: a dense ``[B, *shape]`` tensor, or for a
    gathered table ``(values [B, K, d], rows [B, K])``, the example's ``K`` slices.
    ``method``: one of :data:`PER_EXAMPLE`.
    """
    if method not in PER_EXAMPLE:
        raise ConfigError(f"per-example gradients: expected one of {PER_EXAMPLE}, got {method!r}")
    variables = model.trainable_variables

    def one(args: Any) -> list[Any]:
        x, y = args
        x = {k: tf.expand_dims(v, 0) for k, v in x.items()}
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(_loss(tf.reshape(y, (1, 1)), model(x, training=True)))
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [(g.values, tf.cast(g.indices, tf.int32)) if isinstance(g, tf.IndexedSlices) else g for g in grads]

    if method == "vectorized":
        return tf.vectorized_map(one, (feeds, labels))
    first = one(({k: v[0] for k, v in feeds.items()}, labels[0]))  # the output structure (traced, not kept)
    signature = [tuple(tf.TensorSpec(t.shape, t.dtype) for t in g) if isinstance(g, tuple)
                 else tf.TensorSpec(g.shape, g.dtype) for g in first]
    return tf.map_fn(one, (feeds, labels), fn_output_signature=signature)


def per_example_norms(grads: list[Any]) -> tf.Tensor:
    """``[B]`` L2 norms of each example's whole gradient; a table's slices of the same row are summed first."""
    sq = None
    for g in grads:
        if isinstance(g, tuple):
            values, rows = g
            flat = tf.reshape(values, (tf.shape(values)[0], tf.shape(values)[1], -1))
            gram = tf.matmul(flat, flat, transpose_b=True)  # [B, K, K]
            same = tf.cast(tf.equal(rows[:, :, None], rows[:, None, :]), gram.dtype)
            s = tf.reduce_sum(gram * same, axis=[1, 2])
        else:
            s = tf.reduce_sum(tf.reshape(tf.square(g), (tf.shape(g)[0], -1)), axis=1)
        sq = s if sq is None else sq + s
    return tf.sqrt(tf.maximum(sq, 0.0))


def clipped_gradient_sum(model: Any, feeds: dict[str, tf.Tensor], labels: tf.Tensor, clip: float,
                         method: str = "loop") -> tuple[list[tf.Tensor], tf.Tensor]:
    """``(sums, norms)``: the sum over the batch of each example's gradient clipped to L2 norm ``clip``.

    ``sums`` are dense, one per trainable variable, of its shape; ``norms`` the
    ``[B]`` norms before clipping.
    """
    grads = per_example_gradients(model, feeds, labels, method)
    norms = per_example_norms(grads)
    factor = tf.minimum(1.0, clip / tf.maximum(norms, 1e-12))
    sums = []
    for v, g in zip(model.trainable_variables, grads):
        if isinstance(g, tuple):
            values, rows = g
            scaled = values * tf.reshape(factor, (-1,) + (1,) * (len(values.shape) - 1))
            d = tf.shape(values)[2:]
            sums.append(tf.math.unsorted_segment_sum(tf.reshape(scaled, tf.concat([[-1], d], 0)),
                                                     tf.reshape(rows, (-1,)), v.shape[0]))
        else:
            sums.append(tf.tensordot(factor, g, axes=1))
    return sums, norms


class DpSgd:
    """One DP-SGD step: clipped per-example gradient sum + N(0, (sigma C)^2) on every coordinate, / expected batch.

    Takes the model (compiled: its optimizer applies the gradients), the clip
    ``C``, the noise multiplier ``sigma``, the expected batch size and a seed for
    the noise.  :meth:`gradients` gives the noised averaged gradients;
    :meth:`step` applies them.
    """

    def __init__(self, model: Any, clip: float, sigma: float, expected_batch: float, seed: int) -> None:
        self.model, self.clip, self.sigma, self.denom = model, float(clip), float(sigma), float(expected_batch)
        self.noise = tf.random.Generator.from_seed(seed)
        self._grads = tf.function(self._gradients, reduce_retracing=True)

    def _gradients(self, feeds: dict[str, tf.Tensor], labels: tf.Tensor) -> list[tf.Tensor]:
        sums, _ = clipped_gradient_sum(self.model, feeds, labels, self.clip)
        std = self.sigma * self.clip
        out = []
        for s in sums:
            if std > 0:
                s = s + self.noise.normal(tf.shape(s), stddev=std, dtype=s.dtype)
            out.append(s / self.denom)
        return out

    def gradients(self, feeds: dict[str, np.ndarray], labels: np.ndarray) -> list[tf.Tensor]:
        """The noised gradients ``(sum of clipped + noise) / expected batch``, one per trainable variable."""
        if len(labels) == 0:  # an empty Poisson batch: noise only
            std = self.sigma * self.clip
            return [self.noise.normal(v.shape, stddev=std) / self.denom if std > 0 else tf.zeros(v.shape)
                    for v in self.model.trainable_variables]
        feeds = {k: tf.convert_to_tensor(v) for k, v in feeds.items()}
        return self._grads(feeds, tf.convert_to_tensor(np.asarray(labels, np.float32).reshape(-1)))

    def step(self, feeds: dict[str, np.ndarray], labels: np.ndarray) -> None:
        """Apply one noised step with the model's optimizer."""
        self.model.optimizer.apply(self.gradients(feeds, labels), self.model.trainable_variables)


def poisson_batches(n: int, q: float, steps: int, rng: np.random.Generator) -> Any:
    """``steps`` index arrays, each row in each with probability ``q`` independently (what the accountant assumes)."""
    for _ in range(steps):
        yield np.flatnonzero(rng.random(n) < q)


def fit_private(model: Any, train: Any, valid: Any, dp: DpPlan, *, epochs: int, patience: int, seed: int,
                say: Callable[[int, float, float, bool], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """DP-SGD on the in-memory training rows with the loop's best-on-valid and patience.

    Takes the compiled model, the training and validation
    :class:`~ctredge.reader.Batch`, the :class:`DpPlan`, the epoch budget, the
    patience, a seed (sampling and noise) and the per-epoch reporter.  Returns
    ``(FitResult, dp record for the manifest)``.
    """
    from ctredge.train.loop import BestOnValid, FitResult

    best = BestOnValid(valid, patience, say=say)
    best.set_model(model)
    sgd = DpSgd(model, dp.clip, dp.noise_multiplier, dp.expected_batch, seed)
    rng = np.random.default_rng([seed, 0xD9])
    labels = np.asarray(train.labels, np.float32)
    model.stop_training = False
    t0 = time.perf_counter()
    steps_run = rows_seen = run = 0
    step_seconds = 0.0
    for epoch in range(epochs):
        ts = time.perf_counter()
        for idx in poisson_batches(len(labels), dp.q, dp.steps_per_epoch, rng):
            sgd.step({k: v[idx] for k, v in train.feeds.items()}, labels[idx])
            steps_run += 1
            rows_seen += len(idx)
        step_seconds += time.perf_counter() - ts
        run = epoch + 1
        best.on_epoch_end(epoch)
        if model.stop_training:
            break
    best.on_train_end()
    seconds = time.perf_counter() - t0
    fitted = FitResult(epochs=run, best_epoch=best.best_epoch, val_auc=best.aucs, val_logloss=best.loglosses,
                       loss=[], seconds=seconds)
    return fitted, dp.record(steps_run, step_seconds, rows_seen)


def train_private(model: Any, held: Any, cfg: Any,
                  say: Callable[[int, float, float, bool], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """The ``train`` stage's DP-SGD: :func:`plan` from ``cfg`` (a TrainConfig) and :func:`fit_private` on ``held``.

    Raises:
        ConfigError: the training rows are streamed (DP-SGD samples them in memory), or bad DP settings.
    """
    if held.streamed:
        raise ConfigError("DP training samples the training rows in memory, but they were streamed "
                          "(larger than max_memory_bytes): raise the memory limit or train on fewer rows")
    dp = plan(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip, len(held.train), cfg.dp_batch_size, cfg.epochs)
    fitted, record = fit_private(model, held.train, held.valid, dp, epochs=cfg.epochs, patience=cfg.patience,
                                 seed=cfg.seed, say=say)
    record["optimizer"] = {"name": "sgd", "learning_rate": cfg.dp_learning_rate, "momentum": cfg.dp_momentum}
    return fitted, record


__all__ = ["check_settings", "train_private", "optimizer", "SAMPLING", "epsilon_for", "noise_multiplier", "default_delta", "DpPlan", "plan", "private_configs",
           "per_example_gradients", "per_example_norms", "clipped_gradient_sum", "DpSgd", "poisson_batches",
           "fit_private"]
