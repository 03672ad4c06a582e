"""Writing ONNX models ctredge builds: IR version, protobuf's 2 GB limit, external data.

onnx 1.23 stamps IR version 14 on models it builds, which ONNX Runtime 1.31
refuses, so every rewritten graph gets the lowest IR version its opsets allow
(:func:`set_ir_version`).  A model past protobuf's 2 GB limit is written with its
tensors in ``<file>.data`` beside it (:func:`save_model`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PROTOBUF_LIMIT = 2 * 1024**3
#: ONNX Runtime 1.31 loads IR <= 13 but onnx 1.23 stamps 14; we write the lowest IR the opsets allow.
MIN_IR_VERSION = 8


def set_ir_version(model: Any) -> None:
    """Set ``model.ir_version`` to the lowest its opsets allow (at least :data:`MIN_IR_VERSION`)."""
    import onnx

    need = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(MIN_IR_VERSION, need)


def proto_bytes(model: Any) -> int:
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
    if proto_bytes(model) < PROTOBUF_LIMIT * 0.95:
        onnx.save_model(model, str(path))
        return [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


def shorten_names(model: Any) -> int:
    """Give every internal tensor a short name and every node ``<op>_<i>``, and drop ``value_info`` (in place).

    tf2onnx and the quantizers name tensors after their Keras paths
    (``ctredge_dcnv2_1/cross_2_1/MatMul_1/ReadVariableOp:0_quantized``): on a
    small model those names are a tenth of the file.  Graph inputs and outputs
    keep their names (they are the serving contract); the computation is
    unchanged (ONNX Runtime infers the shapes ``value_info`` held).  A graph
    with subgraphs (If, Loop, Scan) is left as it is.  Returns the bytes saved.
    """
    g = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in g.node for a in n.attribute):
        return 0
    before = model.ByteSize()
    keep = {v.name for v in g.input} | {v.name for v in g.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            new = _base36(len(names))
            while new in keep:
                new += "_"
            names[name] = new
        return names[name]

    for init in g.initializer:
        init.name = short(init.name)
    for i, node in enumerate(g.node):
        node.name = f"{node.op_type}_{i}"
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
    del g.value_info[:]
    return before - model.ByteSize()


def _base36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if not i:
            return "t" + out


__all__ = ["PROTOBUF_LIMIT", "MIN_IR_VERSION", "set_ir_version", "proto_bytes", "save_model", "shorten_names"]
