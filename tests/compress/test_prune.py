"""Tests of ctredge.compress.prune on a tiny planted click log.

The click log is made here: users and items drawn Zipf-like (so many buckets are
rare, which vocabulary pruning needs), a click logit of item, user, position,
price and history-affinity effects, and a history column of the user's
favourite item group.  One dcnv2 model is trained for 2 epochs and pruned with
every method at once; smaller runs check the other architectures and the errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from ctredge.compress.prune import (MIN_PRUNABLE, PruneConfig, count_rows, magnitude_mask, polynomial_sparsity,
                                    prunable_weights, prune, shrink, unit_scores, vocab_remap)
from ctredge.config import config_from_dict, config_to_dict
from ctredge.errors import ArtifactError, ConfigError, DataError
from ctredge.features import CatFeature, DenseFeature, FeatureSpec, HistorySpec
from ctredge.metrics import auc
from ctredge.reader import read_all
from ctredge.train import layers as L
from ctredge.train.models import ModelConfig, build_model, model_summary
from ctredge.dataplan import DataPlan
from ctredge.train.loop import keras_predict as predict
from ctredge.train.train import TrainConfig, load_trained, train

N_USERS, N_ITEMS, N_GROUPS, HIST_LEN = 500, 150, 4, 6


def make_spec() -> FeatureSpec:
    return FeatureSpec(
        dense=(DenseFeature("clicks_7d", side="user"),
               DenseFeature("price_z", side="item", transform="identity", integer=False)),
        cat=(CatFeature("user_id", 400, side="user"), CatFeature("item_id", 200, side="item"),
             CatFeature("brand", 24, side="item"), CatFeature("position", 9, side="context")),
        history=HistorySpec("item_id", max_len=HIST_LEN), name="tiny-prune")


def write_click_log(folder: Path, rows: int = 4000, seed: int = 0) -> tuple[Path, Path]:
    """A TSV click log with a planted signal and its spec JSON; returns both paths."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, N_GROUPS, N_ITEMS)
    item_effect = rng.normal(0.0, 1.0, N_ITEMS)
    user_effect = rng.normal(0.0, 0.5, N_USERS)
    user_pref = rng.integers(0, N_GROUPS, N_USERS)
    zipf_u = 1.0 / np.arange(1, N_USERS + 1) ** 0.9
    zipf_i = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.7
    user = rng.choice(N_USERS, rows, p=zipf_u / zipf_u.sum())
    item = rng.choice(N_ITEMS, rows, p=zipf_i / zipf_i.sum())
    pos = rng.integers(1, 7, rows)
    clicks = rng.poisson(2.0, rows)
    price = rng.normal(0.0, 1.0, rows)
    lines = []
    for r in range(rows):
        n = rng.integers(0, HIST_LEN + 1)
        liked = np.flatnonzero(group == user_pref[user[r]])
        hist = np.where(rng.random(n) < 0.8, rng.choice(liked, n), rng.integers(0, N_ITEMS, n))
        affinity = float(np.mean(group[hist] == group[item[r]])) if n else 0.3
        logit = (-1.0 + item_effect[item[r]] + user_effect[user[r]] - 0.35 * (pos[r] - 1)
                 + 0.3 * np.log1p(clicks[r]) - 0.4 * price[r] + 3.0 * (affinity - 0.3))
        label = int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
        clicks_field = "" if rng.random() < 0.1 else str(clicks[r])
        lines.append("\t".join([str(label), clicks_field, f"{price[r]:.3f}", f"u{user[r]}", f"i{item[r]}",
                                f"b{item[r] % 17}", str(pos[r]), ",".join(f"i{h}" for h in hist)]))
    data = folder / "clicks.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec_path = folder / "clicks.spec.json"
    make_spec().save(str(spec_path))
    return data, spec_path


