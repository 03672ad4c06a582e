"""The history's attributes, matches and recency: ctredge.vocab, ItemAttributes, HistoryMatch, RecencyAttention."""

from __future__ import annotations

import numpy as np
import pytest

from ctredge.errors import ConfigError
from ctredge.features import CatFeature, FeatureSpec, HistorySpec
from ctredge.reader import Batch
from ctredge.train import layers as L
from ctredge.train.models import HISTORY_ATTRIBUTES, ModelConfig, attribute_fields, build_model
from ctredge.train.train import fill_data_layers, set_remap, training_vocabulary
from ctredge.vocab import count_rows, item_attribute_table, vocab_remap


def spec(max_len: int = 4) -> FeatureSpec:
    cat = (CatFeature("user", 11, side="user"), CatFeature("item", 13, side="item"),
           CatFeature("category", 5, side="item"), CatFeature("page", 3, side="context"))
    return FeatureSpec(dense=(), cat=cat, history=HistorySpec("item", max_len=max_len), name="hist")


def batch(cat, hist) -> Batch:
    cat, hist = np.asarray(cat, np.int64), np.asarray(hist, np.int64)
    n = len(cat)
    return Batch({"cat": cat, "hist": hist}, np.zeros(n, np.float32), np.arange(n), np.zeros(n, np.int64))


def test_item_attribute_table_takes_the_most_frequent_value_and_ties_to_the_smaller():
    cat = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 3], [0, 2, 4], [0, 2, 3], [0, 0, 4], [0, 3, 0]])
    table = item_attribute_table(cat, 1, [2], 5)
    assert table.dtype == np.int32 and table.shape == (5, 1)
    # item 1: 2 twice, 3 once -> 2; item 2: 4 and 3 once each -> 3 (smaller); item 3 only an empty value -> 0;
    # item 0 (empty) and item 4 (never a candidate) -> 0
    assert table[:, 0].tolist() == [0, 2, 3, 0, 0]


def test_item_attribute_table_refuses_bad_input():
    with pytest.raises(ConfigError, match="integer ids"):
        item_attribute_table(np.zeros((3, 2), np.float32), 0, [1], 4)
    with pytest.raises(ConfigError, match="out of range"):
        item_attribute_table(np.zeros((3, 2), np.int64), 0, [2], 4)
    with pytest.raises(ConfigError, match=r"\[0, 4\)"):
        item_attribute_table(np.array([[7, 1]]), 0, [1], 4)


def test_recency_buckets():
    assert L.recency_buckets(12) == [0, 1, 2, 3, 3, 4, 4, 4, 4, 4, 5, 5]


