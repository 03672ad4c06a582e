"""Sparse gathered tables: only the non-zero rows, found through a rank index (exact).

A pruned CTR model's lookup tables are mostly zeros: the wide part's weights
after magnitude pruning (90% zeros), its hashed crosses that no training row
set (L2 leaves them at 0), the item -> attribute table of items never seen as a
candidate.  Stored densely, a zero costs as much as a weight.
:func:`compact_sparse_tables` stores such a table ``T [n, ...]`` as its non-zero
rows plus a rank index (:class:`RankIndex`, about 0.27 bytes per row) and
rewrites each ``Gather(T, ids)`` into standard opset-10 ops (no bitwise ops,
no contrib ops)::

    byte    = bits[ids / 8]                         one bit per row: non-zero?
    p       = 2 ** (ids mod 8)
    present = (byte / p) mod 2
    rank    = base[ids / 256] + within[ids / 8] + popcount[byte mod p]
    out     = values[present ? rank : kept]          values[kept] is a zero row

``base`` counts the non-zero rows before each block of 256 rows (int32),
``within`` those before each byte inside its block (uint8, at most 248) and
``popcount`` is a 256-entry table.  For every index in ``[0, n)`` the output is
bit-identical to the dense Gather (tests check every index through ONNX
Runtime).  Indices outside ``[0, n)`` are the caller's to refuse, as they are
for the dense table (the server checks every id against its feature's
buckets); negative indices, which Gather counts from the end, are not
supported.  The price is about a dozen element-wise ops per Gather on the
gathered ids, measured by ``ctredge bench``'s latency columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: rows per ``base`` entry of a rank index (``within`` counts up to 248 in uint8)
RANK_BLOCK = 256
#: tables with fewer rows are left dense
MIN_ROWS = 4096
#: a table is rewritten only when it saves at least this fraction of its bytes
MIN_SAVING = 0.2

#: a remap's other entries may change value this many times at most (one run per feature; compared per id)
MAX_REMAP_RUNS = 256

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_POW2 = (2 ** np.arange(8)).astype(np.int64)


@dataclass(frozen=True)
class RankIndex:
    """Which of ``n`` rows are kept, and the rank of each kept row among them.

    ``bits`` uint8 ``[ceil(n / 8)]`` (bit ``i mod 8`` of byte ``i / 8`` = row ``i`` kept),
    ``within`` uint8 (kept rows before each byte, inside its block of :data:`RANK_BLOCK`
    rows), ``base`` int32 (kept rows before each block), ``n`` rows, ``kept`` kept rows.
    """

    bits: np.ndarray
    within: np.ndarray
    base: np.ndarray
    n: int
    kept: int

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "RankIndex":
        """The index of a boolean ``mask [n]`` (True = the row is stored)."""
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        n = mask.size
        padded = np.zeros(-(-n // RANK_BLOCK) * RANK_BLOCK, dtype=bool)
        padded[:n] = mask
        bits = np.packbits(padded.reshape(-1, 8), axis=1, bitorder="little").reshape(-1)
        per_byte = _POPCOUNT[bits].astype(np.int64).reshape(-1, RANK_BLOCK // 8)
        within = (np.cumsum(per_byte, axis=1) - per_byte).astype(np.uint8).reshape(-1)
        blocks = per_byte.sum(axis=1)
        base = (np.cumsum(blocks) - blocks).astype(np.int32)
        nbytes = -(-n // 8)
        return cls(bits[:nbytes], within[:nbytes], base, n, int(mask.sum()))

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes + self.within.nbytes + self.base.nbytes)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Where each id's row lies among the stored rows, or ``kept`` (the zero row) when it is not stored.

        The numpy reference of the graph's computation; ids must lie in ``[0, n)``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        byte = self.bits[ids // 8].astype(np.int64)
        p = _POW2[ids % 8]
        present = (byte // p) % 2
        rank = self.base[ids // RANK_BLOCK].astype(np.int64) + self.within[ids // 8] + _POPCOUNT[byte % p]
        return np.where(present == 1, rank, self.kept)


def compact(table: np.ndarray) -> tuple[RankIndex, np.ndarray]:
    """``(index, values)`` of a table ``[n, ...]``: its rows with any non-zero entry, then one zero row.

    ``values[index.rows(ids)]`` equals ``table[ids]`` bit for bit (a ``-0.0`` counts as non-zero, so it is kept).
    """
    table = np.asarray(table)
    flat = table.reshape(table.shape[0], -1)
    if np.issubdtype(table.dtype, np.floating):
        mask = (flat.view(np.dtype(f"u{table.dtype.itemsize}")) != 0).any(axis=1)
    else:
        mask = (flat != 0).any(axis=1)
    index = RankIndex.from_mask(mask)
    values = np.concatenate([table[mask], np.zeros((1, *table.shape[1:]), table.dtype)])
    return index, values


def compact_remap(table: np.ndarray) -> tuple[RankIndex, np.ndarray, np.ndarray] | None:
    """``(index, starts, defaults)`` of a vocabulary remap, or None when ``table`` is not one.

    A remap (:func:`ctredge.vocab.vocab_remap`) sends each kept bucket to its rank
    among the kept buckets and every other bucket to the new row of its feature's
    row 0, a value that is the same for a whole feature.  So nothing but the kept
    mask and one default per run needs storing: the kept buckets are the first
    occurrences of each value; the table is a remap when their values are
    ``0, 1, 2, ...`` in order and the other entries' values change only at a few
    ``starts`` (the default of an entry is ``defaults[#(starts <= id) - 1]``).
    Takes an integer table ``[n]``.
    """
    table = np.asarray(table)
    if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer) or not table.size:
        return None
    _, first = np.unique(table, return_index=True)
    mask = np.zeros(table.size, dtype=bool)
    mask[first] = True
    if not np.array_equal(table[mask], np.arange(mask.sum())):
        return None
    rest = np.flatnonzero(~mask)
    if not rest.size:
        return RankIndex.from_mask(mask), np.zeros(1, np.int64), np.zeros(1, table.dtype)
    change = np.concatenate([[True], table[rest[1:]] != table[rest[:-1]]])
    if change.sum() > MAX_REMAP_RUNS:
        return None
    return RankIndex.from_mask(mask), rest[change].astype(np.int64), table[rest[change]]


def compact_sparse_tables(proto: Any, min_rows: int = MIN_ROWS, min_saving: float = MIN_SAVING) -> list[dict[str, Any]]:
    """Store every mostly-zero gathered table, and every vocabulary remap, compactly (in place, exact).

    Takes an ``onnx.ModelProto``.  A table is an initializer of any type and of
    at least ``min_rows`` rows, read only as the data of ``Gather(axis=0)``
    nodes.  A remap (:func:`compact_remap`) becomes its rank index and a few
    defaults; any other table its non-zero rows and a rank index
    (:func:`compact`); either only when it saves at least ``min_saving`` of the
    table's bytes.  Returns one record per rewritten table (name, encoding,
    rows, kept rows, bytes before and after).
    """
    import onnx
    from onnx import numpy_helper

    from ctredge.compress.graph import FreshNames, _axis, _replace_gathers

    g = proto.graph
    uses: dict[str, list[Any]] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, k))
    outputs = {o.name for o in g.output}
    writer = _Writer(FreshNames(proto))
    done: list[dict[str, Any]] = []
    drop: set[str] = set()
    for init in list(g.initializer):
        users = uses.get(init.name, [])
        if (init.name in outputs or not init.dims or init.dims[0] < min_rows or not users
                or any(n.op_type != "Gather" or k != 0 or _axis(n) != 0 or n.domain not in ("", "ai.onnx")
                       for n, k in users)):
            continue
        table = numpy_helper.to_array(init)
        remap = compact_remap(table)
        if remap is not None:
            index, starts, defaults = remap
            encoding, after = "remap", index.nbytes + starts.nbytes + defaults.astype(np.int64).nbytes
        else:
            index, values = compact(table)
            encoding, after = "rows", index.nbytes + values.nbytes
        if after > (1 - min_saving) * table.nbytes:
            continue
        extra = {"starts": starts.astype(np.int64), "defaults": defaults.astype(np.int64)} if remap is not None \
            else {"values": values, "zero_row": np.array(index.kept, np.int64)}
        names = writer.add_table(init.name, index, extra)
        for node, _ in users:
            if remap is not None:
                writer.remap_gather(node, names, table.dtype)
            else:
                writer.rows_gather(node, names)
        drop.add(init.name)
        done.append({"name": init.name, "encoding": encoding, "rows": int(table.shape[0]), "kept_rows": index.kept,
                     "dtype": str(table.dtype), "bytes_before": int(table.nbytes), "bytes_after": int(after),
                     "gathers": len(users)})
    if not done:
        return done
    _replace_gathers(proto, drop, writer.inits, writer.replace)
    onnx.checker.check_model(proto)
    return done


class _Writer:
    """The initializers and nodes that replace the Gathers of compacted tables."""

    def __init__(self, fresh: Any) -> None:
        self.fresh = fresh
        self.inits: list[Any] = []
        self.replace: dict[str, list[Any]] = {}
        self.shared: dict[str, str] = {}

    def tensor(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.fresh(base)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, key: str, value: np.ndarray) -> str:
        if key not in self.shared:
            self.shared[key] = self.tensor(f"ctredge_sparse_{key}", value)
        return self.shared[key]

    def add_table(self, table: str, index: RankIndex, extra: dict[str, np.ndarray]) -> dict[str, str]:
        """The initializers of one compacted table (its rank index and ``extra``); returns their names by key."""
        base = table.replace(":", "_").replace("/", "_") + "_sparse"
        arrays = {"bits": index.bits, "within": index.within, "base": index.base, **extra}
        return {key: self.tensor(f"{base}_{key}", value) for key, value in arrays.items()}

    def _rank(self, node: Any, t: dict[str, str]) -> tuple[list[Any], Any, str, str, str]:
        """Nodes computing whether each of the node's ids is stored, and its rank.

        Returns ``(nodes, add, ids as int64, stored, rank)``; ``add(op, inputs, **attrs)`` appends one more node to
        ``nodes`` and returns its output's name.
        """
        from onnx import TensorProto, helper

        p = self.fresh(f"{node.name or node.output[0]}/sparse")
        nodes: list[Any] = []

        def add(op: str, ins: list[str], **attrs: Any) -> str:
            out = self.fresh(f"{p}/{op.lower()}_out")
            nodes.append(helper.make_node(op, ins, [out], name=self.fresh(f"{p}/{op.lower()}"), **attrs))
            return out

        c8, c2, c1 = (self.const(k, np.array(v, np.int64)) for k, v in (("eight", 8), ("two", 2), ("one", 1)))
        block = self.const("block", np.array(RANK_BLOCK, np.int64))
        i64 = TensorProto.INT64
        ids = add("Cast", [node.input[1]], to=i64)
        k, b, blk = add("Div", [ids, c8]), add("Mod", [ids, c8]), add("Div", [ids, block])
        byte = add("Cast", [add("Gather", [t["bits"], k], axis=0)], to=i64)
        pw = add("Gather", [self.const("pow2", _POW2), b], axis=0)
        stored = add("Equal", [add("Mod", [add("Div", [byte, pw]), c2]), c1])
        pop = add("Cast", [add("Gather", [self.const("popcount", _POPCOUNT), add("Mod", [byte, pw])], axis=0)], to=i64)
        first = add("Cast", [add("Gather", [t["base"], blk], axis=0)], to=i64)
        inside = add("Cast", [add("Gather", [t["within"], k], axis=0)], to=i64)
        rank = add("Add", [add("Add", [first, inside]), pop])
        return nodes, add, ids, stored, rank

    def rows_gather(self, node: Any, t: dict[str, str]) -> None:
        """``Gather(T, ids)`` -> ``Gather(values, stored ? rank : kept)``."""
        from onnx import helper

        nodes, add, _, stored, rank = self._rank(node, t)
        row = add("Where", [stored, rank, t["zero_row"]])
        nodes.append(helper.make_node("Gather", [t["values"], row], [node.output[0]],
                                      name=self.fresh(f"{t['values']}/gather"), axis=0))
        self.replace[node.output[0]] = nodes

    def remap_gather(self, node: Any, t: dict[str, str], dtype: np.dtype) -> None:
        """``Gather(remap, ids)`` -> ``stored ? rank : defaults[#(starts <= ids) - 1]`` in the table's type."""
        from onnx import TensorProto, helper

        nodes, add, ids, stored, rank = self._rank(node, t)
        last = self.const("last_axis", np.array([-1], np.int64))
        above = add("Cast", [add("GreaterOrEqual", [add("Unsqueeze", [ids, last]), t["starts"]])], to=TensorProto.INT64)
        run = add("Sub", [add("ReduceSum", [above, last], keepdims=0), self.const("one", np.array(1, np.int64))])
        value = add("Where", [stored, rank, add("Gather", [t["defaults"], run], axis=0)])
        nodes.append(helper.make_node("Cast", [value], [node.output[0]], name=self.fresh(f"{t['defaults']}/cast"),
                                      to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype))))
        self.replace[node.output[0]] = nodes


__all__ = ["RankIndex", "compact", "compact_remap", "compact_sparse_tables", "RANK_BLOCK", "MIN_ROWS", "MIN_SAVING"]
