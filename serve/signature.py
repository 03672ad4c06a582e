"""What a model accepts, and how request tensors become ONNX Runtime feeds.

Two kinds of model are served:

* **ctredge models** (ONNX metadata ``ctredge.feature_spec``): :class:`CtrSignature`
  accepts the FeatureSpec contract and a few equivalent forms, checks them, hashes
  raw values with the hub's function, broadcasts the user side of a ranking
  request, checks id ranges, and assembles the contract tensors.
* **any other ONNX file**: :class:`PlainSignature` serves the graph's own input
  and output names and types (plain ONNX Runtime semantics); only names, dtypes,
  ranks and fixed dimensions are checked.

Inputs a ctredge model accepts (``B`` rows; ``n_*`` column counts of the spec)
-----------------------------------------------------------------------------

==================  =======  ==============  =======================================
input               dtype    shape           meaning
==================  =======  ==============  =======================================
``dense``           FP32     [B, n_dense]    the contract tensor, NaN = missing
``cat``             INT64    [B, n_cat]      bucket ids, ``0 <= id < buckets``
``cat_raw``         BYTES    [B, n_cat]      raw values (empty = missing), hashed by
                                             the server with ``spec.hash_cat``
``hist``            INT64    [B|1, L]        behaviour sequence (0 = padding)
``hist_raw``        BYTES    [B|1, 1]        comma-separated raw item ids, oldest
                                             first (``[B]`` is accepted too), hashed
                                             with ``spec.hash_history``
``dense_<side>``    FP32     [B|1, n_side]   the ``side`` columns of ``dense``
``cat_<side>``      INT64    [B|1, n_side]   the ``side`` columns of ``cat``
``cat_raw_<side>``  BYTES    [B|1, n_side]   the ``side`` columns of ``cat_raw``
``<t>_emb``         FP32     [B|1, dim]      a request text feature ``t`` (``query``) as
                                             its sentence embedding; zeros = no text
``<t>``             BYTES    [B|1, 1]        the raw string (``[B|1]`` too), encoded by
                                             the server's text encoder (only when the
                                             model's config names one: ``text_encoder``)
==================  =======  ==============  =======================================

A text feature is optional: sent neither way, it is "no text" (zeros, as the
model learned for rows without a query).  The raw form is checked before any
work: at most ``limits.max_query_strings`` strings, each at most
``limits.max_query_bytes`` bytes of UTF-8; an empty string is "no text"; each is
cut to ``limits.max_query_tokens`` tokens.  Distinct strings are encoded once,
so a ranking request's one query costs one encoder run whatever ``B``.

``<side>`` is ``user``, ``item`` or ``context`` (only sides that have columns of
that kind exist); a side's columns are in the spec's order,
``spec.columns(kind, side)``.  Per kind, send *either* the full tensor *or* one
tensor per side (each side as ids or raw values), never both.

Ranking requests.  ``B`` is the largest batch among the inputs.  Item-side
inputs and the full ``dense``/``cat``/``cat_raw`` carry ``B`` rows; user- and
context-side inputs (``dense_user``, ``cat_raw_user``, ``cat_context``...) and
the history (on the user side) may carry 1 row, which is broadcast to all
``B`` rows: one user, ``B`` candidate items, the user's features and history
sent once.  The answer equals the same rows sent expanded.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ctredge.features import (
    INPUT_CAT, INPUT_CAT_RAW, INPUT_DENSE, INPUT_HIST, OUTPUT_CTR, SIDES, FeatureSpec, hash_values,
)
from ctredge.serve.codec import datatype_of, ort_datatype, shown
from ctredge.serve.errors import InvalidInput, LoadError
from ctredge.serving_config import RequestLimits

INPUT_HIST_RAW = "hist_raw"
KIND_DTYPE = {"dense": "FP32", "cat": "INT64", "cat_raw": "BYTES"}


@dataclass(frozen=True)
class TensorInfo:
    """One input or output as the protocol shows it: shape with -1 for any size.

    ``optional``: an alternative form (raw values, per-side tensors) that a
    request may send instead of a contract tensor.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_tensor(info: TensorInfo, arr: np.ndarray, *, alt_shapes: Sequence[tuple[int, ...]] = ()) -> None:
    """Raise :class:`InvalidInput` unless ``arr`` has ``info``'s datatype, rank and fixed dims."""
    got = datatype_of(arr)
    if got != info.datatype:
        raise InvalidInput(f"input {info.name!r}: got datatype {got}, expected {info.datatype}")
    for shape in (info.shape, *alt_shapes):
        if len(shape) == arr.ndim and all(w < 0 or w == g for w, g in zip(shape, arr.shape)):
            return
    expected = " or ".join(_fmt(s) for s in (info.shape, *alt_shapes))
    raise InvalidInput(f"input {info.name!r}: got unexpected shape {_fmt(arr.shape)}, expected {expected}")