def train_tiny(folder: Path, data: Path, spec: Path, model_cfg: ModelConfig, name: str) -> Path:
    out = folder / name
    train(TrainConfig(data=(str(data),), out=str(out), spec=str(spec), batch_size=128, epochs=2,
                      learning_rate=5e-3, split_valid=0.15, split_test=0.15, verbose=0,
                      min_count=1, lr_decay_epochs=0), model_cfg)
    # every id its own row (the vocabulary pruning is under test), a constant rate (tiny data, 2 epochs)
    return out


def small_cfg(**overrides) -> PruneConfig:
    base = dict(sparsity=0.5, structured=0.5, vocab_min_count=3, epochs=2, batch_size=128,
                learning_rate=2e-3, frequency=5, verbose=0, distill_alphas=(0.0,))
    base.update(overrides)
    return PruneConfig(**base)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prune")


@pytest.fixture(scope="module")
def click_log(workdir) -> tuple[Path, Path]:
    return write_click_log(workdir)


@pytest.fixture(scope="module")
def trained(workdir, click_log) -> Path:
    # wide off: its fitted table (hashed crosses) is not pruned and would dominate the tiny model's bytes
    cfg = ModelConfig(model="dcnv2", embedding_dim=8, cross_layers=2, mlp_units=(64, 32), wide=False)
    return train_tiny(workdir, *click_log, cfg, "trained")


@pytest.fixture(scope="module")
def pruned(workdir, trained) -> tuple[Path, dict]:
    out = workdir / "pruned"
    return out, prune(trained, out, small_cfg(distill_alphas=(0.0, 1.0)))


# ---------------------------------------------------------------- the whole stage
@pytest.mark.slow
def test_unstructured_sparsity_reaches_target_per_layer(pruned):
    out, manifest = pruned
    sparsity = manifest["extra"]["sparsity"]
    assert {"cross_0/v", "cross_0/u", "deep_dense_0/kernel", "history_attention/kernel_0"} <= set(sparsity)
    model, _, _ = load_trained(out)
    for w in prunable_weights(model):  # the saved weights: exact zeros, nothing to strip
        got = float(np.mean(w.numpy() == 0))
        assert abs(got - 0.5) <= 0.01, f"{w.path}: sparsity {got:.4f}"
        assert sparsity[w.path] == pytest.approx(got)
    biases = [w for layer in model.layers for w in layer.weights if w.name == "bias"]
    assert all(np.mean(w.numpy() == 0) < 0.5 for w in biases if w.shape[0] > 4)
    assert not any("prune" in type(layer).__name__.lower() for layer in model.layers)


@pytest.mark.slow
def test_structured_pruning_shrinks_params_and_onnx(workdir, trained, pruned):
    from ctredge.export.onnx import export

    out, manifest = pruned
    extra = manifest["extra"]
    assert extra["units"] == {"before": [64, 32], "after": [32, 16]}
    assert extra["cross_rank"]["before"] == 0 and 0 < extra["cross_rank"]["after"] < extra["cross_rank"]["width"] / 2
    assert extra["params"]["total"] < extra["params_before"]["total"]
    assert extra["params"]["dense"] < 0.6 * extra["params_before"]["dense"]
    assert extra["params_nonzero"] < extra["params"]["total"]
    model_cfg = json.loads((out / "model_config.json").read_text())
    assert model_cfg["mlp_units"] == [32, 16] and model_cfg["cross_rank"] == extra["cross_rank"]["after"]
    full = export(trained, workdir / "onnx_full")
    small = export(out, workdir / "onnx_pruned")
    assert small["extra"]["onnx_bytes"] < 0.8 * full["extra"]["onnx_bytes"]
    assert small["parent"]["stage"] == "prune"


