"""The wide part: WideLogit's rows by hand, the fitted regression inside the graph, what it learns, its errors."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest

from ctredge import metrics as M
from ctredge.errors import ConfigError
from ctredge.features import CatFeature, DenseFeature, FeatureSpec, HistorySpec
from ctredge.reader import Batch
from ctredge.train import layers as L
from ctredge.train.loop import keras_predict
from ctredge.train.models import WIDE_LOGIT, ModelConfig, build_model
from ctredge.train.train import fill_data_layers
from ctredge.train.wide import design, fit_wide

K1, K2, K3 = 1_000_003, 8_191, 104_729


def spec() -> FeatureSpec:
    cat = (CatFeature("user", 50, side="user"), CatFeature("item", 30, side="item"),
           CatFeature("page", 4, side="context"))
    return FeatureSpec(dense=(DenseFeature("price", transform="log1p"),), cat=cat,
                       history=HistorySpec("item", max_len=3), name="wide")


def rows(n: int, seed: int, *, xor: bool = True) -> Batch:
    """Clicks that need a cross: a click when the user's parity differs from the page's (and a little noise)."""
    rng = np.random.default_rng(seed)
    cat = np.column_stack([rng.integers(1, 50, n), rng.integers(1, 30, n), rng.integers(1, 4, n)]).astype(np.int64)
    dense = rng.exponential(20, (n, 1)).astype(np.float32)
    dense[rng.random(n) < 0.1, 0] = np.nan
    hist = rng.integers(0, 30, (n, 3)).astype(np.int64)
    signal = (cat[:, 0] % 2) != (cat[:, 2] % 2) if xor else rng.random(n) < 0.5
    labels = np.where(rng.random(n) < 0.1, rng.random(n) < 0.5, signal).astype(np.float32)
    return Batch({"dense": dense, "cat": cat, "hist": hist}, labels, np.arange(n), np.zeros(n, np.int64))


def test_columns_are_the_documented_rows():
    layer = L.WideLogit([0, 50, 80], 84, [[0, 1], [0, 2], [1, 2]], 97, 1, 2, 0)
    layer.build([(None, 3), (None, 1)])
    layer.edges.assign(np.array([[1.0, 10.0]], np.float32))
    cat = np.array([[7, 3, 2], [0, 29, 1]], np.int64)
    dense = np.array([[10.0], [np.nan]], np.float32)
    got = layer.columns(cat, dense).numpy()
    for r in range(2):
        a, b, c = (int(v) for v in cat[r])
        want = [a, 50 + b, 80 + c]
        want += [84 + (x * K1 + y * K2 + (p + 1) * K3) % 97 for p, (x, y) in enumerate([(a, b), (a, c), (b, c)])]
        # dense bucket: 0 = NaN, else 1 + #{edges <= x}; the dense rows start after the 84 + 97 id and cross rows
        want += [84 + 97 + (0 if np.isnan(dense[r, 0]) else 1 + int((dense[r, 0] >= np.array([1.0, 10.0])).sum()))]
        assert got[r].tolist() == want


@pytest.mark.parametrize("model", ["dcnv2", "deepfm", "seed"])
def test_fitted_wide_part_is_the_regression_and_the_model_starts_from_it(model):
    s = spec()
    train, valid = rows(3000, 0), rows(1000, 1)
    m = build_model(s, ModelConfig(model=model, wide=True, wide_buckets=512, mlp_units=(8,), seed_mlp=(8,),
                                   embedding_dim=4, attention_units=(4,), conv_filters=4))
    fill_data_layers(m, s, train)
    info = fit_wide(m, s, train, valid, grid=(1.0,))
    layer = m.get_layer(WIDE_LOGIT)
    # the regression's own logit (design matrix times the weights written into the graph) ...
    x = design(m, valid)
    w = np.concatenate([layer.table.numpy()[:, 0], layer.match_w.numpy()[:layer.n_match, 0]])
    logit = x @ w + layer.bias.numpy()[0]
    p_lr = 1 / (1 + np.exp(-logit))
    assert info["valid_auc"] == pytest.approx(M.auc(valid.labels, p_lr), abs=1e-6)
    # ... is what the model computes before any training, where the deep logits start at zero (dcnv2, seed;
    # deepfm's FM term does not start at zero, so only the wide layer's own output is compared there)
    wide_out = keras_predict(keras.Model(m.inputs, layer.output), valid.feeds).reshape(-1)
    np.testing.assert_allclose(wide_out, logit, rtol=1e-5, atol=1e-5)
    if model != "deepfm":
        np.testing.assert_allclose(keras_predict(m, valid.feeds).reshape(-1), p_lr, rtol=1e-4, atol=1e-6)
    assert all(not v.trainable for v in layer.weights)


def test_the_crosses_learn_what_single_ids_cannot():
    s = spec()
    train, valid = rows(4000, 0), rows(2000, 1)
    aucs = {}
    for buckets in (0, 4096):
        m = build_model(s, ModelConfig(wide=True, wide_buckets=buckets, mlp_units=(8,), embedding_dim=4))
        fill_data_layers(m, s, train)
        aucs[buckets] = fit_wide(m, s, train, valid, grid=(1.0,))["valid_auc"]
    # user parity x page parity is an interaction: per-id weights get only its marginal part (pages 1 and 3 are
    # odd, so an even user clicks 2/3 of the time: AUC about 0.67), the hashed pairs get it all (0.9 = the noise)
    assert aucs[0] < 0.72 and aucs[4096] > 0.85, aucs


def test_no_wide_part_fits_nothing_and_missing_scikit_learn_is_a_clear_error(monkeypatch):
    s = spec()
    train, valid = rows(200, 0), rows(100, 1)
    assert fit_wide(build_model(s, ModelConfig(wide=False, mlp_units=(4,), embedding_dim=4)), s, train, valid) is None
    m = build_model(s, ModelConfig(wide=True, wide_buckets=64, mlp_units=(4,), embedding_dim=4))
    monkeypatch.setitem(sys.modules, "sklearn.linear_model", None)
    with pytest.raises(ConfigError, match="scikit-learn"):
        fit_wide(m, s, train, valid)


def test_config_refuses_bad_wide_settings():
    with pytest.raises(ConfigError, match="wide:"):
        ModelConfig(wide="yes")
    with pytest.raises(ConfigError, match="wide_edges"):
        ModelConfig(wide_edges=0)


def test_the_pair_screen_keeps_the_interacting_pair_and_drops_the_noise():
    from ctredge.train.models import field_pairs
    from ctredge.train.wide import select_pairs

    s = spec()
    train, valid = rows(4000, 0), rows(2000, 1)
    m = build_model(s, ModelConfig(wide=True, wide_buckets=4096, mlp_units=(8,), embedding_dim=4))
    fill_data_layers(m, s, train)
    chosen, info = select_pairs(m, s, train, valid, grid=(1.0,))
    assert field_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    # user x page carries the click rule; user x item and item x page carry nothing the ids do not
    assert chosen == [1] and info["chosen"] == ["user x page"], info
    assert [name for name, _ in info["gains"]][0] == "user x page"
    gains = dict(info["gains"])
    assert gains["user x page"] > 0.05 > max(gains["user x item"], gains["item x page"])
    assert [g for _, g in info["gains"]] == sorted(gains.values(), reverse=True)
    # clicks without an interaction: no pair is worth crossing
    noise = rows(4000, 0, xor=False)
    assert select_pairs(m, s, noise, rows(2000, 1, xor=False), grid=(1.0,))[0] == []


def test_training_records_the_chosen_pairs_and_the_saved_config_rebuilds_the_graph(tmp_path):
    from ctredge.train.models import field_pairs

    s = spec()
    m = build_model(s, ModelConfig(wide=True, wide_buckets=512, wide_pairs=(1,), mlp_units=(8,), embedding_dim=4))
    assert m.get_layer(WIDE_LOGIT).pairs == [list(field_pairs(3)[1])]
    none = build_model(s, ModelConfig(wide=True, wide_buckets=512, wide_pairs=(), mlp_units=(8,), embedding_dim=4))
    layer = none.get_layer(WIDE_LOGIT)
    assert layer.pairs == [] and layer.n_rows == s.total_buckets + 1 * (layer.n_edges + 2)
    with pytest.raises(ConfigError, match="below the 3 pairs"):
        build_model(s, ModelConfig(wide=True, wide_pairs=(3,)))
    with pytest.raises(ConfigError, match="distinct pair indices"):
        ModelConfig(wide_pairs=(1, 1))
    assert ModelConfig(wide_pairs=[2, 0]).wide_pairs == (0, 2)


def test_the_screened_pairs_are_kept_only_when_they_beat_every_pair_on_valid():
    from ctredge.train.train import screened_wide_part

    s = spec()
    for xor in (True, False):
        train, valid = rows(4000, 0, xor=xor), rows(2000, 1, xor=xor)
        cfg = ModelConfig(wide=True, wide_buckets=4096, mlp_units=(8,), embedding_dim=4)
        m = build_model(s, cfg)
        fill_data_layers(m, s, train)
        model, new_cfg, record = screened_wide_part(m, s, cfg, train, valid)
        layer = model.get_layer(WIDE_LOGIT)
        screen = record["pairs"]
        assert screen["kept"] in ("screened", "every pair") and "valid_logloss" in screen["every_pair"]
        if screen["kept"] == "screened":
            assert record["valid_logloss"] <= screen["every_pair"]["valid_logloss"]
            assert [list(p) for p in layer.pairs] == [[a, b] for a, b in (build_model(s, cfg).get_layer(
                WIDE_LOGIT).pairs[k] for k in new_cfg.wide_pairs)]
        else:
            assert record["valid_logloss"] < 1e9 and new_cfg.wide_pairs == (0, 1, 2) and len(layer.pairs) == 3
        # the graph computes the regression that was fitted
        assert record["valid_auc"] == pytest.approx(M.auc(valid.labels, keras_predict(
            keras.Model(model.inputs, layer.output), valid.feeds).reshape(-1)), abs=2e-6)  # rounded to 6 places
        if xor:  # the interaction's pair beats crossing every pair
            assert screen["kept"] == "screened" and 1 in new_cfg.wide_pairs and len(new_cfg.wide_pairs) < 3


@pytest.mark.slow
def test_train_screens_the_pairs_with_enough_valid_rows_and_records_them(tmp_path, monkeypatch):
    import json

    import ctredge.train.wide as W
    from ctredge.datagen import generate
    from ctredge.train.train import TrainConfig, load_trained, train

    data = tmp_path / "clicks.tsv"
    generate(str(data), rows=3000, seed=0, history=True, click_rate=0.2)
    cfg = ModelConfig(model="dcnv2", embedding_dim=4, cross_layers=1, mlp_units=(8,), wide=True, wide_buckets=2048)

    def run(out):
        train(TrainConfig(data=(str(data),), out=str(out), epochs=1, verbose=0, split_valid=0.15, split_test=0.15), cfg)
        return json.loads((out / "manifest.json").read_text()), json.loads((out / "model_config.json").read_text())

    manifest, saved = run(tmp_path / "small")          # 450 valid rows: too few to screen, every pair crossed
    assert saved["wide_pairs"] is None and "pairs" not in manifest["metrics"]["wide"]
    monkeypatch.setattr(W, "SELECT_MIN_VALID_ROWS", 100)
    manifest, saved = run(tmp_path / "screened")
    screen = manifest["metrics"]["wide"]["pairs"]
    assert screen["kept"] in ("screened", "every pair") and len(screen["gains"]) == 55
    assert saved["wide_pairs"] is not None
    model = load_trained(tmp_path / "screened")[0]
    assert len(model.get_layer(WIDE_LOGIT).pairs) == len(saved["wide_pairs"])