def _check_names(tensors: Mapping[str, Any], accepted: Sequence[str]) -> None:
    unknown = [n for n in tensors if n not in accepted]
    if unknown:
        raise InvalidInput(f"unknown input(s) {[shown(n) for n in unknown[:8]]}; this model accepts {list(accepted)}")


class _Header:
    """``check_header``: the checks of a request tensor that need only its name, datatype and shape."""

    _by_name: dict[str, TensorInfo]
    _alt_ranks: dict[str, tuple[int, ...]] = {}

    def check_header(self, name: str, datatype: str, shape: Sequence[int]) -> None:
        """Raise :class:`InvalidInput` unless ``name`` is an input of this model with this datatype and rank.

        Runs before the tensor is decoded, so an unknown or misshapen input costs nothing.
        """
        info = self._by_name.get(name)
        if info is None:
            raise InvalidInput(f"unknown input(s) [{shown(name)}]; this model accepts {list(self._by_name)}")
        if datatype != info.datatype:
            got = datatype if len(datatype) <= 16 and datatype.isalnum() else shown(datatype)
            raise InvalidInput(f"input {name!r}: got datatype {got}, expected {info.datatype}")
        ranks = (len(info.shape),) + self._alt_ranks.get(name, ())
        if len(shape) not in ranks:
            dims = _fmt(shape) if len(shape) <= 8 else f"of {len(shape)} dimensions"
            raise InvalidInput(f"input {name!r}: got unexpected shape {dims}, expected {_fmt(info.shape)}")


