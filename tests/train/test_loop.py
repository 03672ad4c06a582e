"""The one training loop: best-on-valid restore, patience, eligibility, and a real fit."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from ctredge.reader import Batch  # noqa: E402
from ctredge.train.loop import BestOnValid, compile_ctr, fit, keras_predict, score  # noqa: E402

LABELS = np.array([0, 0, 1, 1], dtype=np.float32)
GOOD = np.array([0.1, 0.2, 0.8, 0.9], dtype=np.float32)  # AUC 1
SO_SO = np.array([0.1, 0.8, 0.2, 0.9], dtype=np.float32)  # AUC 0.75
BAD = np.array([0.9, 0.8, 0.2, 0.1], dtype=np.float32)  # AUC 0


class _Scripted:
    """A stand-in model whose predictions follow a script, one entry per epoch, and whose weights are its epoch."""

    def __init__(self, script):
        self.script, self.epoch, self.stop_training, self.restored = script, 0, False, None

    def predict(self, feeds, batch_size, verbose):
        return self.script[self.epoch].reshape(-1, 1)

    def get_weights(self):
        return [np.array(self.epoch)]

    def set_weights(self, weights):
        self.restored = int(weights[0])


def _run(script, patience, eligible=None):
    model = _Scripted(script)
    cb = BestOnValid(Batch({"x": np.zeros((4, 1), np.float32)}, LABELS, np.arange(4), np.zeros(4)), patience,
                     eligible=eligible)
    cb.set_model(model)
    for epoch in range(len(script)):
        model.epoch = epoch
        cb.on_epoch_end(epoch, {})
        if model.stop_training:
            break
    cb.on_train_end()
    return cb, model


def test_the_best_epoch_is_restored_and_patience_stops():
    cb, model = _run([SO_SO, GOOD, BAD, BAD, GOOD], patience=2)
    assert cb.aucs == [0.75, 1.0, 0.0, 0.0] and model.stop_training  # stopped after two worse epochs
    assert cb.best_epoch == 2 and model.restored == 1


def test_patience_zero_stops_at_the_first_epoch_without_improvement():
    cb, model = _run([GOOD, SO_SO, GOOD], patience=0)
    assert len(cb.aucs) == 2 and cb.best_epoch == 1 and model.restored == 0


def test_ineligible_epochs_never_count_as_best():
    ramping = iter([False, False, True, True])
    cb, model = _run([GOOD, GOOD, SO_SO, BAD], patience=1, eligible=lambda: next(ramping))
    assert cb.best_epoch == 3 and model.restored == 2 and len(cb.aucs) == 4
    cb, model = _run([GOOD, GOOD], patience=1, eligible=lambda: False)
    assert cb.best_epoch == 0 and model.restored is None  # nothing eligible: the last weights stay


def test_fit_and_score_a_real_model():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 3)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=512) > 0).astype(np.float32)
    inp = keras.Input(shape=(3,), name="x")
    model = keras.Model(inp, keras.layers.Dense(1, activation="sigmoid", name="ctr")(inp))
    compile_ctr(model, 0.05)
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(({"x": x[:384]}, y[:384, None])).batch(64)
    valid = Batch({"x": x[384:448]}, y[384:448], np.arange(64), np.zeros(64))
    test = Batch({"x": x[448:]}, y[448:], np.arange(64), np.zeros(64))
    result = fit(model, ds, valid, epochs=3, patience=1, verbose=0)
    assert 1 <= result.epochs <= 3 and 1 <= result.best_epoch <= result.epochs
    assert len(result.val_auc) == result.epochs and len(result.loss) == result.epochs
    assert keras_predict(model, valid.feeds).shape == (64,)
    figures = score(model, valid, test)
    assert figures["valid_auc"] == pytest.approx(max(result.val_auc), abs=1e-6)  # the best epoch's weights
    assert figures["test_auc"] > 0.8 and set(figures) >= {"test_logloss", "test_calibration", "valid_logloss"}