def test_history_match_counts_matches_by_recency():
    # one row: history (oldest first) items 5, 7, 5 (then padding); candidate item 5, category 2
    cand = np.array([[5, 2], [5, 2]], np.int64)
    hist = np.array([[5, 7, 5, 0], [0, 0, 0, 0]], np.int64)
    attr = np.array([[[2], [2], [1], [0]], [[0], [0], [0], [0]]], np.int64)
    out = L.HistoryMatch(max_len=4)([cand, hist, attr]).numpy()
    r = max(L.recency_buckets(4)) + 1          # 4 buckets for L = 4: recency 0, 1, 2, 3
    counts = np.exp(out[:, :r * 2].reshape(2, r, 2)) - 1
    # recency 0 = item 5 (cat 1): item match; recency 1 = item 7 (cat 2): category match;
    # recency 2 = item 5 (cat 2): both
    np.testing.assert_allclose(counts[0], [[1, 0], [0, 1], [1, 1], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(out[0, r * 2:r * 2 + 2], [2 / 3, 2 / 3], atol=1e-6)
    np.testing.assert_allclose(out[0, -1], np.log(4.0), atol=1e-6)
    np.testing.assert_array_equal(out[1], np.zeros_like(out[1]))   # empty history: all zero, never NaN


def test_history_match_ignores_unknown_candidate_values():
    cand = np.array([[3, 0]], np.int64)                        # candidate's category unknown (0)
    hist = np.array([[3, 4, 0, 0]], np.int64)
    attr = np.array([[[0], [0], [0], [0]]], np.int64)          # history categories unknown too
    out = L.HistoryMatch(max_len=4)([cand, hist, attr]).numpy()
    r = max(L.recency_buckets(4)) + 1
    counts = np.exp(out[:, :r * 2].reshape(1, r, 2)) - 1
    assert counts[0, :, 1].sum() == pytest.approx(0.0)         # 0 == 0 is no match
    assert counts[0, 1, 0] == pytest.approx(1.0)               # item 3 is the second most recent


def test_recency_attention_respects_the_mask_and_empty_rows():
    rng = np.random.default_rng(0)
    att = L.RecencyAttention(units=(4,), recency_dim=3, max_len=4)
    q = rng.normal(size=(2, 6)).astype(np.float32)
    keys = rng.normal(size=(2, 4, 6)).astype(np.float32)
    ids = np.array([[3, 1, 0, 0], [0, 0, 0, 0]], np.int64)
    out = att([q, keys, ids]).numpy()
    assert out.shape == (2, 12)
    np.testing.assert_array_equal(out[1], np.zeros(12, np.float32))
    keys2 = keys.copy()
    keys2[0, 2:] = 99.0                                        # padding positions never matter
    np.testing.assert_allclose(att([q, keys2, ids]).numpy(), out, rtol=1e-6)


@pytest.mark.parametrize("name", ["dcnv2", "deepfm", "seed"])
def test_models_use_the_learned_attribute_table(name):
    sp = spec()
    cfg = ModelConfig(model=name, embedding_dim=4, mlp_units=(8,), cross_layers=1, seed_mlp=(8,), conv_filters=4,
                      wide=False)  # the wide part's zero-started logits would hide the deep part
    model = build_model(sp, cfg)
    assert attribute_fields(sp) == [2]
    rows = batch([[1, 3, 2, 1], [2, 4, 1, 0], [3, 3, 2, 2]], [[4, 0, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0]])
    fill_data_layers(model, sp, rows)
    table = model.get_layer(HISTORY_ATTRIBUTES).get_weights()[0]
    assert table[3, 0] == 2 and table[4, 0] == 1 and table[5, 0] == 0
    feeds = {"cat": np.array([[1, 3, 2, 1]], np.int64), "hist": np.array([[4, 0, 0, 0]], np.int64)}
    before = model.predict(feeds, verbose=0)
    table[4, 0] = 2                                            # item 4 is now "in category 2"
    model.get_layer(HISTORY_ATTRIBUTES).set_weights([table])
    assert not np.allclose(model.predict(feeds, verbose=0), before)


def test_history_options_off_build_the_plain_history_model():
    sp = spec()
    model = build_model(sp, ModelConfig(embedding_dim=4, mlp_units=(8,), cross_layers=1,
                                        history_attributes=False, history_match=False, recency_dim=0))
    names = {layer.name for layer in model.layers}
    assert HISTORY_ATTRIBUTES not in names and "history_match" not in names
    with pytest.raises(ConfigError, match="history_match"):
        ModelConfig(history_match="yes")


def test_training_vocabulary_sends_rare_ids_to_their_features_row_zero():
    sp = spec()
    rows = batch([[1, 3, 2, 1], [1, 4, 1, 1], [2, 3, 2, 2]], [[3, 0, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0]])
    counts, n = count_rows([rows], sp)
    assert n == 3
    remap, cfg = training_vocabulary(sp, ModelConfig(embedding_dim=4, mlp_units=(8,), cross_layers=1), rows, 2)
    ref, kept = vocab_remap(counts, sp, 2)
    np.testing.assert_array_equal(remap, ref)
    assert cfg.vocab_rows == len(kept) < sp.total_buckets
    model = build_model(sp, cfg)
    set_remap(model, remap)
    emb = model.get_layer("embedding")
    np.testing.assert_array_equal(emb.remap.numpy(), remap)
    off = sp.offsets
    # user 2 was seen once: it shares user's row 0; user 1 (twice) keeps its own row
    assert remap[off[0] + 2] == remap[off[0]] and remap[off[0] + 1] != remap[off[0]]


def test_learning_rate_schedule_decays_over_the_first_epoch():
    from ctredge.train.train import LR_FLOOR, MIN_DECAY_STEPS, TrainConfig, learning_rate_schedule

    cfg = TrainConfig(data=("x.tsv",), out="o", batch_size=100, learning_rate=2e-3)
    sched = learning_rate_schedule(cfg, 100_000)               # 1,000 steps per epoch
    assert float(sched(0)) == pytest.approx(2e-3)
    assert float(sched(1000)) == pytest.approx(2e-3 * LR_FLOOR)
    assert float(sched(3000)) == pytest.approx(2e-3 * LR_FLOOR)  # flat after the decay
    small = learning_rate_schedule(cfg, 1000)                  # 10 steps per epoch: the decay's minimum length
    assert float(small(10)) > 0.9 * 2e-3 and float(small(MIN_DECAY_STEPS)) == pytest.approx(2e-3 * LR_FLOOR)
    assert learning_rate_schedule(TrainConfig(data=("x.tsv",), out="o", lr_decay_epochs=0), 100_000) == 2e-3
    assert learning_rate_schedule(cfg, None) == 2e-3            # streamed rows: count unknown, constant
    with pytest.raises(ConfigError, match="lr_decay_epochs"):
        TrainConfig(data=("x.tsv",), out="o", lr_decay_epochs=-1)


def test_query_and_candidate_of_one_vocabulary_hash_alike_and_are_matched():
    cat = (CatFeature("query_cat", 7, vocabulary="category"), CatFeature("category", 7, side="item"),
           CatFeature("item", 5, side="item"))
    sp = FeatureSpec(dense=(), cat=cat, name="q")
    ids = sp.hash_cat(np.array([[b"shoes", b"shoes", b"a"], [b"hats", b"shoes", b"b"]], dtype=object))
    assert ids[0, 0] == ids[0, 1] and ids[1, 0] != ids[1, 1]
    from ctredge.train.models import vocabulary_pairs
    assert vocabulary_pairs(sp) == [(0, 1)]
    out = L.VocabularyMatch([(0, 1)])(ids).numpy()
    assert out[:, 0].tolist() == [1.0, 0.0]
    with pytest.raises(Exception, match="same buckets"):
        FeatureSpec(dense=(), cat=(CatFeature("a", 7, vocabulary="v"), CatFeature("b", 9, vocabulary="v")))
