"""Tests of ctredge.compress.quantize and ctredge.compress.calibration.

Two kinds of models:

* hand-built ONNX graphs (onnx.helper, no TensorFlow): a bare embedding lookup for
  bit-exactness of the row-wise graphs against the numpy reference, and a
  lookup + MLP with a 120k-row table for file size and session memory;
* a small DCN-v2 with a behaviour history (``ctredge.train.models``), trained for a
  few seconds on planted clicks and exported with ``ctredge.export.onnx.convert``,
  for every variant's predictions and AUC against the fp32 model.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ctredge.compress.calibration import FeedCalibrationReader
from ctredge.compress.scoring import ort_predict as predict
from ctredge.compress.quantize import (
    VARIANT_KINDS,
    QuantizeConfig,
    dequantize_rows_int4,
    dequantize_rows_int8,
    find_embedding_tables,
    pack_int4,
    quantize,
    quantize_rows_int4,
    quantize_rows_int8,
    save_model,
    session_rss_bytes,
    unpack_int4,
)
from ctredge.errors import ConfigError
from ctredge.features import METADATA_KEY, CatFeature, DenseFeature, FeatureSpec, HistorySpec
from ctredge.metrics import auc

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

IR = 8
OPSET = 17


# ------------------------------------------------------------------ pack / unpack / reference
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.int8, st.tuples(st.integers(0, 5), st.integers(1, 9)), elements=st.integers(-8, 7)))
def test_int4_pack_round_trips_exactly(q):
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (q.shape[0], (q.shape[1] + 1) // 2)
    np.testing.assert_array_equal(unpack_int4(packed, q.shape[1]), q)


def test_int4_layout_is_documented_one():
    # byte k: column k in the low nibble, column k + ceil(dim/2) in the high nibble, each + 8
    q = np.array([[-8, 7, 0, 1, -1]], np.int8)  # dim 5 -> 3 bytes, last high nibble is padding (0 -> 8)
    assert pack_int4(q).tolist() == [[0 | (9 << 4), 15 | (7 << 4), 8 | (8 << 4)]]


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ConfigError, match=r"\[-8, 7\]"):
        pack_int4(np.array([[8]], np.int16))


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)),
                  elements=st.floats(-4, 4, width=32)))
def test_int8_and_int4_rows_round_trip_within_half_a_step(table):
    for method in ("absmax", "mse"):
        q, s = quantize_rows_int8(table, method)
        assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
        if method == "absmax":
            np.testing.assert_array_equal(quantize_rows_int8(dequantize_rows_int8(q, s))[0], q)
            assert np.all(np.abs(dequantize_rows_int8(q, s) - table) <= s[:, None] * 0.5 + 1e-6)
        p, s4 = quantize_rows_int4(table, method)
        q4 = unpack_int4(p, table.shape[1])
        assert np.abs(q4.astype(int)).max() <= 7
        if method == "absmax":
            assert np.all(np.abs(dequantize_rows_int4(p, s4, table.shape[1]) - table) <= s4[:, None] * 0.5 + 1e-6)


def test_row_scales_are_per_row():
    table = np.array([[1.0, -0.3], [100.0, 40.0], [0.0, 0.0]], np.float32)
    q, s = quantize_rows_int8(table)
    np.testing.assert_allclose(s, [1 / 127, 100 / 127, 1.0], rtol=1e-6)  # an all-zero row gets scale 1, q 0
    assert q.tolist() == [[127, -38], [127, 51], [0, 0]]
    p, s4 = quantize_rows_int4(table)
    np.testing.assert_allclose(s4, [1 / 7, 100 / 7, 1.0], rtol=1e-6)
    assert unpack_int4(p, 2).tolist() == [[7, -2], [7, 3], [0, 0]]


def test_mse_scale_is_no_worse_than_absmax_on_gaussian_rows():
    table = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
    for quant, deq in ((quantize_rows_int4, lambda p, s: dequantize_rows_int4(p, s, 16)),
                       (quantize_rows_int8, dequantize_rows_int8)):
        err = {m: float(((deq(*quant(table, m)) - table) ** 2).mean()) for m in ("absmax", "mse")}
        assert err["mse"] <= err["absmax"]


# ------------------------------------------------------------------ hand-built graphs
def lookup_model(rows: int, dim: int, n_cat: int = 3, seed: int = 0) -> tuple[object, np.ndarray]:
    """``emb = Gather(E, cat)`` and ``hist_emb = Gather(E, hist)``: the bare shared-table lookups."""
    table = np.random.default_rng(seed).normal(0, 0.3, size=(rows, dim)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "cat"], ["emb"], axis=0, name="gather_cat"),
         helper.make_node("Gather", ["E", "hist"], ["hist_emb"], axis=0, name="gather_hist")],
        "lookup",
        [helper.make_tensor_value_info("cat", TensorProto.INT64, [None, n_cat]),
         helper.make_tensor_value_info("hist", TensorProto.INT64, [None, 4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [None, n_cat, dim]),
         helper.make_tensor_value_info("hist_emb", TensorProto.FLOAT, [None, 4, dim])],
        [numpy_helper.from_array(table, "E")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR), table


def mlp_model(rows: int, dim: int = 16, n_cat: int = 4, n_dense: int = 3, seed: int = 0) -> object:
    """A CTR-shaped graph: NaN-filled signed log1p of ``dense`` + one shared table -> MLP -> ``ctr``."""
    rng = np.random.default_rng(seed)
    width = n_cat * dim + n_dense
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, size=(rows, dim)).astype(np.float32), "E"),
             numpy_helper.from_array(np.arange(n_cat, dtype=np.int64) * (rows // n_cat), "offsets"),
             numpy_helper.from_array(np.array([-1, n_cat * dim], np.int64), "flat"),
             numpy_helper.from_array(np.float32(0.0), "zero"), numpy_helper.from_array(np.float32(1.0), "one"),
             numpy_helper.from_array(rng.normal(0, 0.2, size=(width, 32)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.normal(0, 0.1, size=32).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, size=(32, 1)).astype(np.float32), "W2")]
    nodes = [
        helper.make_node("Add", ["cat", "offsets"], ["rows"]),
        helper.make_node("Gather", ["E", "rows"], ["emb"], axis=0),
        helper.make_node("Reshape", ["emb", "flat"], ["emb_flat"]),
        helper.make_node("IsNaN", ["dense"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "dense"], ["filled"]),
        helper.make_node("Abs", ["filled"], ["abs"]),
        helper.make_node("Add", ["abs", "one"], ["abs1"]),
        helper.make_node("Log", ["abs1"], ["log"]),
        helper.make_node("Sign", ["filled"], ["sign"]),
        helper.make_node("Mul", ["sign", "log"], ["dense_t"]),
        helper.make_node("Concat", ["emb_flat", "dense_t"], ["x"], axis=1),
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("MatMul", ["hr", "W2"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["ctr"]),
    ]
    for n, i in zip(nodes, range(len(nodes))):
        n.name = f"n{i}_{n.op_type}"
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, [None, n_dense]),
         helper.make_tensor_value_info("cat", TensorProto.INT64, [None, n_cat])],
        [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, [None, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)
    spec = FeatureSpec(dense=tuple(DenseFeature(f"d{i}") for i in range(n_dense)),
                       cat=tuple(CatFeature(f"c{i}", rows // n_cat) for i in range(n_cat)), name="mlp")
    model.metadata_props.add(key=METADATA_KEY, value=spec.to_json())
    return model


def mlp_feeds(rows: int, n: int, n_cat: int = 4, n_dense: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = rng.lognormal(1, 2, size=(n, n_dense)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.2] = np.nan
    return {"dense": dense, "cat": rng.integers(0, rows // n_cat, size=(n, n_cat)).astype(np.int64)}


@pytest.mark.parametrize("dim", [16, 7])
@pytest.mark.parametrize("kind", ["emb-int8", "emb-int4"])
def test_row_wise_graph_is_bit_exact_against_numpy_reference(kind, dim):
    model, table = lookup_model(300, dim)
    cfg = QuantizeConfig(emb_min_rows=1)
    q = quantize(model, kind, cfg=cfg)
    if kind == "emb-int8":
        ref = dequantize_rows_int8(*quantize_rows_int8(table))
    else:
        ref = dequantize_rows_int4(*quantize_rows_int4(table), dim)
    rng = np.random.default_rng(3)
    cat, hist = rng.integers(0, 300, size=(33, 3)), rng.integers(0, 300, size=(33, 4))
    sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    emb, hist_emb = sess.run(None, {"cat": cat, "hist": hist})
    np.testing.assert_array_equal(emb, ref[cat])
    np.testing.assert_array_equal(hist_emb, ref[hist])
    assert emb.dtype == np.float32
    # the float table is gone: only the packed table, its row scales and small constants remain
    floats = [i for i in q.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert sum(int(np.prod(i.dims)) for i in floats) <= 300 + 2


def test_quantize_does_not_modify_its_source():
    model, _ = lookup_model(300, 8)
    before = model.SerializeToString()
    quantize(model, "emb-int4", cfg=QuantizeConfig(emb_min_rows=1))
    assert model.SerializeToString() == before


@pytest.fixture(scope="module")
def big_mlp(tmp_path_factory):
    """A 120k x 16 table (7.7 MB fp32) and every variant that needs no calibration, on disk."""
    rows = 120_000
    folder = tmp_path_factory.mktemp("big")
    model = mlp_model(rows)
    paths = {"fp32": folder / "fp32.onnx"}
    save_model(model, paths["fp32"])
    for kind in ("emb-int8", "emb-int4", "fp16", "int8-dynamic"):
        paths[kind] = folder / f"{kind}.onnx"
        save_model(quantize(paths["fp32"], kind), paths[kind])
    return rows, model, paths


def test_embedding_variants_are_much_smaller(big_mlp):
    rows, _, paths = big_mlp
    table = rows * 16 * 4
    rest = paths["fp32"].stat().st_size - table
    size = {k: p.stat().st_size for k, p in paths.items()}
    assert size["emb-int4"] - rest < 0.25 * table  # 8 bytes of nibbles + 4 of scale per 64-byte row: 18.75%
    # int8: 16 bytes + a 4-byte fp32 scale per 64-byte row is 31.25% by construction at dim 16 (< 30% from dim 20)
    assert size["emb-int8"] - rest < 0.32 * table
    assert size["emb-int4"] < 0.25 * size["fp32"]
    assert size["emb-int8"] < 0.33 * size["fp32"]
    assert size["fp16"] < 0.55 * size["fp32"]


def test_embedding_variant_sessions_hold_the_small_table(big_mlp):
    """ORT must not constant-fold the dequantization back into an fp32 table: RSS, not only the file."""
    rows, _, paths = big_mlp
    table = rows * 16 * 4
    rss = {k: session_rss_bytes(paths[k]) for k in ("fp32", "emb-int4", "emb-int8")}
    assert rss["fp32"] > 0.9 * table
    assert rss["emb-int4"] < rss["fp32"] - 0.6 * table
    assert rss["emb-int8"] < rss["fp32"] - 0.5 * table


def test_fp16_keeps_fp32_io_and_survives_nan_and_huge_counts(big_mlp):
    rows, model, paths = big_mlp
    sess = ort.InferenceSession(str(paths["fp16"]), providers=["CPUExecutionProvider"])
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)", "tensor(int64)"]
    assert sess.get_outputs()[0].type == "tensor(float)"
    feeds = mlp_feeds(rows, 500)
    feeds["dense"][:50, 0] = 3e7  # a raw count past fp16's 65504: the transform must run in fp32
    feeds["dense"][50:100] = np.nan
    ref, got = predict(model, feeds), predict(sess, feeds)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - ref).max() < 5e-3


def test_tables_below_min_rows_or_without_gain_are_left_alone():
    model, _ = lookup_model(300, 1)  # one value per row: scale + value is larger than fp32
    assert find_embedding_tables(model) == []
    model, _ = lookup_model(300, 4)
    assert find_embedding_tables(model, min_rows=301) == []
    assert [t.rows for t in find_embedding_tables(model, min_rows=300)] == [300]


# ------------------------------------------------------------------ errors, metadata, imports
def test_errors_are_config_errors_with_clear_messages():
    model, _ = lookup_model(300, 8)
    with pytest.raises(ConfigError, match="unknown quantization kind 'int3'"):
        quantize(model, "int3")
    with pytest.raises(ConfigError, match="no embedding table"):
        quantize(lookup_model(300, 1)[0], "emb-int8")
    mlp = mlp_model(1000)
    with pytest.raises(ConfigError, match="needs calibration data"):
        quantize(mlp, "int8-static")
    with pytest.raises(ConfigError, match=r"lacks input\(s\) \['dense'\]"):
        quantize(mlp, "int8-static", [{"cat": np.zeros((4, 4), np.int64)}])
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(quantize(mlp, "fp16"), "emb-int8")
    with pytest.raises(ConfigError, match="static_activation_type"):
        QuantizeConfig(static_activation_type="int4")
    with pytest.raises(ConfigError, match="expected a QuantizeConfig"):
        quantize(mlp, "fp16", cfg={"emb_min_rows": 1})


def test_calibration_reader_rebatches_and_rewinds():
    feeds = [{"x": np.arange(n, dtype=np.float64)[:, None], "i": np.zeros((n, 2), np.int32),
              "label": np.ones(n)} for n in (3, 5, 4)]
    reader = FeedCalibrationReader(feeds, {"x": (np.dtype(np.float32), 2), "i": (np.dtype(np.int64), 2)},
                                   batch_size=4, max_rows=10)
    sizes = [len(b["x"]) for b in reader]
    assert sizes == [4, 4, 2] and reader.rows == 10
    assert all(sorted(b) == ["i", "x"] for b in reader.batches())  # the label is not a model input
    reader.rewind()
    first = reader.get_next()
    assert first["x"].dtype == np.float32 and first["i"].dtype == np.int64
    assert first["x"][:, 0].tolist() == [0, 1, 2, 0]
    # ORT's histogram calibrators need equal batches: the short tail goes, unless it is all there is
    assert [len(b["x"]) for b in FeedCalibrationReader(feeds, batch_size=5, drop_remainder=True)] == [5, 5]
    assert [len(b["x"]) for b in FeedCalibrationReader(feeds, batch_size=50, drop_remainder=True)] == [12]
    with pytest.raises(ConfigError, match="no rows"):
        FeedCalibrationReader([], batch_size=4).get_next()
    with pytest.raises(ConfigError, match="differ in batch size"):
        FeedCalibrationReader([{"x": np.zeros((2, 1)), "i": np.zeros((3, 1))}]).get_next()


def test_importing_quantize_loads_no_tensorflow():
    code = ("import sys, ctredge.compress.quantize, ctredge.compress.calibration; "
            "print([m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ a trained DCN-v2 on planted clicks
N_USERS, N_ITEMS, N_GROUPS, HIST = 400, 300, 4, 6


def planted_spec() -> FeatureSpec:
    return FeatureSpec(
        dense=(DenseFeature("clicks_7d", side="user"), DenseFeature("price", side="item", transform="identity",
                                                                     integer=False)),
        cat=(CatFeature("user_id", N_USERS, side="user"), CatFeature("item_id", N_ITEMS, side="item"),
             CatFeature("position", 8, side="context")),
        history=HistorySpec("item_id", max_len=HIST), name="planted")


def planted_rows(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Clicks from item quality, position bias, a dense effect and history/item group affinity."""
    world = np.random.default_rng(0)
    group = world.integers(0, N_GROUPS, N_ITEMS)
    quality = world.normal(0, 0.8, N_ITEMS)
    taste = world.integers(0, N_GROUPS, N_USERS)
    rng = np.random.default_rng(seed)
    user, item, pos = rng.integers(1, N_USERS, n), rng.integers(1, N_ITEMS, n), rng.integers(1, 8, n)
    hist = np.zeros((n, HIST), np.int64)
    for r in range(n):  # a user's history leans to their taste group
        k = rng.integers(0, HIST + 1)
        same = np.flatnonzero(group[1:] == taste[user[r]]) + 1
        hist[r, :k] = np.where(rng.random(k) < 0.7, rng.choice(same, k), rng.integers(1, N_ITEMS, k))
    clicks = rng.poisson(3, n).astype(np.float32)
    clicks[rng.random(n) < 0.1] = np.nan
    price = rng.normal(0, 1, n).astype(np.float32)
    logit = (quality[item] - 0.4 * pos + 1.5 * (group[item] == taste[user])
             + 0.3 * np.nan_to_num(np.log1p(clicks), nan=0.0) - 0.5 * price - 1.0)
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    feeds = {"dense": np.stack([clicks, price], 1), "cat": np.stack([user, item, pos], 1).astype(np.int64),
             "hist": hist}
    return feeds, labels


