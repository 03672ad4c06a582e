"""Graph surgery on ONNX models: embedding tables, row-wise dequantizing gathers, node order.

Row-wise embedding quantization (``emb-*``, :func:`quantize_embeddings`) rewrites
every large float initializer ``E [rows, dim]`` whose only consumers are
``Gather(E, ids, axis=0)`` (the shared table of ``ctredge.train``, gathered once
for ``cat`` and once for ``hist``).  The graph gathers the *packed* rows and
their scales and dequantizes after the gather, so only the gathered rows are
ever float and the session holds the small table::

    int8:  Gather(Q8, ids) -> Cast(float) -> Mul(Gather(S, ids))
    int4:  Gather(P4, ids) -> BitShift(<<4, >>4) | BitShift(>>4) -> Concat
                           -> [Slice] -> Cast(float) -> Sub(8) -> Mul(Gather(S, ids))

Only standard ONNX ops of opset 11+ (no INT4 type, no BitwiseAnd, no contrib
``GatherBlockQuantized``), so any execution provider with those kernels runs
it.  The numbers are :mod:`ctredge.compress.rowwise`'s.  The rest are helpers
the fp16 conversion needs: the input-transform subgraph, a topological sort
(ORT's converter appends its Casts out of order) and dead-node pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ctredge.compress.qconfig import QuantizeConfig
from ctredge.compress.rowwise import (dequantize_rows_int4, dequantize_rows_int8, quantize_rows_int4,
                                      quantize_rows_int8)
from ctredge.errors import ConfigError, ValidationError

_ELEMENTWISE = frozenset({
    "Abs", "Add", "And", "Cast", "Ceil", "Clip", "Div", "Equal", "Exp", "Floor", "Greater", "GreaterOrEqual",
    "Identity", "IsInf", "IsNaN", "Less", "LessOrEqual", "Log", "Max", "Min", "Mul", "Neg", "Not", "Or", "Pow",
    "Reciprocal", "Round", "Sign", "Softplus", "Sqrt", "Sub", "Tanh", "Where",
})


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


def find_embedding_tables(model: Any, min_rows: int = 1) -> list[EmbeddingTable]:
    """Float initializers ``[rows, dim]`` (``rows >= min_rows``, ``dim >= 2``) read only by ``Gather(axis=0)``.

    Takes an ``onnx.ModelProto``.  Returns them largest first.
    """
    found = [EmbeddingTable(init.name, int(init.dims[0]), int(init.dims[1]), gathers)
             for init, gathers in _gathered_floats(model, 2) if int(init.dims[0]) >= min_rows and int(init.dims[1]) >= 2]
    return sorted(found, key=lambda t: -t.fp32_bytes)


def _gathered_floats(model: Any, rank: int) -> list[tuple[Any, tuple[str, ...]]]:
    """``(initializer, names of the Gathers reading it)`` of the float initializers of ``rank`` dimensions that are
    no graph output and are read only (and at least once) as the data of ``Gather(axis=0)`` nodes."""
    import onnx

    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in model.graph.output}
    found = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != rank or init.name in outputs:
            continue
        uses = consumers.get(init.name, [])
        if uses and all(n.op_type == "Gather" and i == 0 and _axis(n) == 0 and n.domain in ("", "ai.onnx")
                        for n, i in uses):
            found.append((init, tuple(n.name for n, _ in uses)))
    return found


def _replace_gathers(model: Any, old: set[str], new_inits: list[Any], replace: dict[str, list[Any]]) -> None:
    """Drop the initializers ``old``, add ``new_inits``, and put ``replace[output]`` in place of each Gather making
    ``output`` (in place, node order kept)."""
    g = model.graph
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


#: entries per scale of a quantized weight vector (:func:`quantize_vectors`)
VECTOR_BLOCK = 256


def find_weight_vectors(model: Any, min_rows: int = 1) -> list[EmbeddingTable]:
    """Float initializers ``[rows]`` (``rows >= min_rows``) read only by ``Gather(axis=0)``: one weight per id.

    The wide part's table (``WideLogit``: one logistic-regression weight per id,
    hashed pair and dense bucket) is one.  Takes an ``onnx.ModelProto``; returns
    them largest first, as :class:`EmbeddingTable` with ``dim`` 1.
    """
    found = [EmbeddingTable(init.name, int(init.dims[0]), 1, gathers)
             for init, gathers in _gathered_floats(model, 1) if int(init.dims[0]) >= min_rows]
    return sorted(found, key=lambda t: -t.fp32_bytes)


def quantize_vectors(model: Any, cfg: QuantizeConfig, block: int = VECTOR_BLOCK) -> tuple[Any, list[dict[str, Any]]]:
    """Rewrite every gathered weight vector (:func:`find_weight_vectors`) as int8 with one scale per ``block`` ids.

    ``Gather(w, ids)`` becomes ``Cast(Gather(q, ids)) * Gather(scales, ids / block)``
    (symmetric, ``scale = max|w| / 127`` over each block of ``block`` consecutive
    ids, or ``cfg.emb_scale``'s ``mse``).  In place; returns the model and a
    report per vector (an empty list when the model has none).
    """
    from onnx import TensorProto, helper, numpy_helper

    vectors = find_weight_vectors(model, cfg.emb_min_rows)
    if not vectors:
        return model, []
    g = model.graph
    fresh = FreshNames(model)
    inits = {i.name: i for i in g.initializer}
    block_name = fresh("ctredge_vector_block")
    new_inits: list[Any] = [numpy_helper.from_array(np.array(block, np.int64), block_name)]
    replace: dict[str, list[Any]] = {}
    report = []
    for v in vectors:
        w = numpy_helper.to_array(inits[v.name]).astype(np.float32)
        n_blocks = -(-v.rows // block)
        padded = np.zeros(n_blocks * block, np.float32)
        padded[:v.rows] = w
        q, scale = quantize_rows_int8(padded.reshape(n_blocks, block), cfg.emb_scale)
        q = q.reshape(-1)[:v.rows]
        err = np.abs(q.astype(np.float32) * np.repeat(scale, block)[:v.rows] - w)
        base = v.name.replace(":", "_").replace("/", "_")
        q_name, s_name = fresh(f"{base}_q8"), fresh(f"{base}_blockscale")
        new_inits += [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale.astype(np.float32), s_name)]
        for node in g.node:
            if node.op_type == "Gather" and node.input[0] == v.name:
                ids, out = node.input[1], node.output[0]
                prefix = fresh(f"{node.name or out}/blockq")
                blk, scales, rows, values = (fresh(f"{prefix}/{x}") for x in ("block", "scales", "rows", "float"))
                replace[out] = [
                    helper.make_node("Div", [ids, block_name], [blk], name=fresh(f"{prefix}/div")),
                    helper.make_node("Gather", [s_name, blk], [scales], name=fresh(f"{prefix}/gather_scales"), axis=0),
                    helper.make_node("Gather", [q_name, ids], [rows], name=fresh(f"{prefix}/gather_rows"), axis=0),
                    helper.make_node("Cast", [rows], [values], name=fresh(f"{prefix}/cast"), to=TensorProto.FLOAT),
                    helper.make_node("Mul", [values, scales], [out], name=fresh(f"{prefix}/dequantize"))]
        report.append({"table": v.name, "rows": v.rows, "dim": 1, "bits": 8, "block": block, "gathers": len(v.gathers),
                       "fp32_bytes": v.fp32_bytes, "quantized_bytes": int(q.nbytes + scale.nbytes),
                       "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean())})
    _replace_gathers(model, {v.name for v in vectors}, new_inits, replace)
    return model, report


def _axis(node: Any) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 0


class FreshNames:
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


def quantize_embeddings(model: Any, bits: int, cfg: QuantizeConfig) -> tuple[Any, list[dict[str, Any]]]:
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
    fresh = FreshNames(model)
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
    _replace_gathers(model, {t.name for t in tables}, new_inits, replace)
    return model, report


def _dequantizing_gather(node: Any, q_name: str, s_name: str, bits: int, consts: dict[str, Any],
                         fresh: FreshNames) -> list[Any]:
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


def input_transform_nodes(model: Any) -> set[int]:
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


def tensor_types(model: Any, names: list[str]) -> dict[str, int]:
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


def prune_dead_nodes(model: Any) -> None:
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


def topological_sort(model: Any) -> None:
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


__all__ = ["EmbeddingTable", "find_embedding_tables", "FreshNames", "quantize_embeddings", "input_transform_nodes",
           "tensor_types", "prune_dead_nodes", "topological_sort"]
