"""The no-op floor model: the ctredge contract in, a constant ``ctr`` out.

A gRPC benchmark of a real model measures the server (decode, check, hash,
broadcast, assemble feeds, encode) plus the model.  Serving
:func:`noop_model` with the same requests measures the first part alone: its
graph has exactly the inputs of the FeatureSpec contract (``dense`` FP32,
``cat`` INT64, ``hist`` INT64, batch dimension dynamic) and the FeatureSpec in
its metadata, so ``ctredge serve`` loads it as a ctredge model and does all of
its per-request work, while ONNX Runtime only reads the batch size
(``Shape -> Slice -> Concat -> ConstantOfShape``) and returns zeros ``[B, 1]``.
Latency relative to this floor is what the model itself costs.

Built with ``onnx.helper`` at opset 17 and IR version 8 (``onnx`` 1.23 would
stamp IR 14, which ONNX Runtime 1.31 refuses).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ctredge.features import METADATA_KEY, OUTPUT_CTR, FeatureSpec

OPSET = 17
IR_VERSION = 8
NOOP_NAME = "noop"


def noop_model(spec: FeatureSpec, *, name: str = NOOP_NAME, version: int = 1) -> Any:
    """The floor's ``onnx.ModelProto`` for ``spec``: contract inputs, ``ctr`` = zeros ``[B, 1]`` FP32.

    Every input of ``spec.input_signature()`` is a graph input of the same
    dtype and rank (batch dimension ``B``); only the first one's shape is read.
    Metadata: ``ctredge.feature_spec`` (``spec.to_json()``), ``ctredge.model_name``,
    ``ctredge.model_version`` and ``ctredge.floor = noop``.
    """
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    sig = spec.input_signature()
    onnx_type = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(n, onnx_type[dt], ["B", *shape[1:]]) for n, (dt, shape) in sig.items()]
    first = next(iter(sig))
    inits = [numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "end"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "one")]
    nodes = [
        helper.make_node("Shape", [first], ["shape"]),
        helper.make_node("Slice", ["shape", "start", "end"], ["batch"]),
        helper.make_node("Concat", ["batch", "one"], ["out_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["out_shape"], [OUTPUT_CTR],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
    ]
    graph = helper.make_graph(nodes, name, inputs,
                              [helper.make_tensor_value_info(OUTPUT_CTR, TensorProto.FLOAT, ["B", 1])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="ctredge.benchmarks.floor")
    helper.set_model_props(model, {METADATA_KEY: spec.to_json(), "ctredge.model_name": name,
                                   "ctredge.model_version": str(version), "ctredge.floor": "noop"})
    return model


def write_noop_model(spec: FeatureSpec, path: str | os.PathLike[str], name: str = NOOP_NAME, version: int = 1,
                     *, config: Any = None) -> Path:
    """Write the floor model into the repository folder ``path``: ``path/<name>/<version>/model.onnx``.

    ``config``: an optional ``ServingConfig`` (or its JSON dict) written as
    ``path/<name>/config.json``, e.g. the compared model's, so both serve alike.
    Returns the model file.  The graph is checked with ``onnx.checker`` first.
    """
    import onnx

    model = noop_model(spec, name=name, version=version)
    onnx.checker.check_model(model)
    folder = Path(path) / name / str(int(version))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    tmp = out.with_suffix(".onnx.tmp")
    tmp.write_bytes(model.SerializeToString())
    os.replace(tmp, out)
    if config is not None:
        from ctredge.serving_config import serving_config_from_dict, write_serving_config

        cfg = serving_config_from_dict(config) if isinstance(config, dict) else config
        write_serving_config(Path(path) / name, cfg)
    return out
