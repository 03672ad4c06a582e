"""Sparse gathered tables (compress/sparse.py): the rank index by hand, and the rewritten graph, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from ctredge.compress.sparse import RANK_BLOCK, RankIndex, compact, compact_sparse_tables


def test_rank_index_by_hand():
    mask = np.array([0, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1], dtype=bool)
    index = RankIndex.from_mask(mask)
    assert index.n == 11 and index.kept == 4
    assert list(index.bits) == [0b00000110, 0b00000101]
    assert list(index.within) == [0, 2] and list(index.base) == [0]
    # stored rows get their rank among the stored rows, the others the zero row (index 4)
    assert list(index.rows(np.arange(11))) == [4, 0, 1, 4, 4, 4, 4, 4, 2, 4, 3]


def test_rank_index_across_blocks_matches_cumsum():
    rng = np.random.default_rng(0)
    for n, p in ((1, 1.0), (7, 0.5), (RANK_BLOCK, 1.0), (3 * RANK_BLOCK + 5, 0.3), (10_000, 0.02), (5000, 0.0)):
        mask = rng.random(n) < p
        index = RankIndex.from_mask(mask)
        want = np.where(mask, np.cumsum(mask) - 1, mask.sum())
        np.testing.assert_array_equal(index.rows(np.arange(n)), want)
        assert index.within.max(initial=0) <= RANK_BLOCK - 8


def test_compact_keeps_rows_with_any_nonzero_and_negative_zero():
    table = np.zeros((6, 2), np.float32)
    table[1, 1] = 3.0
    table[4, 0] = -0.0
    index, values = compact(table)
    assert index.kept == 2 and values.shape == (3, 2)
    out = values[index.rows(np.arange(6))]
    assert out.tobytes() == table.tobytes()


def _gather_model(tables: dict[str, np.ndarray], ids_type: int):
    from onnx import TensorProto, helper, numpy_helper

    nodes, outputs = [], []
    for name, t in tables.items():
        nodes.append(helper.make_node("Gather", [name, "ids"], [f"{name}_out"], name=f"gather_{name}", axis=0))
        elem = helper.np_dtype_to_tensor_dtype(t.dtype)
        outputs.append(helper.make_tensor_value_info(f"{name}_out", elem, [None] * (1 + t.ndim)))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", ids_type, [None, None])], outputs,
                              [numpy_helper.from_array(t, n) for n, t in tables.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("ids_type", ["int64", "int32"])
def test_rewritten_gathers_equal_the_dense_ones_for_every_index(ids_type):
    import onnxruntime as ort
    from onnx import TensorProto

    rng = np.random.default_rng(1)
    n = 20_000
    wide = np.where(rng.random(n) < 0.1, rng.normal(size=n), 0).astype(np.float32)
    attr = np.where(rng.random((n, 3)) < 0.2, rng.integers(1, 60_000, (n, 3)), 0).astype(np.uint16)
    dense = rng.normal(size=(n, 4)).astype(np.float32)            # no zeros: left as it is
    model = _gather_model({"wide": wide, "attr": attr, "dense": dense},
                          TensorProto.INT64 if ids_type == "int64" else TensorProto.INT32)
    ids = np.stack([np.arange(n), rng.integers(0, n, n)]).astype(ids_type)

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"ids": ids})

    size = len(model.SerializeToString())
    rec = compact_sparse_tables(model)
    assert sorted(r["name"] for r in rec) == ["attr", "wide"]
    got = run(model)
    for out, t in zip(got, (wide, attr, dense)):
        assert out.dtype == t.dtype
        assert out.tobytes() == t[ids].tobytes()
    by = {r["name"]: r for r in rec}
    assert by["wide"]["kept_rows"] == np.count_nonzero(wide)
    assert by["wide"]["bytes_after"] < 0.45 * wide.nbytes
    assert len(model.SerializeToString()) < size - (wide.nbytes + attr.nbytes) // 2
    assert compact_sparse_tables(model) == []   # the compact tables are no Gather-only data with zeros to drop


def test_small_tables_and_tables_read_by_another_op_are_left_alone():
    from onnx import TensorProto, helper, numpy_helper

    t = np.zeros(10_000, np.float32)
    t[::100] = 1.0
    graph = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["g"], axis=0), helper.make_node("ReduceSum", ["t"], ["s"])], "t",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, [None]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])], [numpy_helper.from_array(t, "t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert compact_sparse_tables(model) == []
    small = _gather_model({"small": np.zeros(1000, np.float32)}, TensorProto.INT64)
    assert compact_sparse_tables(small) == [] and compact_sparse_tables(small, min_rows=1000)[0]["kept_rows"] == 0


class _Spec:
    """What vocab_remap reads of a FeatureSpec: three features of 3000, 9000 and 2000 buckets."""
    buckets = np.array([3000, 9000, 2000])
    offsets = np.array([0, 3000, 12000])
    total_buckets = 14000


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_a_vocabulary_remap_is_stored_as_its_kept_mask_and_gives_every_bucket_its_row(dtype):
    import onnxruntime as ort
    from onnx import TensorProto

    from ctredge.compress.sparse import compact_remap
    from ctredge.vocab import vocab_remap

    counts = np.random.default_rng(2).poisson(0.7, _Spec.total_buckets)
    remap, kept = vocab_remap(counts, _Spec, 2)
    remap = remap.astype(dtype)
    index, starts, defaults = compact_remap(remap)
    assert index.kept == kept.size and len(starts) == 3       # one run of defaults per feature
    model = _gather_model({"remap": remap}, TensorProto.INT64)
    ids = np.arange(_Spec.total_buckets).reshape(2, -1)
    rec = compact_sparse_tables(model)
    assert rec[0]["encoding"] == "remap" and rec[0]["bytes_after"] < 0.2 * remap.nbytes
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    assert out.dtype == remap.dtype and np.array_equal(out, remap[ids])


def test_compact_remap_refuses_what_is_not_a_remap():
    from ctredge.compress.sparse import compact_remap

    assert compact_remap(np.array([0, 2, 1], np.int32)) is None              # kept values out of order
    assert compact_remap(np.zeros((4, 2), np.int32)) is None                 # not a vector
    assert compact_remap(np.array([0.0, 1.0], np.float32)) is None           # not integers
    many_runs = np.repeat(np.arange(600), 2).astype(np.int32)                # 600 runs of defaults
    assert compact_remap(many_runs) is None


def test_shorten_names_keeps_the_contract_and_every_answer():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ctredge.compress.onnxio import shorten_names

    long = "ctredge_dcnv2_1/cross_2_1/MatMul_1/ReadVariableOp:0"
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["dense", long], [long + "_out"], name=long + "/matmul"),
         helper.make_node("Relu", [long + "_out"], ["t0"], name=long + "/relu"),   # a name like the short ones
         helper.make_node("Identity", ["t0"], ["ctr"], name=long + "/id")], "g",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(w, long)],
        value_info=[helper.make_tensor_value_info(long + "_out", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.array([[1.0, -2.0, 3.0]], np.float32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"dense": x})[0]

    before, size = run(model), model.ByteSize()
    saved = shorten_names(model)
    assert saved == size - model.ByteSize() > 3 * len(long)
    assert [v.name for v in model.graph.input] == ["dense"] and [v.name for v in model.graph.output] == ["ctr"]
    assert [n.name for n in model.graph.node] == ["MatMul_0", "Relu_1", "Identity_2"]
    assert not model.graph.value_info and len({n.output[0] for n in model.graph.node}) == 3
    assert run(model).tobytes() == before.tobytes()