@pytest.mark.slow
def test_vocabulary_pruning_remaps_rare_ids_to_row_zero(pruned, trained):
    import onnx
    from onnx import numpy_helper

    out, manifest = pruned
    model, spec, man = load_trained(out)
    rows = manifest["extra"]["vocab_rows"]
    assert rows["before"] == spec.total_buckets and rows["after"] < 0.8 * rows["before"]
    table = model.get_layer("embedding")
    assert table.kept_rows == rows["after"] and tuple(table.embeddings.shape) == (rows["after"], 8)
    train_rows = DataPlan.from_manifest(man["data"]).read("train", spec)
    counts, _ = count_rows(iter([train_rows]), spec)
    user_counts = counts[:spec.cat[0].buckets]
    rare = int(np.flatnonzero((user_counts > 0) & (user_counts < 3))[0])
    common = int(np.argmax(user_counts))
    cat = np.array([[rare, 5, 3, 2], [0, 5, 3, 2], [common, 5, 3, 2]], dtype=np.int64)
    emb = table(cat).numpy()
    np.testing.assert_array_equal(emb[0, 0], emb[1, 0])
    assert not np.array_equal(emb[2, 0], emb[1, 0])
    np.testing.assert_array_equal(emb[0, 1:], emb[2, 1:])
    # the float table is the direct data input of a Gather fed by the int32 remap's Gather
    onnx_dir = out.parent / "onnx_pruned_graph"
    from ctredge.export.onnx import export
    export(out, onnx_dir)
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    table_gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                     and inits[n.input[0]].shape == (rows["after"], 8)]
    assert table_gathers and all(inits[n.input[0]].dtype == np.float32 for n in table_gathers)
    for n in table_gathers:
        src = producers[n.input[1]]
        assert src.op_type == "Gather" and inits[src.input[0]].dtype == np.int32
        assert inits[src.input[0]].shape == (spec.total_buckets,)


@pytest.mark.slow
def test_pruned_artifact_loads_saves_and_predicts_identically(pruned, tmp_path):
    out, manifest = pruned
    model, spec, man = load_trained(out)
    assert man["stage"] == "prune" and man["parent"]["stage"] == "train"
    assert man["data"]["parts"] == json.loads((out.parent / "trained" / "manifest.json").read_text())["data"]["parts"]
    test = DataPlan.from_manifest(man["data"]).read("test", spec)
    p = predict(model, test.feeds)
    assert auc(test.labels, p) == pytest.approx(manifest["metrics"]["test_auc"], abs=1e-6)
    model.save(tmp_path / "again.keras")
    again = keras.models.load_model(tmp_path / "again.keras")
    np.testing.assert_array_equal(predict(again, test.feeds), p)


@pytest.mark.slow
def test_auc_after_pruning_is_reported_and_close(pruned):
    _, manifest = pruned
    m = manifest["metrics"]
    for key in ("test_auc", "test_logloss", "test_calibration", "valid_auc"):
        assert np.isfinite(m[key]) and np.isfinite(m["before"][key])
    assert m["before"]["test_auc"] > 0.64  # the trained model learned the planted signal (tiny data: ~0.69)
    assert m["test_auc"] > m["before"]["test_auc"] - 0.05, (m["before"]["test_auc"], m["test_auc"])
    assert m["epochs"] >= 1 and m["seconds"] > 0 and len(m["history"]["val_auc"]) == m["epochs"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ("deepfm", "seed"))
def test_other_architectures_prune_and_reload(workdir, click_log, arch):
    cfg = ModelConfig(model=arch, embedding_dim=8, mlp_units=(32, 16), seed_mlp=(32, 16), conv_filters=8,
                      history_pooling="mean")
    trained_dir = train_tiny(workdir, *click_log, cfg, f"trained_{arch}")
    manifest = prune(trained_dir, workdir / f"pruned_{arch}", small_cfg(epochs=1))
    extra = manifest["extra"]
    assert extra["units"]["after"] == [16, 8]
    assert extra["params"]["total"] < extra["params_before"]["total"]
    for path, s in extra["sparsity"].items():
        assert abs(s - 0.5) <= 0.01, path
    model, _, _ = load_trained(workdir / f"pruned_{arch}")
    tables = [layer for layer in model.layers if isinstance(layer, L.SharedEmbedding)]
    assert tables and all(t.kept_rows == extra["vocab_rows"]["after"] for t in tables)
    assert manifest["metrics"]["test_auc"] > 0.6


