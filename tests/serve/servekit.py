"""Test models and inputs for the serving tests: hand-built ONNX graphs (no training), seeded feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctredge.features import METADATA_KEY, CatFeature, DenseFeature, FeatureSpec, HistorySpec

OPSET = 17
IR = 8  # onnx 1.23 stamps IR 14, which ONNX Runtime 1.31 refuses


def small_spec() -> FeatureSpec:
    """Every side on both kinds, and a history over ``item_id``."""
    return FeatureSpec(
        dense=(DenseFeature("price", side="item", integer=False), DenseFeature("user_orders", side="user"),
               DenseFeature("position", side="context"), DenseFeature("rating", side="item", transform="identity",
                                                                      integer=False)),
        cat=(CatFeature("user_id", 1000, side="user"), CatFeature("region", 16, side="user"),
             CatFeature("device", 8, side="context"), CatFeature("item_id", 500, side="item"),
             CatFeature("brand", 64, side="item")),
        history=HistorySpec(item_feature="item_id", max_len=5),
        name="small",
    )


def ctr_model(spec: FeatureSpec, seed: int = 0):
    """A ctredge-contract ONNX graph: sigmoid(log1p(dense) w + c + 1.7 sum(emb[hist]) c), c = sum emb[cat + offset]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nd, nc, L = spec.n_dense, spec.n_cat, spec.hist_len
    item_off = int(spec.offsets[spec.item_feature_index])
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (nd, 1)).astype(np.float32), "w_dense"),
        numpy_helper.from_array(rng.normal(0, 0.5, spec.total_buckets).astype(np.float32), "emb"),
        numpy_helper.from_array(spec.offsets.astype(np.int64), "offsets"),
        numpy_helper.from_array(np.array(item_off, dtype=np.int64), "item_off"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(1.7, dtype=np.float32), "u"),
        numpy_helper.from_array(np.array([-0.3], dtype=np.float32), "bias"),
    ]
    n = helper.make_node
    nodes = [
        n("IsNaN", ["dense"], ["nan"]), n("Where", ["nan", "zero", "dense"], ["x"]),
        n("Abs", ["x"], ["ax"]), n("Add", ["ax", "one"], ["ax1"]), n("Log", ["ax1"], ["lx"]),
        n("Sign", ["x"], ["sx"]), n("Mul", ["sx", "lx"], ["tx"]), n("MatMul", ["tx", "w_dense"], ["d"]),
        n("Add", ["cat", "offsets"], ["ci"]), n("Gather", ["emb", "ci"], ["ce"]),
        n("ReduceSum", ["ce", "axis1"], ["c"], keepdims=1),
        n("Add", ["hist", "item_off"], ["hi"]), n("Gather", ["emb", "hi"], ["he"]),
        n("ReduceSum", ["he", "axis1"], ["hs"], keepdims=1),
        n("Mul", ["hs", "u"], ["h"]), n("Mul", ["h", "c"], ["hc"]),
        n("Add", ["d", "c"], ["s1"]), n("Add", ["s1", "hc"], ["s2"]), n("Add", ["s2", "bias"], ["logit"]),
        n("Sigmoid", ["logit"], ["ctr"]),
    ]
    graph = helper.make_graph(
        nodes, "ctr",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["B", nd]),
         helper.make_tensor_value_info("cat", TensorProto.INT64, ["B", nc]),
         helper.make_tensor_value_info("hist", TensorProto.INT64, ["B", L])],
        [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, ["B", 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)
    helper.set_model_props(model, {METADATA_KEY: spec.to_json(), "ctredge.model_name": "ctr",
                                   "ctredge.model_version": str(seed)})
    return model


def mlp_model(spec: FeatureSpec, seed: int = 0, hidden: tuple[int, ...] = (64, 32), dim: int = 8):
    """A small DLRM-like ctredge graph with real MatMuls: embeddings + signed-log dense -> MLP -> sigmoid."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nd, nc = spec.n_dense, spec.n_cat
    item_off = int(spec.offsets[spec.item_feature_index])
    width = nd + nc * dim + dim
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (spec.total_buckets, dim)).astype(np.float32), "emb"),
        numpy_helper.from_array(spec.offsets.astype(np.int64), "offsets"),
        numpy_helper.from_array(np.array(item_off, dtype=np.int64), "item_off"),
        numpy_helper.from_array(np.array([0, nc * dim], dtype=np.int64), "flat"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
    ]
    n = helper.make_node
    nodes = [
        n("IsNaN", ["dense"], ["nan"]), n("Where", ["nan", "zero", "dense"], ["x"]),
        n("Abs", ["x"], ["ax"]), n("Add", ["ax", "one"], ["ax1"]), n("Log", ["ax1"], ["lx"]),
        n("Sign", ["x"], ["sx"]), n("Mul", ["sx", "lx"], ["tx"]),
        n("Add", ["cat", "offsets"], ["ci"]), n("Gather", ["emb", "ci"], ["ce"]), n("Reshape", ["ce", "flat"], ["cf"]),
        n("Add", ["hist", "item_off"], ["hi"]), n("Gather", ["emb", "hi"], ["he"]),
        n("ReduceMean", ["he"], ["hm"], axes=[1], keepdims=0),
        n("Concat", ["tx", "cf", "hm"], ["h0"], axis=1),
    ]
    prev, width_in = "h0", width
    for i, units in enumerate(hidden + (1,)):
        inits.append(numpy_helper.from_array(
            rng.normal(0, 1 / np.sqrt(width_in), (width_in, units)).astype(np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, units).astype(np.float32), f"b{i}"))
        nodes += [n("MatMul", [prev, f"W{i}"], [f"m{i}"]), n("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        if i < len(hidden):
            nodes.append(n("Relu", [f"a{i}"], [f"h{i + 1}"]))
            prev = f"h{i + 1}"
        width_in = units
    nodes.append(n("Sigmoid", [f"a{len(hidden)}"], ["ctr"]))
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["B", nd]),
         helper.make_tensor_value_info("cat", TensorProto.INT64, ["B", nc]),
         helper.make_tensor_value_info("hist", TensorProto.INT64, ["B", spec.hist_len])],
        [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, ["B", 1])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)
    helper.set_model_props(model, {METADATA_KEY: spec.to_json(), "ctredge.model_name": "mlp",
                                   "ctredge.model_version": str(seed)})
    return model


def plain_model():
    """A model without ctredge metadata: y = x @ W + float(k); name = Identity(s) (strings)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(3, 2) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["xw", "kf"], ["y"]), helper.make_node("Identity", ["s"], ["name"])],
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("k", TensorProto.INT32, ["batch", 2]),
         helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
         helper.make_tensor_value_info("name", TensorProto.STRING, ["batch"])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)


def save(model, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def contract_feeds(spec: FeatureSpec, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded valid contract inputs with NaNs, id 0 and padding."""
    rng = np.random.default_rng(seed)
    dense = rng.lognormal(1.0, 1.5, size=(batch, spec.n_dense)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.1] = np.nan
    cat = (rng.random((batch, spec.n_cat)) * spec.buckets[None, :]).astype(np.int64)
    hist = rng.integers(0, 500, size=(batch, spec.hist_len)).astype(np.int64)
    return {"dense": dense, "cat": cat, "hist": hist}


def raw_values(spec: FeatureSpec, batch: int, seed: int = 0) -> np.ndarray:
    """Raw categorical strings ``[batch, n_cat]`` as bytes, some empty."""
    rng = np.random.default_rng(seed)
    vals = np.array([[f"{f.name}-{rng.integers(0, 50)}".encode() for f in spec.cat] for _ in range(batch)],
                    dtype=object)
    vals[rng.random(vals.shape) < 0.1] = b""
    return vals
