"""ONNX Runtime's quantizers and fp16 converter, wrapped: ModelProto in, ModelProto out.

ORT's tools work on files, so each wrapper writes the model to a temporary
folder, runs the tool and loads the result (:func:`with_files`).  Static int8
is QDQ with activation ranges calibrated on feed dicts
(:mod:`ctredge.compress.calibration`); dynamic int8 computes activation ranges
per batch (a row's score depends on its batch-mates, DESIGN.md); fp16 keeps the
dense input transform in fp32 because raw counts overflow fp16's 65504.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ctredge.compress.calibration import FeedCalibrationReader, model_inputs
from ctredge.compress.graph import FreshNames, input_transform_nodes, prune_dead_nodes, tensor_types, topological_sort
from ctredge.compress.onnxio import save_model
from ctredge.compress.qconfig import QuantizeConfig


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def with_files(model: Any, run: Any) -> Any:
    """Save ``model`` to a temp folder, call ``run(src, dst)`` (ORT's tools work on paths), load ``dst``."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="ctredge-quant-") as tmp:
        src, dst = Path(tmp) / "src.onnx", Path(tmp) / "dst.onnx"
        save_model(model, src)
        run(src, dst)
        return onnx.load(str(dst))


def static_int8(model: Any, calibration: Iterable[Mapping[str, np.ndarray]], cfg: QuantizeConfig) -> Any:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quant_pre_process, quantize_static

    reader = FeedCalibrationReader(calibration, model_inputs(model), batch_size=cfg.calibration_batch,
                                   max_rows=cfg.calibration_rows, drop_remainder=cfg.calibrate_method != "minmax")
    reader.batches()  # read and check the feeds now: errors name the feed, not ORT's internals
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibrate_method]

    def run(src: Path, dst: Path) -> None:
        pre = src.with_name("pre.onnx")
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(cfg.static_op_types), per_channel=cfg.static_per_channel,
                        nodes_to_exclude=_matching_nodes(pre, cfg.static_exclude_nodes),
                        reduce_range=cfg.reduce_range,
                        activation_type=_quant_type(cfg.static_activation_type),
                        weight_type=_quant_type(cfg.static_weight_type), calibrate_method=method,
                        extra_options=extra)

    extra: dict[str, Any] = {"MatMulConstBOnly": True}
    if not cfg.static_quantize_outputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(cfg.static_op_types)
    return with_files(model, run)


def _matching_nodes(path: Path, patterns: tuple[str, ...]) -> list[str]:
    """Names of the nodes of the model at ``path`` containing any of ``patterns``."""
    import onnx

    if not patterns:
        return []
    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if any(p in n.name for p in patterns)]


@contextlib.contextmanager
def _quiet_root_warning(fragment: str) -> Iterator[None]:
    """Drop root-logger records containing ``fragment`` (ORT's quantizer logs through ``logging.warning``)."""
    def keep(record: logging.LogRecord) -> bool:
        return fragment not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def dynamic_int8(model: Any, cfg: QuantizeConfig) -> Any:
    from onnxruntime.quantization import quantize_dynamic

    def run(src: Path, dst: Path) -> None:
        # no quant_pre_process here: its MatMul+Add -> Gemm fusion hides the layers from dynamic
        # quantization (no dynamic Gemm kernel); ORT's warning asking for it is silenced
        with _quiet_root_warning("pre-processing before quantization"):
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(cfg.dynamic_op_types),
                             per_channel=cfg.dynamic_per_channel, reduce_range=cfg.reduce_range,
                             weight_type=_quant_type(cfg.dynamic_weight_type),
                             extra_options={"MatMulConstBOnly": True})

    return with_files(model, run)


def fp16(model: Any, cfg: QuantizeConfig) -> Any:
    """fp16 everywhere but the input transform, which runs in fp32 from the fp32 inputs.

    ORT's converter handles chains of blocked nodes badly (a fp32 -> fp16 -> fp32
    round trip that turns raw counts past 65504 into inf, duplicate Cast names),
    so the input transform is taken out of the graph, its outputs become fp32
    inputs of the graph handed to the converter, and it is put back in front.
    """
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    g = model.graph
    front = input_transform_nodes(model) if cfg.fp16_keep_input_transform else set()
    front_nodes = [n for k, n in enumerate(g.node) if k in front]
    rest_nodes = [n for k, n in enumerate(g.node) if k not in front]
    front_out = {o for n in front_nodes for o in n.output}
    rest_in = {i for n in rest_nodes for i in n.input} | {o.name for o in g.output}
    boundary = [o for n in front_nodes for o in n.output if o in rest_in]
    # float initializers read by both parts: the transform gets its own fp32 copy
    inits = {i.name: i for i in g.initializer}
    fresh = FreshNames(model)
    for n in front_nodes:
        for k, name in enumerate(n.input):
            init = inits.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT and name in rest_in:
                copy = numpy_helper.from_array(numpy_helper.to_array(init), fresh(name + "_fp32"))
                g.initializer.append(copy)
                n.input[k] = copy.name
    types = tensor_types(model, boundary)
    outer_inputs = list(g.input)
    vis = [v for v in g.value_info if v.name not in front_out]
    del g.node[:]
    g.node.extend(rest_nodes)
    del g.value_info[:]
    g.value_info.extend(vis)
    del g.input[:]
    g.input.extend([i for i in outer_inputs if i.name in rest_in]
                   + [helper.make_tensor_value_info(b, types[b], None) for b in boundary])
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST))
    g = model.graph
    del g.input[:]
    g.input.extend(outer_inputs)
    g.node.extend(front_nodes)
    topological_sort(model)
    prune_dead_nodes(model)
    return model


__all__ = ["with_files", "static_int8", "dynamic_int8", "fp16"]