# =========================================================================== plain ONNX models
class PlainSignature(_Header):
    """A model without ctredge metadata: its own inputs and outputs.

    ``batched`` is true when every input and output has a dynamic first
    dimension; then that dimension is the batch and ``max_batch_size`` caps it.
    """

    def __init__(self, session: Any, max_batch_size: int, limits: RequestLimits | None = None):
        self.limits = limits or RequestLimits()
        try:
            self.inputs = [TensorInfo(i.name, ort_datatype(i.type), _dims(i.shape)) for i in session.get_inputs()]
            self.outputs = [TensorInfo(o.name, ort_datatype(o.type), _dims(o.shape)) for o in session.get_outputs()]
        except InvalidInput as exc:
            raise LoadError(str(exc)) from exc
        self.max_batch_size = max_batch_size
        self.batched = all(t.shape and t.shape[0] < 0 for t in self.inputs + self.outputs)
        self.spec = None
        self._by_name = {t.name: t for t in self.inputs}

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def value_limit(self, name: str) -> int:
        """The longest BYTES element input ``name`` may carry."""
        return self.limits.max_bytes_payload

    def check_outputs(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Plain ONNX semantics: outputs are returned as the graph computes them."""

    def prepare(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, dtypes and shapes; returns the feeds (BYTES as ``str`` objects).

        Raises:
            InvalidInput: an unknown or missing input, a wrong dtype or shape, or
                more rows than ``max_batch_size``.
        """
        _check_names(tensors, list(self._by_name))
        missing = [n for n in self._by_name if n not in tensors]
        if missing:
            raise InvalidInput(f"missing input(s) {missing}; this model needs {list(self._by_name)}")
        feeds = {}
        for name, arr in tensors.items():
            info = self._by_name[name]
            check_tensor(info, arr)
            if self.batched and arr.shape[0] > self.max_batch_size:
                raise InvalidInput(f"input {name!r}: {arr.shape[0]} rows exceed max_batch_size "
                                   f"{self.max_batch_size}")
            if info.datatype == "BYTES":
                arr = _to_str(name, arr)
            feeds[name] = arr
        return feeds

    def warmup_feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Seeded small inputs of the declared shapes (dynamic dims = 1)."""
        from ctredge.serve.codec import DATATYPES

        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape = tuple(1 if d < 0 else d for d in t.shape)
            if t.datatype == "BYTES":
                feeds[t.name] = np.full(shape, "", dtype=object)
            elif t.datatype == "BOOL":
                feeds[t.name] = np.zeros(shape, dtype=bool)
            else:
                feeds[t.name] = (rng.random(shape) * 2).astype(DATATYPES[t.datatype])
        return feeds


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _to_str(name: str, arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape, dtype=object)
    try:
        out.reshape(-1)[:] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.reshape(-1)]
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input {name!r}: string tensors must be UTF-8: {exc}") from exc
    return out


# =========================================================================== ctredge models
class CtrSignature(_Header):
    """A ctredge model: the FeatureSpec contract plus raw, per-side and ranking forms (module doc)."""

    _alt_ranks = {INPUT_HIST_RAW: (1,)}

    def __init__(self, spec: FeatureSpec, max_batch_size: int, limits: RequestLimits | None = None,
                 encoder: Any = None):
        self.spec = spec
        self.encoder = encoder  # ctredge.textenc.SentenceEncoder for the raw text inputs, or None
        self.max_batch_size = max_batch_size
        self.batched = True
        self.limits = limits or RequestLimits()
        self.memo = HashMemo(self.limits.hash_memo_bytes, self.limits.max_raw_value_bytes)
        hist_side = spec.history.side if spec.history is not None else "user"
        inputs: list[TensorInfo] = []
        self._side_of: dict[str, str | None] = {}  # input -> side (None: full, mixed sides)
        self._kind_of: dict[str, str] = {}
        if spec.n_dense:
            self._add(inputs, TensorInfo(INPUT_DENSE, "FP32", (-1, spec.n_dense)), "dense", None)
        if spec.n_cat:
            self._add(inputs, TensorInfo(INPUT_CAT, "INT64", (-1, spec.n_cat)), "cat", None)
        if spec.history is not None:
            self._add(inputs, TensorInfo(INPUT_HIST, "INT64", (-1, spec.hist_len)), "hist", hist_side)
        if spec.n_cat:
            self._add(inputs, TensorInfo(INPUT_CAT_RAW, "BYTES", (-1, spec.n_cat), True), "cat", None)
        if spec.history is not None:
            self._add(inputs, TensorInfo(INPUT_HIST_RAW, "BYTES", (-1, 1), True), "hist", hist_side)
        self._columns: dict[str, list[int]] = {}
        for kind, n in (("dense", spec.n_dense), ("cat", spec.n_cat)):
            for side in SIDES:
                cols = spec.columns(kind, side) if n else []
                if not cols:
                    continue
                forms = [kind] + (["cat_raw"] if kind == "cat" else [])
                for form in forms:
                    name = f"{form}_{side}"
                    self._add(inputs, TensorInfo(name, KIND_DTYPE[form], (-1, len(cols)), True), kind, side)
                    self._columns[name] = cols
        self._text: dict[str, Any] = {}  # input name -> its TextFeature
        for t in spec.request_text:
            self._add(inputs, TensorInfo(t.input_name, "FP32", (-1, t.dim), True), "text:" + t.name, t.side)
            self._text[t.input_name] = t
            if encoder is not None:
                if encoder.dim != t.dim:
                    raise LoadError(f"text feature {t.name!r} takes {t.dim}-d embeddings, but the text encoder "
                                    f"{encoder.folder} gives {encoder.dim}-d ones")
                self._add(inputs, TensorInfo(t.name, "BYTES", (-1, 1), True), "text:" + t.name, t.side)
                self._text[t.name] = t
                self._alt_ranks = {**self._alt_ranks, t.name: (1,)}
        self.inputs = inputs
        self.outputs = [TensorInfo(OUTPUT_CTR, "FP32", (-1, 1))]
        self._by_name = {t.name: t for t in inputs}
        self._buckets = spec.buckets
        # per kind: the sides that have columns, and the per-side input names (fixed by the spec)
        self._sides = {kind: [s for s in SIDES if n and spec.columns(kind, s)]
                       for kind, n in (("dense", spec.n_dense), ("cat", spec.n_cat))}
        self._per_side = {kind: {s: [f"{f}_{s}" for f in ([kind] + (["cat_raw"] if kind == "cat" else []))]
                                 for s in sides} for kind, sides in self._sides.items()}
        self._kinds = [k for k, n in (("dense", spec.n_dense), ("cat", spec.n_cat)) if n] + \
            (["hist"] if spec.history is not None else [])
        if spec.history is not None:
            self._hist_buckets = int(spec.cat[spec.item_feature_index].buckets)  # type: ignore[index]

    def _add(self, inputs: list[TensorInfo], info: TensorInfo, kind: str, side: str | None) -> None:
        inputs.append(info)
        self._side_of[info.name] = side
        self._kind_of[info.name] = kind

    @property
    def output_names(self) -> list[str]:
        return [OUTPUT_CTR]

    def value_limit(self, name: str) -> int:
        """The longest BYTES element input ``name`` may carry: a raw history, a query, or one raw value."""
        if name in self._text:
            return self.limits.max_query_bytes
        return self.limits.max_history_bytes if name == INPUT_HIST_RAW else self.limits.max_raw_value_bytes

    def check_header(self, name: str, datatype: str, shape: Sequence[int]) -> None:
        """:meth:`_Header.check_header`, and a raw text input's string count against ``limits.max_query_strings``."""
        super().check_header(name, datatype, shape)
        t = self._text.get(name)
        if t is not None and datatype == "BYTES":
            count = int(np.prod([max(int(d), 0) for d in shape])) if len(shape) else 1
            if count > self.limits.max_query_strings:
                raise InvalidInput(f"input {name!r}: {count} strings, expected at most "
                                   f"{self.limits.max_query_strings} (limits.max_query_strings); a ranking request "
                                   f"sends its one query as [1, 1]")

    def encodes_text(self, names: Sequence[str]) -> bool:
        """Whether inputs ``names`` include a raw text the encoder runs on (the servicer prepares it off the loop)."""
        return any(n in self._text and self._by_name[n].datatype == "BYTES" for n in names)

    def check_outputs(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Refuse an answer that is not a probability (NaN/Inf): no OK answer carries a NaN.

        Finite inputs can still overflow a variant's arithmetic (fp16 holds
        |x| <= 65504), so the message names the row and its largest dense value.

        Raises:
            InvalidInput: naming the first such row.
        """
        ctr = outputs.get(OUTPUT_CTR)
        if ctr is None:
            return
        bad = ~np.isfinite(ctr.reshape(ctr.shape[0], -1)).all(axis=1)
        if not bad.any():
            return
        r = int(np.argmax(bad))
        hint = ""
        dense = feeds.get(INPUT_DENSE)
        if dense is not None and dense.shape[1]:
            row = np.nan_to_num(np.abs(dense[r]), nan=0.0)
            j = int(np.argmax(row))
            hint = (f"; its largest dense value is feature {self.spec.dense[j].name!r} = {float(dense[r, j]):g}, "
                    f"beyond what this model's arithmetic holds")
        raise InvalidInput(f"row {r}: the model's answer is not finite ({int(bad.sum())} row(s) in all){hint}")

    # ------------------------------------------------------------------ checks
    def _forms(self, tensors: Mapping[str, np.ndarray], kind: str) -> list[str]:
        """The inputs that carry ``kind``, checked for completeness and conflicts."""
        given = [n for n in tensors if self._kind_of[n] == kind]
        if kind == "hist":
            if len(given) > 1:
                raise InvalidInput("send the history once, as 'hist' or 'hist_raw', got both")
            if not given:
                raise InvalidInput(f"missing input: the behaviour history, as 'hist' (INT64 [-1, "
                                   f"{self.spec.hist_len}]) or 'hist_raw' (BYTES [-1, 1])")
            return given
        full = [n for n in given if self._side_of[n] is None]
        split = [n for n in given if self._side_of[n] is not None]
        if full and not split and len(full) == 1:
            return full
        full_names = [kind] + (["cat_raw"] if kind == "cat" else [])
        sides = self._sides[kind]
        per_side = self._per_side[kind]
        if full and split:
            raise InvalidInput(f"send the {kind} features either whole ({' or '.join(map(repr, full))}) or per "
                               f"side ({', '.join(map(repr, split))}), not both")
        if len(full) > 1:
            raise InvalidInput("send either 'cat' or 'cat_raw', got both")
        if full:
            return full
        if not split:
            alternatives = " or ".join(repr(n) for n in full_names)
            side_forms = " + ".join("/".join(repr(f) for f in per_side[s]) for s in sides)
            raise InvalidInput(f"missing input: the {kind} features, as {alternatives} "
                               f"({KIND_DTYPE[kind]} [-1, {self._n(kind)}]), or per side {side_forms}")
        for s in sides:
            got = [n for n in split if n in per_side[s]]
            if not got:
                raise InvalidInput(f"missing input for the {s}-side {kind} features: send "
                                   f"{' or '.join(map(repr, per_side[s]))} (columns "
                                   f"{[self._feature(kind, j) for j in self.spec.columns(kind, s)]})")
            if len(got) > 1:
                raise InvalidInput(f"send the {s}-side {kind} features once, got {got}")
        return split

    def _n(self, kind: str) -> int:
        return self.spec.n_dense if kind == "dense" else self.spec.n_cat

    def _feature(self, kind: str, j: int) -> str:
        return (self.spec.dense if kind == "dense" else self.spec.cat)[j].name

    def _broadcastable(self, name: str) -> bool:
        side = self._side_of[name]
        return side is not None and side != "item"

    # ------------------------------------------------------------------ prepare
    def prepare(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check and assemble the contract feeds ``dense``/``cat``/``hist`` of ``B`` rows.

        Raises:
            InvalidInput: unknown, missing or conflicting inputs; a wrong dtype or
                shape; batch sizes that are neither ``B`` nor a broadcastable 1; no
                rows, or more than ``max_batch_size``; an id outside its feature's
                ``[0, buckets)``; malformed raw values.
        """
        _check_names(tensors, list(self._by_name))
        for name, arr in tensors.items():
            raw_text = name in self._text and self._by_name[name].datatype == "BYTES"
            alt = ((-1,),) if name == INPUT_HIST_RAW or raw_text else ()
            check_tensor(self._by_name[name], arr, alt_shapes=alt)
        kinds = self._kinds
        used = {k: self._forms(tensors, k) for k in kinds}
        texts = {t.name: self._text_form(tensors, t) for t in self.spec.request_text}
        rows = {n: int(tensors[n].shape[0]) for names in used.values() for n in names}
        rows.update({n: int(tensors[n].shape[0]) for n in texts.values() if n is not None})
        batch = max(rows.values())
        bad = {n: r for n, r in rows.items() if r != batch and not (r == 1 and self._broadcastable(n))}
        if bad:
            may = [n for n in rows if self._broadcastable(n)]
            raise InvalidInput(
                f"mismatched batch sizes: {rows}; every input needs the same number of rows ({batch} here)"
                + (f", except the user- and context-side inputs {may}, which may have 1 row (sent once, "
                   f"broadcast to all rows)" if may else ""))
        if batch == 0:
            raise InvalidInput("the request has 0 rows; send at least 1")
        if batch > self.max_batch_size:
            raise InvalidInput(f"{batch} rows exceed max_batch_size {self.max_batch_size} of this model")
        feeds: dict[str, np.ndarray] = {}
        for kind in kinds:
            names = used[kind]
            if kind == "hist":
                feeds[INPUT_HIST] = _rows_to(self._hist(names[0], tensors[names[0]]), batch)
                continue
            n_cols = self._n(kind)
            if len(names) == 1 and self._side_of[names[0]] is None:
                feeds[kind] = self._block(names[0], tensors[names[0]], list(range(n_cols)))
                continue
            out = np.empty((batch, n_cols), dtype=np.float32 if kind == "dense" else np.int64)
            for name in names:
                cols = self._columns[name]
                out[:, cols] = self._block(name, tensors[name], cols)
            feeds[kind] = out
        for t in self.spec.request_text:
            name = texts[t.name]
            if name is None:
                feeds[t.input_name] = np.zeros((batch, t.dim), dtype=np.float32)
            else:
                feeds[t.input_name] = _rows_to(self._text_block(name, tensors[name], t), batch)
        return feeds

    def _text_form(self, tensors: Mapping[str, np.ndarray], t: Any) -> str | None:
        """The one input that carries text feature ``t`` (its embedding or its raw string), or None."""
        given = [n for n in tensors if self._kind_of[n] == "text:" + t.name]
        if len(given) > 1:
            raise InvalidInput(f"send the {t.name} once, as {t.input_name!r} (FP32 [-1, {t.dim}]) or {t.name!r} "
                               f"(BYTES [-1, 1]), got both")
        return given[0] if given else None

    def _text_block(self, name: str, arr: np.ndarray, t: Any) -> np.ndarray:
        """FP32 ``[rows, dim]`` of a text input: the embedding checked, or the raw strings encoded."""
        if self._by_name[name].datatype == "FP32":
            bad = ~np.isfinite(arr)
            if bad.any():
                r, k = (int(v) for v in np.argwhere(bad)[0])
                raise InvalidInput(f"input {name!r}: row {r}, column {k}: {float(arr[r, k])} is not a finite "
                                   f"number; send the encoder's embedding, or zeros for no {t.name}")
            return np.ascontiguousarray(arr)
        values = arr.reshape(-1).tolist()
        if len(values) > self.limits.max_query_strings:
            raise InvalidInput(f"input {name!r}: {len(values)} strings, expected at most "
                               f"{self.limits.max_query_strings} (limits.max_query_strings)")
        strings = []
        for i, v in enumerate(values):
            v = bytes(v)
            if len(v) > self.limits.max_query_bytes:
                raise InvalidInput(f"input {name!r}: row {i} has {len(v)} bytes, expected at most "
                                   f"{self.limits.max_query_bytes} (limits.max_query_bytes)")
            try:
                strings.append(v.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"input {name!r}: row {i} is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        if self.encoder is None:  # unreachable: the raw input exists only with an encoder
            raise InvalidInput(f"input {name!r}: this model has no text encoder; send {t.input_name!r}")
        return self.encoder.encode(strings)

    def _block(self, name: str, arr: np.ndarray, cols: list[int]) -> np.ndarray:
        """Columns ``cols`` of dense/cat as model dtypes: hashed if raw, range-checked if ids."""
        if self._by_name[name].datatype == "FP32":
            inf = np.isinf(arr)
            if inf.any():
                r, k = (int(v) for v in np.argwhere(inf)[0])
                raise InvalidInput(f"input {name!r}: row {r}, feature {self.spec.dense[cols[k]].name!r}: "
                                   f"{float(arr[r, k])} is not a number this model takes; send a finite value, "
                                   f"or NaN for missing")
            return np.ascontiguousarray(arr)
        if self._by_name[name].datatype == "BYTES":
            out = np.empty(arr.shape, dtype=np.int64)
            for k, j in enumerate(cols):
                out[:, k] = self.memo.ids(name, arr[:, k], self.spec.cat[j])
            return out
        buckets = self._buckets[cols]
        bad = (arr < 0) | (arr >= buckets[None, :])
        if bad.any():
            r, k = (int(v) for v in np.argwhere(bad)[0])
            feat = self.spec.cat[cols[k]]
            raise InvalidInput(f"input {name!r}: row {r}, column {k} (feature {feat.name!r}): id {int(arr[r, k])} "
                               f"is out of range, expected 0 <= id < {feat.buckets} "
                               f"({int(bad.sum())} id(s) out of range in all)")
        return np.ascontiguousarray(arr)

    def _hist(self, name: str, arr: np.ndarray) -> np.ndarray:
        if name == INPUT_HIST:
            bad = (arr < 0) | (arr >= self._hist_buckets)
            if bad.any():
                r, k = (int(v) for v in np.argwhere(bad)[0])
                raise InvalidInput(f"input 'hist': row {r}, position {k}: id {int(arr[r, k])} is out of range, "
                                   f"expected 0 <= id < {self._hist_buckets} (the buckets of item feature "
                                   f"{self.spec.history.item_feature!r})")  # type: ignore[union-attr]
            return np.ascontiguousarray(arr)
        lists = []
        cap, whole = self.limits.max_raw_value_bytes, self.limits.max_history_bytes
        for i, v in enumerate(arr.reshape(-1).tolist()):
            v = bytes(v)
            if len(v) > whole:
                raise InvalidInput(f"input 'hist_raw': row {i} has {len(v)} bytes, expected at most {whole} "
                                   f"(limits.max_history_bytes)")
            tokens = _last_tokens(v, self.spec.hist_len)
            if tokens and max(map(len, tokens)) > cap:
                raise InvalidInput(f"input 'hist_raw': row {i} has an item id longer than {cap} "
                                   f"bytes ({max(map(len, tokens))})")
            lists.append(tokens)
        return self._hist_ids(lists)

    def _hist_ids(self, lists: list[list[bytes]]) -> np.ndarray:
        """``spec.hash_history(lists)`` through the memo (same ids, same layout: oldest first, 0-padded)."""
        out = np.zeros((len(lists), self.spec.hist_len), dtype=np.int64)
        flat = [t for r in lists for t in r]
        if flat:
            feat = self.spec.cat[self.spec.item_feature_index]  # type: ignore[index]
            lengths = np.fromiter((len(r) for r in lists), dtype=np.int64, count=len(lists))
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            rows = np.repeat(np.arange(len(lists)), lengths)
            out[rows, np.arange(len(flat)) - np.repeat(starts, lengths)] = self.memo.ids("hist_raw", flat, feat)
        return out

    def warmup_feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        """One seeded row of valid contract inputs (NaN and id 0 included where drawn)."""
        rng = np.random.default_rng(seed)
        feeds: dict[str, np.ndarray] = {}
        if self.spec.n_dense:
            dense = rng.lognormal(1.0, 1.5, size=(1, self.spec.n_dense)).astype(np.float32)
            dense[rng.random(dense.shape) < 0.1] = np.nan
            feeds[INPUT_DENSE] = dense
        if self.spec.n_cat:
            feeds[INPUT_CAT] = (rng.random((1, self.spec.n_cat)) * self._buckets[None, :]).astype(np.int64)
        if self.spec.history is not None:
            feeds[INPUT_HIST] = rng.integers(0, self._hist_buckets, size=(1, self.spec.hist_len)).astype(np.int64)
        for t in self.spec.request_text:
            feeds[t.input_name] = (self.encoder.encode(["warm-up query"]) if self.encoder is not None
                                   else np.zeros((1, t.dim), dtype=np.float32))
        return feeds


def _rows_to(arr: np.ndarray, batch: int) -> np.ndarray:
    if arr.shape[0] == batch:
        return arr
    return np.ascontiguousarray(np.broadcast_to(arr, (batch,) + arr.shape[1:]))


class HashMemo:
    """Memoised :func:`ctredge.features.hash_values`: raw value -> bucket id, per feature, bounded in bytes.

    Raw categorical values repeat (users, devices, shops), and the hub's hash
    has a fixed cost per call whatever the batch, so hashing every value of a
    small request anew would dominate it.  Misses are hashed by the hub's
    function in one call per column, so ids are exactly training's.  The memo
    holds at most ``max_bytes`` (values plus a per-entry overhead) and forgets
    the least recently used values first, so clients sending ever new values
    cannot grow it.  Thread-safe (one lock).
    """

    ENTRY_OVERHEAD = 160  # bytes of dict/OrderedDict bookkeeping per entry, roughly

    def __init__(self, max_bytes: int = 16 << 20, max_value_bytes: int = 1024):
        self.max_bytes = max_bytes
        self.max_value_bytes = max_value_bytes
        self.table: collections.OrderedDict[tuple[str, bytes], int] = collections.OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def ids(self, name: str, col: np.ndarray | list[bytes], feat: Any) -> np.ndarray:
        """Bucket ids of BYTES values (one column of input ``name``) for categorical feature ``feat``.

        Raises :class:`InvalidInput` for a value over ``max_value_bytes``.
        """
        with self._lock:
            return self._ids(name, col, feat)

    def _ids(self, name: str, col: np.ndarray | list[bytes], feat: Any) -> np.ndarray:
        table, key = self.table, feat.name
        values = col.tolist() if isinstance(col, np.ndarray) else list(col)
        ids = []
        misses: dict[bytes, None] = {}
        for v in values:
            i = table.get((key, v), -1)
            if i >= 0:
                table.move_to_end((key, v))
            else:
                misses[v] = None
            ids.append(i)
        if misses:
            fresh_values = list(misses)
            longest = max(map(len, fresh_values))
            if longest > self.max_value_bytes:
                row = next(k for k, v in enumerate(values) if len(v) > self.max_value_bytes)
                raise InvalidInput(f"input {name!r}: row {row}, feature {feat.name!r}: raw value of "
                                   f"{len(values[row])} bytes, expected at most {self.max_value_bytes}")
            hashed = hash_values(_bytes_column(name, np.array(fresh_values, dtype=object), feat.name),
                                 feat.hash_name, feat.buckets).tolist()
            fresh = dict(zip(fresh_values, hashed))
            for v, h in fresh.items():
                table[(key, v)] = h
                self.bytes += len(v) + len(key) + self.ENTRY_OVERHEAD
            while self.bytes > self.max_bytes and table:
                (k, v), _ = table.popitem(last=False)
                self.bytes -= len(v) + len(k) + self.ENTRY_OVERHEAD
            ids = [i if i >= 0 else fresh[v] for v, i in zip(values, ids)]
        return np.array(ids, dtype=np.int64)


def _bytes_column(name: str, col: np.ndarray, feature: str) -> np.ndarray:
    """BYTES values as a numpy ``S`` array (trailing NULs do not change the hash).

    Raises :class:`InvalidInput` for values that cannot be read as bytes.
    """
    try:
        out = col.astype("S") if col.size else np.zeros(0, dtype="S1")
    except (UnicodeEncodeError, TypeError, ValueError) as exc:
        raise InvalidInput(f"input {name!r}: BYTES values could not be read: {type(exc).__name__}") from exc
    return out


def _last_tokens(value: bytes, count: int) -> list[bytes]:
    """The last ``count`` non-empty comma-separated tokens of ``value``, oldest first.

    Same tokens as ``[t for t in value.split(b",") if t][-count:]`` (the reader's
    parse, then :meth:`FeatureSpec.hash_history`'s cut), without splitting all of
    a long value.
    """
    if len(value) <= 4096:  # the usual case: splitting it all is fastest
        return [t for t in value.split(b",") if t][-count:]
    out: list[bytes] = []
    end = len(value)
    while end > 0 and len(out) < count:
        i = value.rfind(b",", 0, end)
        if end - i > 1:
            out.append(value[i + 1:end])
        end = i
    out.reverse()
    return out


def check_session(session: Any, spec: FeatureSpec) -> None:
    """Raise :class:`LoadError` unless the ONNX session's inputs/outputs follow the spec."""
    want = spec.onnx_input_types()
    got = {i.name: (i.type, len(i.shape)) for i in session.get_inputs()}
    if got != want:
        raise LoadError(f"the graph's inputs do not follow its FeatureSpec: expected {want}, got {got}")
    outs = {o.name: o.type for o in session.get_outputs()}
    if outs.get(OUTPUT_CTR) != "tensor(float)":
        raise LoadError(f"the graph must have the FP32 output {OUTPUT_CTR!r}, got outputs {outs}")
