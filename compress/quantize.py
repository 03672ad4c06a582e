"""Quantization of exported ONNX CTR models: ONNX + ONNX Runtime + numpy, no TensorFlow.

:func:`quantize` turns an fp32 ONNX model (``ctredge.export``) into one variant:

========================  ==================================================================
kind                      what changes
========================  ==================================================================
``fp16``                  every float op/initializer in fp16 (ORT's
                          ``convert_float_to_float16``), inputs/outputs stay fp32; the dense
                          input transform (NaN fill, signed log1p) stays fp32 because raw
                          counts overflow fp16's 65504
``int8-dynamic``          ORT ``quantize_dynamic``: int8 weights, activation ranges per batch
                          (a row's score depends on its batch-mates, DESIGN.md)
``int8-static``           ORT ``quantize_static``, QDQ, per-channel weights, activation ranges
                          calibrated on feed dicts (:mod:`ctredge.compress.calibration`)
``emb-int8``              row-wise symmetric int8 embedding table + fp32 scale per row
``emb-int4``              row-wise symmetric int4 (two nibbles per uint8) + fp32 scale per row
``int8-static+emb-int8``  both: row-wise embeddings first, then static QDQ (calibrated on the
``int8-static+emb-int4``  graph that will be served)
========================  ==================================================================

Row-wise embedding quantization (``emb-*``) rewrites every large float
initializer ``E [rows, dim]`` whose only consumers are ``Gather(E, ids, axis=0)``
(the shared table of ``ctredge.train``, gathered once for ``cat`` and once for
``hist``).  Row ``r`` is stored as integers ``q[r]`` and a scale ``s[r] =
max|E[r]| / qmax`` (``qmax`` 127 or 7); the graph gathers the *packed* rows and
their scales and dequantizes after the gather, ``E[r] ~= q[r] * s[r]``, so only
the gathered rows are ever float and the session holds the small table::

    int8:  Gather(Q8, ids) -> Cast(float) -> Mul(Gather(S, ids))
    int4:  Gather(P4, ids) -> BitShift(<<4, >>4) | BitShift(>>4) -> Concat
                           -> [Slice] -> Cast(float) -> Sub(8) -> Mul(Gather(S, ids))

Only standard ONNX ops of opset 11+ (no INT4 type, no BitwiseAnd, no contrib
``GatherBlockQuantized``), so any execution provider with those kernels runs it
(checked here on the CPU EP only).  The int4 layout (:func:`pack_int4`):
byte ``k`` of a row holds column ``k`` in its low nibble and column
``k + ceil(dim/2)`` in its high nibble, each stored as ``q + 8``.  The graph is
bit-exact against :func:`dequantize_rows_int8` / :func:`dequantize_rows_int4`.

Every variant keeps the source's ``metadata_props`` (``ctredge.feature_spec``, ...)
and adds ``ctredge.quantization`` (the kind) and ``ctredge.quantization_config``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ctredge.compress.calibration import FeedCalibrationReader, model_inputs
from ctredge.config import config_to_dict
from ctredge.errors import ConfigError, ValidationError
from ctredge.export.onnx import read_metadata, set_metadata
from ctredge.export.validate import cpu_session
from ctredge.features import OUTPUT_CTR

VARIANT_KINDS = ("fp16", "int8-dynamic", "int8-static", "emb-int8", "emb-int4",
                 "int8-static+emb-int8", "int8-static+emb-int4")
METADATA_QUANTIZATION = "ctredge.quantization"
METADATA_QUANTIZATION_CONFIG = "ctredge.quantization_config"
QUANT_TYPES = ("uint8", "int8")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
EMB_SCALES = ("absmax", "mse")
PROTOBUF_LIMIT = 2 * 1024**3
#: ONNX Runtime 1.31 loads IR <= 13 but onnx 1.23 stamps 14; we write the lowest IR the opsets allow.
MIN_IR_VERSION = 8

_ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "Cast", "Ceil", "Clip", "Div", "Equal", "Exp", "Floor", "Greater", "GreaterOrEqual",
    "Identity", "IsInf", "IsNaN", "Less", "LessOrEqual", "Log", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pow",
    "Reciprocal", "Round", "Sign", "Softplus", "Sqrt", "Sub", "Tanh", "Where",
})


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one quantization (saved in the variant's metadata and manifest).

    Static int8 (``int8-static*``): ``static_activation_type`` / ``static_weight_type``
    (``uint8`` | ``int8``; U8S8 is the default because S8S8 QDQ measured several
    times slower at batch 1 on this CPU), ``static_per_channel``,
    ``static_op_types`` (ops given QDQ; the embedding Gather is left to the
    ``emb-*`` path), ``static_quantize_outputs`` (also QDQ the outputs of those
    ops; off by default: quantizing the final logit alone cost up to 0.1 in
    probability on a trained DCN-v2, and ORT runs DQ -> MatMul/Gemm -> float
    faster on CPU), ``static_exclude_nodes`` (node-name fragments kept in float,
    e.g. ``("deep_dense_0",)``), ``calibrate_method`` (``minmax`` | ``entropy`` |
    ``percentile``), ``calibration_rows`` (rows used at most, 0 = all) in batches
    of ``calibration_batch``.  ``reduce_range``: 7-bit weights for CPUs without
    VNNI (U8S8 can saturate there).

    Dynamic int8: ``dynamic_weight_type``, ``dynamic_per_channel``,
    ``dynamic_op_types`` (``Gather`` included: ORT then stores the tables per-tensor
    int8, the stock ORT recipe this variant stands for).

    Row-wise embeddings (``emb-*``): tables with at least ``emb_min_rows`` rows
    whose quantized form is smaller than fp32 (``dim >= 2``) are rewritten;
    ``emb_scale``: ``absmax`` (``s = max|row| / qmax``) or ``mse`` (per row, the
    clipping of ``max|row|`` among 0.5..1 with the least squared error).

    ``fp16_keep_input_transform``: keep the element-wise ops fed by the float
    inputs (NaN fill, signed log1p) in fp32 (raw counts overflow fp16).

    Raises:
        ConfigError: a value out of range or of the wrong type.
    """

    static_activation_type: str = "uint8"
    static_weight_type: str = "int8"
    static_per_channel: bool = True
    static_quantize_outputs: bool = False
    static_op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    static_exclude_nodes: tuple[str, ...] = ()
    calibrate_method: str = "minmax"
    calibration_rows: int = 4096
    calibration_batch: int = 256
    reduce_range: bool = False
    dynamic_weight_type: str = "int8"
    dynamic_per_channel: bool = False
    dynamic_op_types: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
    emb_min_rows: int = 256
    emb_scale: str = "absmax"
    fp16_keep_input_transform: bool = True

    def __post_init__(self) -> None:
        for name in ("static_activation_type", "static_weight_type", "dynamic_weight_type"):
            if getattr(self, name) not in QUANT_TYPES:
                raise ConfigError(f"{name}: expected one of {QUANT_TYPES}, got {getattr(self, name)!r}")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ConfigError(f"calibrate_method: expected one of {CALIBRATE_METHODS}, got {self.calibrate_method!r}")
        if self.emb_scale not in EMB_SCALES:
            raise ConfigError(f"emb_scale: expected one of {EMB_SCALES}, got {self.emb_scale!r}")
        for name in ("static_op_types", "dynamic_op_types", "static_exclude_nodes"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value)
                    or (not value and name != "static_exclude_nodes")):
                raise ConfigError(f"{name}: expected a {'' if name == 'static_exclude_nodes' else 'non-empty '}"
                                  f"list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name, minimum in (("calibration_rows", 0), ("calibration_batch", 1), ("emb_min_rows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
        for name in ("static_per_channel", "static_quantize_outputs", "reduce_range", "dynamic_per_channel",
                     "fp16_keep_input_transform"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class EmbeddingTable:
    """A float initializer ``[rows, dim]`` read only by ``Gather(axis=0)`` nodes."""

    name: str
    rows: int
    dim: int
    gathers: tuple[str, ...]

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.rows * self.dim


# ---------------------------------------------------------------- row-wise numpy reference
def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack int4 values ``[rows, dim]`` (integers in ``[-8, 7]``) two per byte.

    Returns uint8 ``[rows, ceil(dim/2)]``: byte ``k`` holds ``q[:, k] + 8`` in
    its low nibble and ``q[:, k + ceil(dim/2)] + 8`` in its high nibble (an odd
    ``dim`` is padded with a 0 value).

    Raises:
        ConfigError: ``q`` is not 2-D or holds values outside ``[-8, 7]``.
    """
    q = np.asarray(q)
    if q.ndim != 2:
        raise ConfigError(f"pack_int4: expected a 2-D array [rows, dim], got shape {list(q.shape)}")
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ConfigError(f"pack_int4: values must lie in [-8, 7], got [{q.min()}, {q.max()}]")
    rows, dim = q.shape
    half = (dim + 1) // 2
    nib = np.full((rows, 2 * half), 8, dtype=np.uint8)
    nib[:, :dim] = (q.astype(np.int16) + 8).astype(np.uint8)
    return nib[:, :half] | (nib[:, half:] << 4)


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 ``[rows, ceil(dim/2)]`` -> int8 ``[rows, dim]``.

    Raises:
        ConfigError: ``packed`` is not 2-D uint8 of ``ceil(dim/2)`` columns.
    """
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8 or packed.shape[1] != (dim + 1) // 2:
        raise ConfigError(f"unpack_int4: expected uint8 [rows, {(dim + 1) // 2}] for dim {dim}, "
                          f"got {packed.dtype} {list(packed.shape)}")
    nib = np.concatenate([packed & 0x0F, packed >> 4], axis=1)[:, :dim]
    return (nib.astype(np.int16) - 8).astype(np.int8)


def _row_scales(table: np.ndarray, qmax: int, method: str) -> np.ndarray:
    """Per-row fp32 scales: ``max|row| / qmax`` or the least-squared-error clipping of it."""
    amax = np.abs(table).max(axis=1).astype(np.float32)
    if method == "absmax":
        scale = amax / np.float32(qmax)
    else:
        ratios = np.linspace(0.5, 1.0, 26, dtype=np.float32)
        scale = np.empty_like(amax)
        for lo in range(0, table.shape[0], 32768):
            t = table[lo:lo + 32768]
            cand = amax[lo:lo + 32768, None] * ratios[None, :] / np.float32(qmax)  # [r, k]
            safe = np.where(cand > 0, cand, np.float32(1))
            q = np.clip(np.rint(t[:, None, :] / safe[:, :, None]), -qmax, qmax)
            err = ((q * safe[:, :, None] - t[:, None, :]) ** 2).sum(axis=2)
            scale[lo:lo + 32768] = cand[np.arange(len(t)), err.argmin(axis=1)]
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)  # an all-zero row: q = 0


def quantize_rows_int8(table: np.ndarray, method: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """Row-wise symmetric int8: returns ``(q int8 [rows, dim] in [-127, 127], scale fp32 [rows])``."""
    table = _as_table(table)
    scale = _row_scales(table, 127, method)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_rows_int4(table: np.ndarray, method: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """Row-wise symmetric int4: returns ``(packed uint8 [rows, ceil(dim/2)], scale fp32 [rows])``.

    Values lie in ``[-7, 7]`` before packing (:func:`pack_int4`).
    """
    table = _as_table(table)
    scale = _row_scales(table, 7, method)
    q = np.clip(np.rint(table / scale[:, None]), -7, 7).astype(np.int8)
    return pack_int4(q), scale


def dequantize_rows_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q * scale[:, None]`` in fp32: what the int8 graph computes for a gathered row."""
    return q.astype(np.float32) * np.asarray(scale, np.float32).reshape(-1, 1)


def dequantize_rows_int4(packed: np.ndarray, scale: np.ndarray, dim: int) -> np.ndarray:
    """``unpack_int4(packed) * scale[:, None]`` in fp32: what the int4 graph computes."""
    return unpack_int4(packed, dim).astype(np.float32) * np.asarray(scale, np.float32).reshape(-1, 1)


def _as_table(table: np.ndarray) -> np.ndarray:
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 2:
        raise ConfigError(f"an embedding table must be 2-D [rows, dim], got shape {list(table.shape)}")
    if not np.isfinite(table).all():
        raise ConfigError("the embedding table holds NaN or infinite values")
    return table


# ---------------------------------------------------------------- the graph
def find_embedding_tables(model: Any, min_rows: int = 1) -> list[EmbeddingTable]:
    """Float initializers ``[rows, dim]`` (``rows >= min_rows``, ``dim >= 2``) read only by ``Gather(axis=0)``.

    Takes an ``onnx.ModelProto``.  Returns them largest first.
    """
    import onnx

    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in model.graph.output}
    found = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2 or init.name in outputs:
            continue
        rows, dim = int(init.dims[0]), int(init.dims[1])
        uses = consumers.get(init.name, [])
        if rows < min_rows or dim < 2 or not uses:
            continue
        if all(n.op_type == "Gather" and i == 0 and _axis(n) == 0 and n.domain in ("", "ai.onnx") for n, i in uses):
            found.append(EmbeddingTable(init.name, rows, dim, tuple(n.name for n, _ in uses)))
    return sorted(found, key=lambda t: -t.fp32_bytes)


def _axis(node: Any) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 0


class _Names:
    """Fresh tensor/node names that collide with nothing in the graph."""

    def __init__(self, model: Any) -> None:
        g = model.graph
        self.used = {i.name for i in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
        for n in g.node:
            self.used.update(n.input)
            self.used.update(n.output)
            self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _quantize_embeddings(model: Any, bits: int, cfg: QuantizeConfig) -> tuple[Any, list[dict[str, Any]]]:
    """Rewrite every embedding table row-wise (in place); returns the model and a report per table."""
    from onnx import numpy_helper

    _require_opset(model, 11)  # BitShift
    tables = find_embedding_tables(model, cfg.emb_min_rows)
    if not tables:
        raise ConfigError(
            f"emb-int{bits}: the model has no embedding table to quantize: expected a float initializer "
            f"[rows >= {cfg.emb_min_rows}, dim >= 2] read only by Gather(axis=0) nodes (the shared table "
            "of ctredge.train); lower QuantizeConfig.emb_min_rows for a tiny model")
    g = model.graph
    fresh = _Names(model)
    inits = {i.name: i for i in g.initializer}
    new_inits: list[Any] = []
    replace: dict[str, list[Any]] = {}
    consts: dict[str, str] = {}
    report = []
    for t in tables:
        table = numpy_helper.to_array(inits[t.name])
        if bits == 8:
            q, scale = quantize_rows_int8(table, cfg.emb_scale)
            err = np.abs(dequantize_rows_int8(q, scale) - table)
        else:
            q, scale = quantize_rows_int4(table, cfg.emb_scale)
            err = np.abs(dequantize_rows_int4(q, scale, t.dim) - table)
        base = t.name.replace(":", "_").replace("/", "_")
        q_name, s_name = fresh(f"{base}_q{bits}"), fresh(f"{base}_rowscale")
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale.reshape(-1, 1), s_name)]
        if bits == 4 and not consts:
            consts = {"shift": fresh("ctredge_int4_shift"), "zero": fresh("ctredge_int4_zero")}
            new_inits += [numpy_helper.from_array(np.array(4, np.uint8), consts["shift"]),
                          numpy_helper.from_array(np.array(8.0, np.float32), consts["zero"])]
        if bits == 4 and t.dim % 2:  # the padding nibble column is sliced off
            consts["slice"] = [fresh(f"{base}_slice_{w}") for w in ("start", "end", "axis")]
            new_inits += [numpy_helper.from_array(np.array([v], np.int64), n)
                          for v, n in zip((0, t.dim, -1), consts["slice"])]
        else:
            consts.pop("slice", None)
        for node in g.node:
            if node.op_type == "Gather" and node.input[0] == t.name:
                replace[node.output[0]] = _dequantizing_gather(node, q_name, s_name, bits, consts, fresh)
        report.append({"table": t.name, "rows": t.rows, "dim": t.dim, "bits": bits, "gathers": len(t.gathers),
                       "fp32_bytes": t.fp32_bytes, "quantized_bytes": int(q.nbytes + scale.nbytes),
                       "max_abs_error": float(err.max()) if err.size else 0.0,
                       "mean_abs_error": float(err.mean()) if err.size else 0.0})
    old = {t.name for t in tables}
    for coll in (g.initializer, g.input, g.value_info):
        keep = [v for v in coll if v.name not in old]
        del coll[:]
        coll.extend(keep)
    g.initializer.extend(new_inits)
    nodes = []
    for node in g.node:
        nodes.extend(replace.get(node.output[0], [node]) if node.op_type == "Gather" else [node])
    del g.node[:]
    g.node.extend(nodes)
    return model, report


def _dequantizing_gather(node: Any, q_name: str, s_name: str, bits: int, consts: dict[str, Any],
                         fresh: _Names) -> list[Any]:
    """The nodes that replace ``Gather(E, ids)``: gather packed rows and scales, dequantize after."""
    from onnx import TensorProto, helper

    ids, out = node.input[1], node.output[0]
    prefix = fresh(f"{node.name or out}/rowq")

    def tmp(suffix: str) -> str:
        return fresh(f"{prefix}/{suffix}")

    rows, scales, values = tmp("rows"), tmp("scales"), tmp("float")
    nodes = [helper.make_node("Gather", [q_name, ids], [rows], name=tmp("gather_rows"), axis=0),
             helper.make_node("Gather", [s_name, ids], [scales], name=tmp("gather_scales"), axis=0)]
    if bits == 8:
        nodes.append(helper.make_node("Cast", [rows], [values], name=tmp("cast"), to=TensorProto.FLOAT))
    else:
        shift = consts["shift"]
        shl, lo, hi, nibbles, floats = tmp("lo_shl"), tmp("lo"), tmp("hi"), tmp("nibbles"), tmp("nibbles_float")
        nodes += [helper.make_node("BitShift", [rows, shift], [shl], name=tmp("shl"), direction="LEFT"),
                  helper.make_node("BitShift", [shl, shift], [lo], name=tmp("shr_lo"), direction="RIGHT"),
                  helper.make_node("BitShift", [rows, shift], [hi], name=tmp("shr_hi"), direction="RIGHT"),
                  helper.make_node("Concat", [lo, hi], [nibbles], name=tmp("concat"), axis=-1)]
        if "slice" in consts:
            sliced = tmp("sliced")
            nodes.append(helper.make_node("Slice", [nibbles, *consts["slice"]], [sliced], name=tmp("slice")))
            nibbles = sliced
        nodes += [helper.make_node("Cast", [nibbles], [floats], name=tmp("cast"), to=TensorProto.FLOAT),
                  helper.make_node("Sub", [floats, consts["zero"]], [values], name=tmp("centre"))]
    nodes.append(helper.make_node("Mul", [values, scales], [out], name=tmp("dequantize")))
    return nodes


def _require_opset(model: Any, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < version:
            raise ConfigError(f"row-wise embedding quantization needs opset >= {version}, the model has {op.version}")


def _input_transform_nodes(model: Any) -> set[int]:
    """Indices of the nodes of the input transform (run in fp32 by ``fp16``).

    The element-wise nodes fed (transitively) by float graph inputs -- NaN fill,
    signed log1p -- plus everything they read that is computed in the graph
    (tf2onnx leaves small constant subgraphs such as ``Cast(Not(const))``).
    """
    import onnx

    nodes = list(model.graph.node)
    float_inputs = [i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for k, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(k)
        for name in node.output:
            producer[name] = k
    front: set[int] = set()
    todo = list(float_inputs)
    while todo:
        for k in consumers.get(todo.pop(), []):
            if nodes[k].op_type in _ELEMENTWISE and nodes[k].domain in ("", "ai.onnx") and k not in front:
                front.add(k)
                todo.extend(nodes[k].output)
    todo_nodes = list(front)
    while todo_nodes:
        for name in nodes[todo_nodes.pop()].input:
            k = producer.get(name)
            if k is not None and k not in front:
                front.add(k)
                todo_nodes.append(k)
    return front


# ---------------------------------------------------------------- ORT's quantizers
def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def _with_files(model: Any, run: Any) -> Any:
    """Save ``model`` to a temp folder, call ``run(src, dst)`` (ORT's tools work on paths), load ``dst``."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="ctredge-quant-") as tmp:
        src, dst = Path(tmp) / "src.onnx", Path(tmp) / "dst.onnx"
        save_model(model, src)
        run(src, dst)
        return onnx.load(str(dst))


def _static(model: Any, calibration: Iterable[Mapping[str, np.ndarray]], cfg: QuantizeConfig) -> Any:
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
    return _with_files(model, run)


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


def _dynamic(model: Any, cfg: QuantizeConfig) -> Any:
    from onnxruntime.quantization import quantize_dynamic

    def run(src: Path, dst: Path) -> None:
        # no quant_pre_process here: its MatMul+Add -> Gemm fusion hides the layers from dynamic
        # quantization (no dynamic Gemm kernel); ORT's warning asking for it is silenced
        with _quiet_root_warning("pre-processing before quantization"):
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(cfg.dynamic_op_types),
                             per_channel=cfg.dynamic_per_channel, reduce_range=cfg.reduce_range,
                             weight_type=_quant_type(cfg.dynamic_weight_type),
                             extra_options={"MatMulConstBOnly": True})

    return _with_files(model, run)


def _fp16(model: Any, cfg: QuantizeConfig) -> Any:
    """fp16 everywhere but the input transform, which runs in fp32 from the fp32 inputs.

    ORT's converter handles chains of blocked nodes badly (a fp32 -> fp16 -> fp32
    round trip that turns raw counts past 65504 into inf, duplicate Cast names),
    so the input transform is taken out of the graph, its outputs become fp32
    inputs of the graph handed to the converter, and it is put back in front.
    """
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    g = model.graph
    front = _input_transform_nodes(model) if cfg.fp16_keep_input_transform else set()
    front_nodes = [n for k, n in enumerate(g.node) if k in front]
    rest_nodes = [n for k, n in enumerate(g.node) if k not in front]
    front_out = {o for n in front_nodes for o in n.output}
    rest_in = {i for n in rest_nodes for i in n.input} | {o.name for o in g.output}
    boundary = [o for n in front_nodes for o in n.output if o in rest_in]
    # float initializers read by both parts: the transform gets its own fp32 copy
    inits = {i.name: i for i in g.initializer}
    fresh = _Names(model)
    for n in front_nodes:
        for k, name in enumerate(n.input):
            init = inits.get(name)
            if init is not None and init.data_type == TensorProto.FLOAT and name in rest_in:
                copy = numpy_helper.from_array(numpy_helper.to_array(init), fresh(name + "_fp32"))
                g.initializer.append(copy)
                n.input[k] = copy.name
    types = _tensor_types(model, boundary)
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
    _topological_sort(model)
    _prune_dead_nodes(model)
    return model


def _tensor_types(model: Any, names: list[str]) -> dict[str, int]:
    """ONNX element types of intermediate tensors (shape inference on a weightless copy)."""
    import onnx

    if not names:
        return {}
    light = onnx.ModelProto()
    light.CopyFrom(model)
    del light.graph.initializer[:]  # inference needs types and shapes, not the bytes
    light.graph.input.extend([onnx.helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                              for i in model.graph.initializer])
    inferred = onnx.shape_inference.infer_shapes(light)
    known = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    return {n: known.get(n) or onnx.TensorProto.FLOAT for n in names}


def _prune_dead_nodes(model: Any) -> None:
    """Drop nodes (and value_info) whose outputs nothing reads; nodes must be sorted."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(keep))
    produced = {o for n in g.node for o in n.output}
    vis = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vis)


def _topological_sort(model: Any) -> None:
    """Order nodes so every input is produced before it is read (the converter appends its Casts)."""
    g = model.graph
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValidationError(f"the graph has a cycle or reads undefined tensors at node {rest[0].name!r}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)


# ---------------------------------------------------------------- public API
def quantize(src: Any, kind: str, calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
             cfg: QuantizeConfig | None = None) -> Any:
    """Make one quantized variant of an fp32 ONNX model.

    Takes: ``src`` (``onnx.ModelProto`` -- not modified -- or a path), ``kind``
    (one of :data:`VARIANT_KINDS`), ``calibration`` (an iterable of feed dicts
    ``{input name: array}``; needed by ``int8-static*``, ignored by the rest) and
    a :class:`QuantizeConfig` (default settings when ``None``).

    Returns: the variant as an ``onnx.ModelProto`` that ONNX Runtime 1.31 loads
    (IR version set explicitly), with the source's ``metadata_props`` plus
    ``ctredge.quantization`` = ``kind`` and ``ctredge.quantization_config``.
    Write it with :func:`save_model`.

    Raises:
        ConfigError: unknown kind, a config that is not a QuantizeConfig, a source
            that is already quantized, ``emb-*`` on a model without an embedding
            table (float initializer read only by ``Gather``), or ``int8-static*``
            without calibration data (or with feeds that do not fit the model).
        ValidationError: the result fails the ONNX checker.
    """
    import onnx

    if kind not in VARIANT_KINDS:
        raise ConfigError(f"unknown quantization kind {kind!r}; expected one of {VARIANT_KINDS}")
    cfg = QuantizeConfig() if cfg is None else cfg
    if not isinstance(cfg, QuantizeConfig):
        raise ConfigError(f"quantize: expected a QuantizeConfig, got {type(cfg).__name__}")
    if isinstance(src, (str, os.PathLike)):
        try:
            model = onnx.load(str(src))
        except Exception as exc:  # onnx raises OSError, DecodeError, ...
            raise ConfigError(f"cannot read ONNX model {src}: {exc}") from exc
    elif isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
    else:
        raise ConfigError(f"quantize: expected an onnx.ModelProto or a path, got {type(src).__name__}")
    meta = read_metadata(model)
    if meta.get(METADATA_QUANTIZATION, "none") != "none":
        raise ConfigError(f"the source is already quantized ({meta[METADATA_QUANTIZATION]!r}); "
                          "quantize the fp32 export instead")
    parts = kind.split("+")
    if "int8-static" in parts and calibration is None:
        raise ConfigError(f"{kind}: static quantization needs calibration data: pass an iterable of feed dicts "
                          "({input name: array}), e.g. held-out click-log rows read with the hub reader")

    emb = next((p for p in parts if p.startswith("emb-")), None)
    if emb is not None:
        model, _ = _quantize_embeddings(model, 8 if emb == "emb-int8" else 4, cfg)
    if "int8-static" in parts:
        model = _static(model, calibration, cfg)
    elif kind == "int8-dynamic":
        model = _dynamic(model, cfg)
    elif kind == "fp16":
        model = _fp16(model, cfg)

    del model.metadata_props[:]
    set_metadata(model, {**meta, METADATA_QUANTIZATION: kind,
                         METADATA_QUANTIZATION_CONFIG: json.dumps(config_to_dict(cfg), sort_keys=True)})
    _set_ir_version(model)
    if _proto_bytes(model) < PROTOBUF_LIMIT:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises its own ValidationError types
            raise ValidationError(f"{kind}: the quantized graph fails the ONNX checker: {exc}") from exc
    return model


def _set_ir_version(model: Any) -> None:
    import onnx

    need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(MIN_IR_VERSION, need)


def _proto_bytes(model: Any) -> int:
    """Bytes of a model's tensors (ModelProto.ByteSize() fails past 2 GB)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else t.ByteSize()
    return total + sum(n.ByteSize() for n in model.graph.node)


def save_model(model: Any, path: str | os.PathLike[str]) -> list[Path]:
    """Write a model; past protobuf's 2 GB its tensors go to ``<file>.data`` beside it.

    Returns the files written.
    """
    import onnx

    path = Path(path)
    if _proto_bytes(model) < PROTOBUF_LIMIT * 0.95:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


def quantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], kind: str,
                  calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
                  cfg: QuantizeConfig | None = None) -> dict[str, Any]:
    """:func:`quantize` ``src`` and write it to ``dst`` (:func:`save_model`).

    Returns ``{"kind", "files", "bytes", "source_bytes"}``.  Raises what :func:`quantize` raises.
    """
    model = quantize(src, kind, calibration, cfg)
    files = save_model(model, dst)
    src = Path(src)
    src_files = [src] + ([src.with_name(src.name + ".data")] if src.with_name(src.name + ".data").exists() else [])
    return {"kind": kind, "files": [str(f) for f in files], "bytes": sum(f.stat().st_size for f in files),
            "source_bytes": sum(f.stat().st_size for f in src_files)}


def embedding_report(src: Any, kind: str, cfg: QuantizeConfig | None = None) -> list[dict[str, Any]]:
    """Per table: rows, dim, fp32 and quantized bytes, max/mean |dequantized - fp32| for ``emb-int8``/``emb-int4``.

    Raises:
        ConfigError: ``kind`` is not an ``emb-*`` kind or the model has no table.
    """
    import onnx

    if kind not in ("emb-int8", "emb-int4"):
        raise ConfigError(f"embedding_report: expected 'emb-int8' or 'emb-int4', got {kind!r}")
    model = onnx.load(str(src)) if isinstance(src, (str, os.PathLike)) else onnx.ModelProto.FromString(
        src.SerializeToString())
    return _quantize_embeddings(model, 8 if kind == "emb-int8" else 4, cfg or QuantizeConfig())[1]


def predict(model_or_session: Any, feeds: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
    """Score feed dicts with ONNX Runtime (CPU, 1 thread, unless a session is given).

    Takes: a ModelProto, path, serialized bytes or an ``InferenceSession``; a feed
    dict (extra keys such as labels are ignored); rows per ``run`` call.
    Returns: fp32 ``[B]`` click probabilities.

    Raises:
        ConfigError: a model input is missing from ``feeds`` or batch sizes differ.
        ValidationError: ONNX Runtime cannot load the model.
    """
    session = model_or_session if hasattr(model_or_session, "run") else cpu_session(
        str(model_or_session) if isinstance(model_or_session, os.PathLike) else model_or_session)
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ConfigError(f"predict: feeds lack input(s) {missing}; the model takes {names}, got {sorted(feeds)}")
    arrays = {n: np.asarray(feeds[n]) for n in names}
    sizes = {n: a.shape[0] for n, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"predict: inputs differ in batch size: {sizes}")
    n = next(iter(sizes.values()))
    out = [session.run([OUTPUT_CTR], {k: a[i:i + batch_size] for k, a in arrays.items()})[0]
           for i in range(0, n, max(1, int(batch_size)))]
    return np.concatenate(out).reshape(-1).astype(np.float32) if out else np.zeros(0, np.float32)


_RSS_SCRIPT = r"""
import ctypes, json, sys
import numpy as np
import onnxruntime as ort

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL("libc.so.6")
path, batch = sys.argv[1], int(sys.argv[2])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
opts.log_severity_level = 3
types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
         "tensor(float16)": np.float16, "tensor(double)": np.float64}
libc.malloc_trim(0)
before = rss()
sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
feeds = {i.name: np.zeros([d if isinstance(d, int) else batch for d in i.shape], types[i.type])
         for i in sess.get_inputs()}
sess.run(None, feeds)
libc.malloc_trim(0)
print(json.dumps({"before": before, "after": rss()}))
"""


def session_rss_bytes(path: str | os.PathLike[str], batch: int = 64) -> int:
    """RSS growth of a fresh process that opens an ORT CPU session on ``path`` and runs one batch.

    Measured in a subprocess (numpy and onnxruntime already imported before the
    first reading, freed heap returned with ``malloc_trim`` before both), so the
    figure is the session's own memory: weights as ORT holds them (a table that
    ORT constant-folds back to fp32 shows here, not in the file size), prepacked
    kernels, arena for one batch of ``batch`` rows.

    Raises:
        ValidationError: the subprocess fails (the message carries its stderr).
    """
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(int(batch))],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ValidationError(f"measuring the session memory of {path} failed: {proc.stderr.strip()[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(data["after"] - data["before"])


__all__ = ["VARIANT_KINDS", "QuantizeConfig", "EmbeddingTable", "quantize", "quantize_file", "save_model",
           "predict", "session_rss_bytes", "find_embedding_tables", "embedding_report",
           "pack_int4", "unpack_int4", "quantize_rows_int8", "quantize_rows_int4",
           "dequantize_rows_int8", "dequantize_rows_int4", "METADATA_QUANTIZATION"]