# ---------------------------------------------------------------- one-shot shrinking
def test_shrink_without_structured_pruning_keeps_predictions(click_log):
    """Vocabulary pruning alone changes nothing for rows whose ids all survive."""
    data, _ = click_log
    spec = make_spec()
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(model="dcnv2", embedding_dim=4, cross_layers=1, mlp_units=(16,))
    model = build_model(spec, cfg)
    batch = read_all(data, spec)
    counts, _ = count_rows(iter([batch]), spec)
    small, small_cfg_, report = shrink(model, spec, cfg, PruneConfig(structured=0.0, vocab_min_count=2), counts)
    assert small_cfg_.vocab_rows == report["vocab_rows"]["after"] < spec.total_buckets
    assert small_cfg_.mlp_units == (16,) and small_cfg_.cross_rank == 0
    survives = counts >= 2
    survives[spec.offsets] = True  # row 0 of each feature (and history padding) always survives
    common = survives[batch.feeds["cat"] + spec.offsets].all(1) & survives[batch.feeds["hist"] + spec.offsets[1]].all(1)
    assert common.sum() > 100
    feeds = {k: v[common] for k, v in batch.feeds.items()}
    np.testing.assert_allclose(predict(small, feeds), predict(model, feeds), atol=1e-6)
    assert model_summary(small)["embedding"] == 4 * small_cfg_.vocab_rows
    assert model_summary(small)["remap"] == spec.total_buckets


def test_wide_pruning_zeros_the_smallest_weights_and_shrink_applies_it():
    from ctredge.compress.prune import prune_wide
    from ctredge.train.wide import wide_layer

    spec = make_spec()
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(model="dcnv2", embedding_dim=4, cross_layers=1, mlp_units=(16,), wide=True, wide_buckets=512)
    model = build_model(spec, cfg)
    layer = wide_layer(model)
    n = layer.n_rows
    table = np.random.default_rng(0).permutation(np.arange(1, n + 1)).astype(np.float32).reshape(-1, 1)
    table[::2] *= -1                                             # magnitude, not sign, decides
    layer.table.assign(table)
    layer.bias.assign(np.array([0.3], np.float32))
    assert prune_wide(model, 0.0) is None
    rec = prune_wide(model, 0.75)
    kept = layer.table.numpy()
    assert rec == {"weights": n, "nonzero_before": n, "nonzero_after": n - round(0.75 * n), "sparsity": 0.75}
    assert np.count_nonzero(kept) == n - round(0.75 * n)
    assert np.abs(kept[kept != 0]).min() > np.abs(table[kept == 0]).max()  # the largest |w| survive, unchanged
    np.testing.assert_array_equal(kept[kept != 0], table[kept != 0])
    assert float(layer.bias.numpy()[0]) == pytest.approx(0.3)                # the bias is never pruned
    layer.table.assign(table)
    small, _, report = shrink(model, spec, cfg, PruneConfig(structured=0.0, wide_sparsity=0.5))
    assert report["wide"]["nonzero_after"] == n - round(0.5 * n)
    assert np.count_nonzero(wide_layer(small).table.numpy()) == n - round(0.5 * n)
    assert np.count_nonzero(layer.table.numpy()) == n                        # the parent is read, never changed


