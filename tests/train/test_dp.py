"""DP-SGD (ctredge.train.dp): the accountant's noise multiplier, clipped per-example gradients, noise, CLI, artifact."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from ctredge.cli import main
from ctredge.datagen import generate
from ctredge.errors import ConfigError
from ctredge.reader import read_all, resolve_spec
from ctredge.train import dp
from ctredge.train.loop import compile_ctr
from ctredge.train.models import ModelConfig, build_model
from ctredge.train.train import TrainConfig, train


# ------------------------------------------------------------------ accounting
@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_noise_multiplier_meets_the_target_within_ten_percent(epsilon):
    q, steps, delta = 256 / 40_000, 157, 1e-5
    sigma = dp.noise_multiplier(epsilon, q, steps, delta)
    spent = dp.epsilon_for(sigma, q, steps, delta)
    assert spent <= epsilon
    assert spent >= 0.9 * epsilon
    assert dp.epsilon_for(sigma * 0.98, q, steps, delta) > spent  # less noise spends more


def test_plan_defaults_and_refusals():
    assert dp.default_delta(40_000) == pytest.approx(1e-5)
    assert dp.default_delta(10_000) == pytest.approx(1e-4)
    assert dp.default_delta(9_999) == pytest.approx(1e-4)
    p = dp.plan(3.0, None, 1.0, 40_000, 256, 2)
    assert (p.delta, p.q, p.steps, p.steps_per_epoch) == (pytest.approx(1e-5), 256 / 40_000, 314, 157)
    assert dp.epsilon_for(p.noise_multiplier, p.q, p.steps, p.delta) <= 3.0
    for eps in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="epsilon"):
            dp.plan(eps, None, 1.0, 40_000, 256, 1)
    with pytest.raises(ConfigError, match=r"delta must be in \(0, 1/n_train\]"):
        dp.plan(3.0, 1e-3, 1.0, 40_000, 256, 1)
    with pytest.raises(ConfigError, match="delta"):
        dp.plan(3.0, 0.0, 1.0, 40_000, 256, 1)
    with pytest.raises(ConfigError, match="clip"):
        dp.plan(3.0, None, 0.0, 40_000, 256, 1)
    with pytest.raises(ConfigError, match="epsilon"):
        TrainConfig(data=("x.tsv",), out="o", dp_epsilon=0.0)


def test_private_configs_turn_off_what_is_fitted_without_dp():
    cfg, mcfg = dp.private_configs(TrainConfig(data=("x.tsv",), out="o", dp_epsilon=1.0),
                                   ModelConfig(dense_buckets=4, dense_norm=True, dropout=0.1))
    assert cfg.min_count == 1
    assert (mcfg.wide, mcfg.history_attributes, mcfg.dense_buckets, mcfg.dense_norm, mcfg.dropout) == \
        (False, False, 0, False, 0.0)


# ------------------------------------------------------------------ per-example gradients
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp") / "clicks.tsv"
    generate(str(path), rows=3000, seed=1, history=True, click_rate=0.2)
    spec = resolve_spec(str(path), None)
    return path, spec, read_all(str(path), spec)


def _feeds(spec, rows, n):
    feeds = {k: np.array(v[:n]) for k, v in rows.feeds.items()}
    item = spec.item_feature_index
    feeds["hist"][:3, 0] = feeds["cat"][:3, item]  # the candidate also in the history: one row looked up twice
    feeds["hist"][0, 1] = feeds["cat"][0, item]    # and three times in the first example
    return {k: tf.constant(v) for k, v in feeds.items()}, tf.constant(rows.labels[:n].astype(np.float32))


def _naive(model, feeds, labels, clip):
    """One example at a time, IndexedSlices made dense: each norm, and the sum of the clipped gradients."""
    sums = [np.zeros(v.shape, np.float32) for v in model.trainable_variables]
    norms = []
    for i in range(int(labels.shape[0])):
        x = {k: v[i:i + 1] for k, v in feeds.items()}
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(dp._loss(tf.reshape(labels[i], (1, 1)), model(x, training=True)))
        grads = [np.zeros(v.shape, np.float32) if g is None else tf.convert_to_tensor(g).numpy()
                 for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables))]
        norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
        norms.append(norm)
        for s, g in zip(sums, grads):
            s += g * min(1.0, clip / norm)
    return sums, np.array(norms)


@pytest.mark.parametrize("pooling,method", [("attention", "loop"), ("mean", "loop"), ("mean", "vectorized")])
def test_clipped_gradient_sum_matches_a_naive_loop(tiny, pooling, method):
    _, spec, rows = tiny
    model = build_model(spec, ModelConfig(embedding_dim=4, mlp_units=(8,), cross_layers=1, wide=False,
                                          history_attributes=False, history_pooling=pooling))
    feeds, labels = _feeds(spec, rows, 12)
    per = dp.per_example_gradients(model, feeds, labels, method)
    assert isinstance(per[0], tuple)  # the embedding table: slices, not a dense [B, rows, d]
    # the clip at the norms' lower quartile, so it binds for most examples whatever the random init gives
    clip = float(np.quantile(_naive(model, feeds, labels, 1.0)[1], 0.25))
    sums, norms = dp.clipped_gradient_sum(model, feeds, labels, clip, method)
    want_sums, want_norms = _naive(model, feeds, labels, clip)
    np.testing.assert_allclose(norms.numpy(), want_norms, rtol=1e-4)
    assert (want_norms > clip).sum() >= 8
    for got, want in zip(sums, want_sums):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    # each example's clipped gradient has norm <= clip (exactly clip where it was clipped)
    factor = np.minimum(1.0, clip / want_norms)
    assert np.all(factor * want_norms <= clip * (1 + 1e-6))


def test_noise_changes_the_update_and_sigma_zero_is_the_clipped_mean(tiny):
    _, spec, rows = tiny
    model = build_model(spec, ModelConfig(embedding_dim=4, mlp_units=(8,), cross_layers=1, wide=False,
                                          history_attributes=False))
    feeds, labels = _feeds(spec, rows, 16)
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    sums, _ = dp.clipped_gradient_sum(model, feeds, labels, 1.0)
    quiet = dp.DpSgd(model, clip=1.0, sigma=0.0, expected_batch=20.0, seed=0).gradients(np_feeds, labels.numpy())
    for q, s in zip(quiet, sums):
        np.testing.assert_allclose(q.numpy(), s.numpy() / 20.0, rtol=1e-5, atol=1e-8)
    noisy = dp.DpSgd(model, clip=1.0, sigma=2.0, expected_batch=20.0, seed=0).gradients(np_feeds, labels.numpy())
    table = (noisy[0] - quiet[0]).numpy()  # the whole embedding table is noised, touched rows or not
    assert np.count_nonzero(table) == table.size
    assert np.std(table) == pytest.approx(2.0 * 1.0 / 20.0, rel=0.02)
    for n, q in zip(noisy, quiet):
        assert not np.allclose(n.numpy(), q.numpy())


def test_poisson_batches_sample_each_row_with_probability_q():
    sizes = [len(i) for i in dp.poisson_batches(10_000, 0.05, 200, np.random.default_rng(0))]
    assert np.mean(sizes) == pytest.approx(500, rel=0.02) and np.std(sizes) > 5  # variable, as Poisson is


# ------------------------------------------------------------------ the train stage and the CLI
@pytest.mark.parametrize("flags,message", [
    (["--dp-epsilon", "0"], "dp epsilon must be a finite number > 0, got 0.0"),
    (["--dp-epsilon", "-2"], "dp epsilon must be a finite number > 0"),
    (["--dp-epsilon", "1", "--dp-delta", "0.01"], "dp delta must be in (0, 1/n_train]"),
    (["--dp-epsilon", "1", "--dp-clip", "0"], "dp clip must be a finite number > 0"),
    (["--dp-delta", "1e-6"], "--dp-delta and --dp-clip need --dp-epsilon"),
])
def test_cli_refuses_bad_dp_settings(tiny, tmp_path, capsys, flags, message):
    path, _, _ = tiny
    rc = main(["train", "--data", str(path), "--out", str(tmp_path / "out"), "--epochs", "1", *flags])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dp_training_writes_the_dp_record_and_exports_to_onnx(tiny, tmp_path):
    from ctredge.export.onnx import export

    path, _, _ = tiny
    cfg = TrainConfig(data=(str(path),), out=str(tmp_path / "dp"), epochs=2, batch_size=512, verbose=0,
                      dp_epsilon=4.0, dp_clip=0.8, dp_batch_size=128, dp_learning_rate=0.05, dp_momentum=0.5)
    manifest = train(cfg, ModelConfig(embedding_dim=4, mlp_units=(8,), cross_layers=1))
    d = manifest["metrics"]["dp"]
    n = manifest["metrics"]["train_rows"]
    assert d["epsilon_target"] == 4.0 and 0 < d["epsilon"] <= 4.0
    assert d["delta"] == pytest.approx(1e-4) and d["delta"] <= 1 / n
    assert d["clip"] == 0.8 and d["noise_multiplier"] > 0 and d["sampling"] == "poisson"
    assert d["q"] == pytest.approx(128 / n) and d["steps"] == d["steps_planned"] == 2 * -(-n // 128)
    assert d["train_rows_per_s"] > 0
    assert d["optimizer"] == {"name": "sgd", "learning_rate": 0.05, "momentum": 0.5}
    saved = json.loads((tmp_path / "dp" / "model_config.json").read_text())
    assert saved["wide"] is False and saved["history_attributes"] is False
    assert manifest["config"]["train"]["min_count"] == 1 and manifest["config"]["train"]["dp_epsilon"] == 4.0
    assert 0 < manifest["metrics"]["test_auc"] < 1
    exported = export(tmp_path / "dp", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.onnx").is_file() and exported["stage"] == "export"
    # the bench's DP rows: the DP artifact scored with its record, anything else a row with the reason
    from ctredge.benchmarks.dp import dp_rows
    from ctredge.features import FeatureSpec
    from ctredge.reader import read_all

    rows = read_all(path, FeatureSpec.load(str(tmp_path / "dp" / "feature_spec.json")))
    scored, other = dp_rows([str(tmp_path / "dp"), str(tmp_path / "onnx")], rows, None, manifest, bootstrap=10)
    assert scored["scored"] and scored["kind"] == "dp" and scored["dp"] == d and 0 < scored["auc"] < 1
    assert scored["train_slowdown"] == pytest.approx(1.0) and "dauc" not in scored
    assert not other["scored"] and "train" in other["error"]
    # pruning a DP parent neither fine-tunes nor counts on its training rows, and carries the parent's record
    from ctredge.compress.prune import PruneConfig, prune

    pruned = prune(tmp_path / "dp", tmp_path / "pruned", PruneConfig(epochs=2, vocab_min_count=2, verbose=0))
    assert pruned["metrics"]["epochs_total"] == 0 and pruned["metrics"]["distillation"]["alphas_run"] == []
    assert pruned["config"]["prune"]["epochs"] == 0 and pruned["config"]["prune"]["vocab_min_count"] == 0
    assert pruned["metrics"]["dp"] == d