@pytest.fixture(scope="module")
def trained():
    """``(fp32 ModelProto, test feeds, test labels, calibration feeds)`` of a DCN-v2 trained for seconds."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    models = pytest.importorskip("ctredge.train.models")
    from ctredge.export.onnx import convert, set_metadata

    keras.utils.set_random_seed(0)
    spec = planted_spec()
    model = models.build_model(spec, models.ModelConfig(model="dcnv2", embedding_dim=8, cross_layers=2,
                                                        mlp_units=(32, 16), attention_units=(8,)))
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    x, y = planted_rows(12_000, seed=1)
    model.fit(x, y, batch_size=256, epochs=2, verbose=0)
    proto = convert(model, spec, OPSET)
    set_metadata(proto, {METADATA_KEY: spec.to_json(), "ctredge.model_name": "planted"})
    test_x, test_y = planted_rows(4000, seed=2)
    calibration = [planted_rows(512, seed=10 + i)[0] for i in range(2)]
    return proto, test_x, test_y, calibration


# (max |variant - fp32|, mean |variant - fp32|, AUC drop allowed) on the planted test rows (fp32 AUC ~0.74,
# the generating model's 0.81).  Measured on this model: fp16 2.8e-4 / 3e-5, emb-int8 1.9e-3 / 1.9e-4,
# emb-int4 3.3e-2 / 3.3e-3, int8-dynamic 3.4e-2 / 2.7e-3, int8-static 4.1e-2 / 3.9e-3, +emb-int8 3.9e-2 / 4.0e-3,
# +emb-int4 5.4e-2 / 5.5e-3; every AUC drop < 5e-4.  The budgets are about 2.5x that.
TOLERANCE = {
    "fp16": (2e-3, 1e-4, 0.002),
    "emb-int8": (6e-3, 6e-4, 0.002),
    "emb-int4": (0.08, 0.01, 0.005),
    "int8-dynamic": (0.08, 0.008, 0.005),
    "int8-static": (0.1, 0.01, 0.005),
    "int8-static+emb-int8": (0.1, 0.01, 0.005),
    "int8-static+emb-int4": (0.12, 0.015, 0.008),
}


@pytest.mark.slow
def test_every_variant_stays_close_to_fp32_on_a_trained_model(trained, tmp_path):
    proto, x, y, calibration = trained
    assert set(TOLERANCE) == set(VARIANT_KINDS)
    ref = predict(proto, x)
    base = auc(y, ref)
    assert base > 0.7, f"the planted model did not learn (AUC {base:.3f})"
    for kind in VARIANT_KINDS:
        q = quantize(proto, kind, calibration)
        path = tmp_path / f"{kind}.onnx"
        save_model(q, path)
        got = predict(str(path), x)  # loads from the written file, as the server will
        max_tol, mean_tol, auc_tol = TOLERANCE[kind]
        diff = np.abs(got - ref)
        assert diff.max() < max_tol, f"{kind}: max |diff| {diff.max():.3g} vs fp32, allowed {max_tol}"
        assert diff.mean() < mean_tol, f"{kind}: mean |diff| {diff.mean():.3g} vs fp32, allowed {mean_tol}"
        drop = base - auc(y, got)
        assert drop < auc_tol, f"{kind}: AUC {base:.4f} -> {base - drop:.4f}, allowed drop {auc_tol}"


@pytest.mark.slow
def test_metadata_is_kept_and_kind_recorded(trained):
    proto, _, _, calibration = trained
    src = {p.key: p.value for p in proto.metadata_props}
    for kind in ("int8-static+emb-int4", "fp16"):
        q = quantize(proto, kind, calibration)
        meta = {p.key: p.value for p in q.metadata_props}
        assert {k: meta[k] for k in src} == src
        assert meta["ctredge.quantization"] == kind
        assert json.loads(meta["ctredge.quantization_config"])["static_activation_type"] in ("uint8", "int8")
        assert q.ir_version <= 10  # ORT 1.31 refuses onnx 1.23's default IR 14
        assert FeatureSpec.from_json(meta[METADATA_KEY]) == planted_spec()


@pytest.mark.slow
def test_dequantized_embedding_variants_match_the_reference_model(trained):
    """emb-int8/int4 == the fp32 model whose table is replaced by the numpy dequantization."""
    proto, x, _, _ = trained
    (table,) = find_embedding_tables(proto)
    assert len(table.gathers) == 2  # the cat lookup and the history lookup share the table
    for kind, quant, deq in (("emb-int8", quantize_rows_int8, dequantize_rows_int8),
                             ("emb-int4", quantize_rows_int4, lambda p, s: dequantize_rows_int4(p, s, table.dim))):
        ref_model = onnx.ModelProto()
        ref_model.CopyFrom(proto)
        init = next(i for i in ref_model.graph.initializer if i.name == table.name)
        init.CopyFrom(numpy_helper.from_array(deq(*quant(numpy_helper.to_array(init))), table.name))
        diff = np.abs(predict(quantize(proto, kind), x) - predict(ref_model, x)).max()
        assert diff < 1e-6, f"{kind}: {diff:.3g}"