def test_structured_pruning_keeps_the_strongest_units():
    spec = make_spec()
    keras.utils.set_random_seed(0)
    cfg = ModelConfig(model="dcnv2", embedding_dim=4, cross_layers=1, cross_rank=6, mlp_units=(8,))
    model = build_model(spec, cfg)
    dense, logit = model.get_layer("deep_dense_0"), model.get_layer("logit")
    w, b = dense.get_weights()
    w[:, [1, 4, 6]] *= 10.0  # three units made clearly stronger
    dense.set_weights([w, b])
    logit.set_weights([np.ones((8, 1), np.float32), np.zeros(1, np.float32)])
    small, small_cfg_, report = shrink(model, spec, cfg, PruneConfig(structured=0.6))
    assert small_cfg_.mlp_units == (3,) and small_cfg_.cross_rank == 2
    np.testing.assert_array_equal(small.get_layer("deep_dense_0").get_weights()[0], w[:, [1, 4, 6]])
    np.testing.assert_array_equal(small.get_layer("logit").get_weights()[0], logit.get_weights()[0][[1, 4, 6]])
    # the rank-2 cross kernel is the best rank-2 approximation of the rank-6 one
    old, new = model.get_layer("cross_0"), small.get_layer("cross_0")
    full = old.v.numpy() @ old.u.numpy()
    s = np.linalg.svd(full, compute_uv=False)
    err = np.linalg.norm(full - new.v.numpy() @ new.u.numpy())
    assert err == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-3)


# ---------------------------------------------------------------- building blocks
def test_polynomial_schedule_values():
    assert polynomial_sparsity(0, 0.8, 0, 100) == 0.0
    assert polynomial_sparsity(50, 0.8, 0, 100) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert polynomial_sparsity(100, 0.8, 0, 100) == 0.8
    assert polynomial_sparsity(500, 0.8, 0, 100) == 0.8
    assert polynomial_sparsity(15, 0.5, 10, 20) == pytest.approx(0.5 - 0.5 * 0.5 ** 3)
    steps = [polynomial_sparsity(t, 0.9, 0, 40) for t in range(41)]
    assert all(a <= b for a, b in zip(steps, steps[1:]))


def test_magnitude_mask_is_exact_under_ties():
    w = np.array([[0.0, 0.0, 0.0, 3.0], [-5.0, 0.5, -0.1, 2.0]])
    keep = magnitude_mask(w, 0.5)
    assert keep.sum() == 4
    np.testing.assert_array_equal(keep, [[False, False, False, True], [True, True, False, True]])
    assert magnitude_mask(w, 0.0).all()
    big = np.random.default_rng(0).normal(size=(33, 7))
    assert (~magnitude_mask(big, 0.3)).sum() == round(0.3 * big.size)


def test_vocab_remap_collapses_rare_rows_onto_row_zero():
    spec = FeatureSpec(dense=(), cat=(CatFeature("a", 4), CatFeature("b", 3)))
    counts = np.array([0, 5, 1, 2,   9, 0, 3])  # global rows: a0..a3, b0..b2
    remap, kept = vocab_remap(counts, spec, 2)
    np.testing.assert_array_equal(kept, [0, 1, 3, 4, 6])
    np.testing.assert_array_equal(remap, [0, 1, 0, 2, 3, 3, 4])
    assert remap.dtype == np.int32


def test_count_rows_counts_cat_and_history():
    spec = FeatureSpec(dense=(), cat=(CatFeature("u", 3), CatFeature("i", 4)), history=HistorySpec("i", max_len=3))

    class B:
        feeds = {"cat": np.array([[1, 2], [1, 3]]), "hist": np.array([[2, 2, 0], [0, 0, 0]])}

        def __len__(self):
            return 2

    counts, rows = count_rows(iter([B()]), spec)
    np.testing.assert_array_equal(counts, [0, 2, 0, 0, 0, 3, 1])
    assert rows == 2


def test_unit_scores_are_rescaling_invariant():
    rng = np.random.default_rng(0)
    w_in, b, w_out = rng.normal(size=(5, 3)), rng.normal(size=3), rng.normal(size=(3, 2))
    c = np.array([10.0, 0.1, 1.0])
    np.testing.assert_allclose(unit_scores(w_in * c, b * c, w_out / c[:, None]), unit_scores(w_in, b, w_out))


def test_prunable_weights_skip_embeddings_biases_and_small_kernels():
    model = build_model(make_spec(), ModelConfig(model="dcnv2", embedding_dim=4, cross_layers=1, mlp_units=(16,)))
    paths = {w.path for w in prunable_weights(model)}
    assert paths == {"cross_0/kernel", "deep_dense_0/kernel", "history_attention/kernel_0"}
    assert model.get_layer("logit").kernel.shape[0] < MIN_PRUNABLE


