"""int8 safety checks: int16 pair-sum overflow (hand-computed), fused vs float-simulated, the ISA record."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ctredge.compress.int8check import fused_vs_simulated, pair_overflow, saturation_risk
from ctredge.compress.quantize import QuantizeConfig, quantize
from ctredge.cpuinfo import cpu_isa, describe_isa, int8_isa_check
from ctredge.errors import ConfigError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


# ------------------------------------------------------------------ pair_overflow, by hand
def test_pair_overflow_counts_pairs_and_outputs_by_hand():
    x = np.array([[255, 255, 0, 0], [1, 1, 1, 1]], np.uint8)
    # column 0: 255*127 + 255*127 = 64770 > 32767 in row 0; column 1: 255*-128*2 = -65280 < -32768;
    # column 2: 255*64 + 255*63 = 32385 fits
    w = np.array([[127, -128, 64], [127, -128, 63], [1, 1, 1], [1, 1, 1]], np.int8)
    got = pair_overflow(x, w)
    # 2 rows x 3 outputs x 2 pairs = 12 pair sums; 2 overflow (row 0, pair 0, columns 0 and 1)
    assert got["pairs"] == pytest.approx(2 / 12)
    assert got["outputs"] == pytest.approx(2 / 6)


def test_pair_overflow_edges():
    assert pair_overflow(np.full((3, 1), 255, np.uint8), np.full((1, 2), -128, np.int8)) == \
        {"pairs": 0.0, "outputs": 0.0}  # K = 1: no pair
    # odd K: the last product stands alone and never overflows
    got = pair_overflow(np.full((1, 3), 255, np.uint8), np.full((3, 1), 127, np.int8))
    assert got == {"pairs": 1.0, "outputs": 1.0}
    # 7-bit weights (reduce_range) can never overflow: 2 * 255 * 64 = 32640
    assert pair_overflow(np.full((2, 8), 255, np.uint8), np.full((8, 4), -64, np.int8))["pairs"] == 0.0
    with pytest.raises(ConfigError, match="uint8"):
        pair_overflow(np.zeros((2, 2), np.int8), np.zeros((2, 2), np.int8))


# ------------------------------------------------------------------ a hand-built MatMul model
def _mlp(k: int = 16, m: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.choice([-1.0, 1.0], size=(k, m)).astype(np.float32)  # |w| at the max: int8 weights near +-127
    w2 = rng.normal(size=(m, 1)).astype(np.float32) * 0.1
    nodes = [helper.make_node("MatMul", ["dense", "w"], ["h"], name="layer0/MatMul"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "w2"], ["logit"], name="layer1/MatMul"),
             helper.make_node("Sigmoid", ["logit"], ["ctr"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("dense", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, [None, 1])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(n: int = 512, k: int = 16, seed: int = 1):
    # non-negative, skewed activations: uint8 zero point 0, many values near 255 (the saturating pattern)
    return {"dense": np.random.default_rng(seed).uniform(0.8, 1.0, size=(n, k)).astype(np.float32)}


@pytest.mark.parametrize("over, saturates", [({"reduce_range": False}, True), ({}, False),
                                             ({"static_weight_type": "uint8", "reduce_range": False}, False)])
def test_saturation_risk_of_each_config(over, saturates):
    feeds = _feeds()
    q = quantize(_mlp(), "int8-static", [feeds], QuantizeConfig(calibration_rows=0, **over))
    risk = saturation_risk(q, feeds)
    if saturates:
        first = next(lay for lay in risk["layers"] if lay["node"].startswith("layer0"))
        assert (first["k"], first["m"]) == (16, 8)
        assert first["outputs"] > 0.5 and risk["overflow_fraction"] == max(lay["outputs"] for lay in risk["layers"])
    else:
        assert risk["overflow_fraction"] == 0.0


def test_fused_vs_simulated_is_computed_and_small_for_a_sound_model():
    feeds = _feeds()
    labels = (np.arange(512) % 3 == 0).astype(np.float32)
    q = quantize(_mlp(), "int8-static", [feeds], QuantizeConfig(calibration_rows=0, reduce_range=True))
    got = fused_vs_simulated(q, feeds, labels)
    assert got["rows"] == 512 and 0.0 <= got["mean_abs_diff"] <= got["max_abs_diff"] < 0.01
    assert 0.0 <= got["auc_fused"] <= 1.0 and 0.0 <= got["auc_simulated"] <= 1.0
    assert fused_vs_simulated(q, feeds)["auc_fused"] is None  # no labels, no AUC
    with pytest.raises(ConfigError, match="fused predictions"):
        fused_vs_simulated(q, feeds, p_fused=np.zeros(3, np.float32))


# ------------------------------------------------------------------ the ISA record and the load-time verdict
CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx2 avx512f
processor\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu sse2 avx2 avx512f
"""


def test_cpu_isa_reads_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    isa = cpu_isa(path)
    assert isa["model_name"] == "Test CPU 9000" and isa["vnni"] is False
    assert isa["flags"] == {"avx2": True, "avx512f": True, "avx512_vnni": False, "avx_vnni": False}
    path.write_text(CPUINFO.replace("avx512f", "avx512f avx512_vnni"))
    assert cpu_isa(path)["vnni"] is True
    assert cpu_isa(tmp_path / "missing")["vnni"] is None
    assert describe_isa(cpu_isa(path)) == "Test CPU 9000 (avx2, avx512f, avx512_vnni)"


def _manifest(frac):
    vnni = {"model_name": "Big Xeon", "flags": {"avx2": True, "avx512_vnni": True}, "vnni": True}
    return {"extra": {"int8": {"overflow_fraction": frac, "may_saturate_without_vnni": frac is None or frac > 0,
                               "isa": vnni, "fused_vs_simulated": {"max_abs_diff": 3e-4}}}}


def test_int8_isa_check_warns_only_for_a_risky_model_on_a_cpu_without_vnni():
    avx2 = {"model_name": "Small EPYC", "flags": {"avx2": True, "avx512_vnni": False}, "vnni": False}
    vnni = {"model_name": "Big Xeon", "flags": {"avx2": True, "avx512_vnni": True}, "vnni": True}
    level, msg = int8_isa_check("ctr-int8 v1", _manifest(0.9), avx2)
    assert level == logging.WARNING and "ctr-int8 v1" in msg and "Big Xeon" in msg and "Small EPYC" in msg
    assert int8_isa_check("ctr-int8 v1", _manifest(None), avx2)[0] == logging.WARNING  # not modelled: warn
    assert int8_isa_check("ctr-int8 v1", _manifest(0.9), vnni)[0] == logging.INFO
    assert int8_isa_check("ctr-int8 v1", _manifest(0.0), avx2)[0] == logging.INFO
    assert int8_isa_check("ctr-fp32 v1", {"extra": {}}, avx2) is None
