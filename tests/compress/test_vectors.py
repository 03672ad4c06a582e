"""Gathered weight vectors (the wide part's one weight per id) as int8 with a scale per block of ids."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ctredge.compress.graph import find_weight_vectors, quantize_vectors
from ctredge.compress.qconfig import QuantizeConfig


def _model(w: np.ndarray, *, also_matmul: bool = False) -> onnx.ModelProto:
    """``out = Gather(w, ids)`` (and, with ``also_matmul``, ``w`` read by a second, non-Gather node)."""
    nodes = [helper.make_node("Gather", ["w", "ids"], ["out"], name="g", axis=0)]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, None])]
    if also_matmul:
        nodes.append(helper.make_node("ReduceSum", ["w"], ["total"], name="r", keepdims=0))
        outputs.append(helper.make_tensor_value_info("total", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "vec", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                              outputs, initializer=[numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["out"], {"ids": ids})[0]


def test_vector_becomes_int8_with_a_scale_per_block_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, 1000).astype(np.float32)
    w[256:512] *= 100  # a block of large weights must not coarsen the others' steps
    w[512:768] = 0.0  # an all-zero block stays exactly zero
    ids = rng.integers(0, 1000, (64, 7)).astype(np.int64)
    model, report = quantize_vectors(_model(w), QuantizeConfig(emb_min_rows=16), block=256)
    got, want = _run(model, ids), w[ids]
    steps = np.array([np.abs(w[b:b + 256]).max() / 127 for b in range(0, 1000, 256)], np.float32)
    step = np.where(steps > 0, steps, 1.0)[ids // 256]
    assert np.all(np.abs(got - want) <= step / 2 + 1e-7)
    assert np.all(got[(ids >= 512) & (ids < 768)] == 0.0)
    small = (ids < 256)
    assert np.abs(got - want)[small].max() < 0.3 * 4 / 127  # not the large block's step
    (r,) = report
    assert r["rows"] == 1000 and r["block"] == 256 and r["quantized_bytes"] == 1000 + 4 * 4
    inits = {i.name: i for i in model.graph.initializer}
    assert "w" not in inits and {TensorProto.INT8, TensorProto.FLOAT} == {i.data_type for i in inits.values()
                                                                          if i.name != "ctredge_vector_block"}


def test_only_vectors_read_by_gather_alone_and_large_enough_are_taken():
    w = np.linspace(-1, 1, 300, dtype=np.float32)
    assert find_weight_vectors(_model(w, also_matmul=True)) == []  # another node reads it: left as is
    assert find_weight_vectors(_model(w), min_rows=301) == []
    model, report = quantize_vectors(_model(w), QuantizeConfig(emb_min_rows=301))
    assert report == [] and [i.name for i in model.graph.initializer] == ["w"]
    (found,) = find_weight_vectors(_model(w))
    assert (found.name, found.rows, found.dim) == ("w", 300, 1)


@pytest.mark.parametrize("scale", ["absmax", "mse"])
def test_both_scale_methods_run(scale):
    w = np.random.default_rng(1).standard_t(3, 700).astype(np.float32)
    ids = np.arange(700, dtype=np.int64).reshape(7, 100)
    model, (r,) = quantize_vectors(_model(w), QuantizeConfig(emb_min_rows=1, emb_scale=scale), block=64)
    err = np.abs(_run(model, ids) - w[ids])
    assert err.max() == pytest.approx(r["max_abs_error"], rel=1e-5, abs=1e-7) and err.max() < np.abs(w).max() / 127