def test_shared_embedding_with_remap_round_trips_config_and_weights():
    layer = L.SharedEmbedding(total_buckets=9, dim=2, offsets=[0, 5], hist_offset=5, kept_rows=4, name="t")
    cat, hist = np.array([[1, 2], [3, 0]], np.int64), np.array([[1, 3, 0]], np.int64)
    layer([cat, hist[[0, 0]]])
    layer.remap.assign(np.array([0, 1, 0, 2, 0, 3, 3, 3, 3], np.int32))
    layer.embeddings.assign(np.arange(8, dtype=np.float32).reshape(4, 2))
    cat_emb, hist_emb = (t.numpy() for t in layer([cat, hist[[0, 0]]]))
    np.testing.assert_array_equal(cat_emb[:, 0], [[2, 3], [4, 5]])  # ids 1, 3 of feature 0 -> rows 1, 2
    np.testing.assert_array_equal(cat_emb[:, 1], [[6, 7], [6, 7]])  # feature 1 collapsed onto its row 0
    np.testing.assert_array_equal(hist_emb[0], [[6, 7], [6, 7], [0, 0]])
    config = layer.get_config()
    assert config["kept_rows"] == 4
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    revived([cat, hist[[0, 0]]])
    revived.set_weights(layer.get_weights())
    assert revived.remap.dtype == "int32" and not revived.remap.trainable
    np.testing.assert_array_equal(revived(cat).numpy(), cat_emb)
    old_config = {k: v for k, v in config.items() if k != "kept_rows"}  # saved before kept_rows existed
    assert L.SharedEmbedding.from_config(old_config).kept_rows is None
    with pytest.raises(ValueError, match="kept_rows"):
        L.SharedEmbedding(total_buckets=9, dim=2, offsets=[0], kept_rows=10)
    with pytest.raises(ConfigError, match="vocab_rows"):
        build_model(make_spec(), ModelConfig(vocab_rows=10_000))


