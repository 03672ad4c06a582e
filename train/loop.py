"""The one training loop: ``ctredge train`` and pruning's fine-tuning both fit through :func:`fit`.

Keras' own validation metrics are approximate (a 1000-threshold AUC), so every
epoch ends with the hub's *exact* AUC and logloss of the validation rows
(:class:`BestOnValid`); that AUC picks the best epoch, stops training after
``patience`` epochs without improvement, and the best weights are restored when
``fit`` returns.  A caller can make epochs ineligible as "best" (pruning: while
its sparsity schedule still ramps, the weights are not the final model's).
:func:`score` gives the test/valid figures every artifact records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import keras
import numpy as np

from ctredge import metrics as M
from ctredge.reader import Batch


def keras_predict(model: Any, feeds: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """Click probabilities ``[B]`` of a Keras model on a feed dict (no progress bar)."""
    if not len(next(iter(feeds.values()))):
        return np.zeros(0, dtype=np.float32)
    out = model.predict(feeds, batch_size=batch_size, verbose=0)
    if isinstance(out, dict):
        out = out["ctr"]
    return np.asarray(out, dtype=np.float32).reshape(-1)


def compile_ctr(model: Any, learning_rate: Any, *, logloss_metric: bool = True, optimizer: Any = None) -> None:
    """Compile for click prediction: Adam, binary cross-entropy, Keras' running AUC (and logloss) for the bar.

    ``learning_rate``: a float or a Keras learning-rate schedule (Adam's);
    ``optimizer``: another Keras optimizer instead of Adam (DP-SGD's SGD).
    """
    metrics: list[Any] = [keras.metrics.AUC(name="auc", num_thresholds=1000)]
    if logloss_metric:
        metrics.append(keras.metrics.BinaryCrossentropy(name="logloss"))
    model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate), loss=keras.losses.BinaryCrossentropy(),
                  metrics=metrics)


class BestOnValid(keras.callbacks.Callback):
    """Exact validation AUC/logloss each epoch; keeps the best eligible weights and stops on ``patience``.

    Takes the validation rows, the patience (epochs without a better AUC before
    stopping), ``eligible`` (called at each epoch end: may this epoch count? default
    always) and ``say`` (called with one line per epoch, or None for silence).
    The best weights are put back at the end of training.  ``aucs``/``loglosses``
    hold every epoch's figures rounded to 6 digits; ``best_epoch`` is 1-based (0:
    no eligible epoch).
    """

    def __init__(self, valid: Batch, patience: int, *, eligible: Callable[[], bool] | None = None,
                 say: Callable[[int, float, float, bool], None] | None = None) -> None:
        super().__init__()
        self.valid, self.patience, self.eligible, self.say = valid, patience, eligible, say
        self.aucs: list[float] = []
        self.loglosses: list[float] = []
        self.best = -np.inf
        self.best_epoch = 0
        self.best_weights: list[np.ndarray] | None = None
        self.wait = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        p = keras_predict(self.model, self.valid.feeds)
        a, ll = M.auc(self.valid.labels, p), M.logloss(self.valid.labels, p)
        self.aucs.append(round(a, 6))
        self.loglosses.append(round(ll, 6))
        if logs is not None:
            logs["val_auc_exact"] = a
            logs["val_logloss_exact"] = ll
        eligible = self.eligible is None or self.eligible()
        if self.say is not None:
            self.say(epoch + 1, a, ll, eligible)
        if not eligible:
            return
        if a > self.best:
            self.best, self.best_epoch, self.wait = a, epoch + 1, 0
            self.best_weights = self.model.get_weights()
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


@dataclass
class FitResult:
    """What one :func:`fit` did: epochs run, the best (1-based), per-epoch figures, seconds."""

    epochs: int
    best_epoch: int
    val_auc: list[float] = field(default_factory=list)
    val_logloss: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fit(model: Any, dataset: Any, valid: Batch, *, epochs: int, patience: int, verbose: int,
        callbacks: Sequence[Any] = (), eligible: Callable[[], bool] | None = None,
        say: Callable[[int, float, float, bool], None] | None = None) -> FitResult:
    """Fit a compiled model on ``dataset`` with :class:`BestOnValid` on ``valid``; the best weights stay.

    Takes the model, a ``tf.data`` dataset of ``(feeds, labels)``, the validation
    rows, the epoch budget, the early-stopping patience, Keras' verbosity, extra
    callbacks (run before the validation, e.g. a pruning schedule), when an epoch
    may count as best and a per-epoch reporter.  Returns a :class:`FitResult`.
    """
    best = BestOnValid(valid, patience, eligible=eligible, say=say)
    t0 = time.perf_counter()
    hist = model.fit(dataset, epochs=epochs, callbacks=[*callbacks, best], shuffle=False, verbose=verbose)
    seconds = time.perf_counter() - t0
    run = len(hist.history.get("loss", []))
    return FitResult(epochs=run, best_epoch=best.best_epoch, val_auc=best.aucs, val_logloss=best.loglosses,
                     loss=[float(x) for x in hist.history.get("loss", [])], seconds=seconds)


def score(model: Any, valid: Batch, test: Batch) -> dict[str, float]:
    """Exact test and valid figures of a model: AUC, logloss, calibration, normalized entropy, click rate."""
    t = M.summary(test.labels, keras_predict(model, test.feeds))
    pv = keras_predict(model, valid.feeds)
    return {"test_auc": t["auc"], "test_logloss": t["logloss"], "test_calibration": t["calibration"],
            "test_normalized_entropy": t["normalized_entropy"], "test_click_rate": t["click_rate"],
            "valid_auc": M.auc(valid.labels, pv), "valid_logloss": M.logloss(valid.labels, pv)}


__all__ = ["keras_predict", "compile_ctr", "BestOnValid", "FitResult", "fit", "score"]