# ---------------------------------------------------------------- config and refusals
@pytest.mark.parametrize("field, value, expected", [
    ("sparsity", 1.0, r"\[0, 1\)"),
    ("sparsity", -0.1, r"\[0, 1\)"),
    ("structured", "half", r"\[0, 1\)"),
    ("wide_sparsity", 1.0, r"\[0, 1\)"),
    ("vocab_min_count", -1, "integer >= 0"),
    ("vocab_min_count", 2.5, "integer >= 0"),
    ("epochs", True, "integer >= 0"),
    ("batch_size", 0, "integer >= 1"),
    ("learning_rate", 0.0, "> 0"),
    ("frequency", 0, "integer >= 1"),
    ("end_step", 0, "begin_step"),
    ("data", "clicks.tsv", "list of file paths"),
    ("distill_alphas", (), "non-empty list"),
    ("distill_alphas", (0.5, 1.5), "numbers in"),
])
def test_bad_config_raises(field, value, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        PruneConfig(**{field: value})
    assert field in str(info.value) and (repr(value) in str(info.value) or field == "distill_alphas")


def test_config_json_round_trip_rejects_unknown_keys():
    cfg = PruneConfig(sparsity=0.7, data=["a.tsv"])
    assert cfg.data == ("a.tsv",)
    assert config_from_dict(PruneConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(PruneConfig, {"sparsty": 0.5})


@pytest.mark.slow
def test_tampered_artifact_is_refused(workdir, trained):
    bad = workdir / "tampered"
    shutil.copytree(trained, bad)
    with open(bad / "model_config.json", "a", encoding="utf-8") as fh:
        fh.write("\n")
    with pytest.raises(ArtifactError, match="model_config.json"):
        prune(bad, workdir / "from_tampered", small_cfg())
    assert not (workdir / "from_tampered").exists()
    with pytest.raises(ArtifactError, match="not a ctredge artifact"):
        prune(workdir, workdir / "from_nothing", small_cfg())
    with pytest.raises(ConfigError, match="differ"):
        prune(trained, trained, small_cfg())


@pytest.mark.slow
def test_changed_or_moved_data_is_refused_and_override_works(workdir, trained, click_log):
    data, _ = click_log
    moved = workdir / "moved.tsv"
    shutil.copyfile(data, moved)
    out = workdir / "pruned_moved"
    manifest = prune(trained, out, small_cfg(epochs=0, vocab_min_count=0, data=(str(moved),)))
    assert manifest["data"]["parts"]["test"]["paths"] == [str(moved)]
    assert manifest["metrics"]["epochs"] == 0
    assert all(abs(s - 0.5) <= 0.01 for s in manifest["extra"]["sparsity"].values())
    changed = workdir / "changed.tsv"
    changed.write_text(data.read_text().replace("\n0\t", "\n1\t", 5))
    with pytest.raises(DataError, match="changed since training"):
        prune(trained, workdir / "pruned_changed", small_cfg(data=(str(changed),)))
    assert not (workdir / "pruned_changed").exists()


# ---------------------------------------------------------------- distillation and the parent bar
def test_distillation_labels_mix_labels_and_parent_predictions():
    from ctredge.compress.prune import distillation_labels

    y = np.array([0, 1, 1, 0], dtype=np.int8)
    p = np.array([0.1, 0.8, 0.3, 0.0], dtype=np.float32)
    np.testing.assert_allclose(distillation_labels(y, p, 1.0), y)
    np.testing.assert_allclose(distillation_labels(y, p, 0.0), p)
    np.testing.assert_allclose(distillation_labels(y, p, 0.25), [0.075, 0.85, 0.475, 0.0], rtol=1e-6)
    assert distillation_labels(y, p, 0.5).dtype == np.float32
    with pytest.raises(ConfigError, match="alpha"):
        distillation_labels(y, p, 1.5)
    with pytest.raises(ConfigError, match="parent predictions"):
        distillation_labels(y, p[:3], 0.5)


def test_parent_bar_records_whether_the_parent_was_reached():
    from ctredge.compress.prune import parent_bar

    assert parent_bar(0.72, 0.7201)["kept"] is True
    bar = parent_bar(0.72, 0.71)
    assert bar["kept"] is False and bar["valid_dauc"] == pytest.approx(-0.01)


@pytest.mark.slow
def test_pruned_manifest_records_distillation_candidates_and_the_parent_bar(pruned):
    _, manifest = pruned
    m = manifest["metrics"]
    d = m["distillation"]
    assert d["alphas"] == [0.0, 1.0] and d["alphas_run"] == d["alphas"]
    names = [c["name"] for c in d["candidates"]]
    assert names[0] == "epoch 0" and len(names) == 1 + len(d["alphas"])
    best = max(d["candidates"], key=lambda c: c["valid_auc"])
    assert d["kept"] == best["name"] and m["valid_auc"] == pytest.approx(best["valid_auc"], abs=1e-9)
    assert d["chosen_alpha"] == best["alpha"]
    bar = m["parent_bar"]
    assert bar["parent_valid_auc"] == m["before"]["valid_auc"] and bar["kept"] == (m["valid_auc"] >= bar["parent_valid_auc"])


@pytest.mark.slow
def test_epoch_zero_is_kept_when_no_fine_tune_epoch_beats_it(workdir, trained):
    # a learning rate this large wrecks every fine-tune epoch: the one-shot pruned weights must win
    out = workdir / "pruned-lr"
    m = prune(trained, out, small_cfg(learning_rate=5.0, epochs=1, distill_alphas=(1.0,)))["metrics"]
    d = m["distillation"]
    assert d["kept"] == "epoch 0" and d["chosen_alpha"] is None and m["epochs"] == 0
    assert m["valid_auc"] == pytest.approx(d["candidates"][0]["valid_auc"], abs=1e-9)
