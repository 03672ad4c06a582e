"""The feature contract (``FeatureSpec``) and the one hashing function.

One :class:`FeatureSpec` names every tensor the Keras model, the ONNX graph, the
gRPC server and the readers exchange:

=========  =======  ===============  ==============================================
name       dtype    shape            meaning
=========  =======  ===============  ==============================================
``dense``  FP32     ``[B, n_dense]``  raw counts/values, NaN = missing; the transform
                                      (signed log1p, NaN fill) is inside the model
``cat``    INT64    ``[B, n_cat]``    per-feature bucket ids in ``[0, buckets_j)``,
                                      0 = empty; offsets into one shared embedding
                                      table are added inside the model
``hist``   INT64    ``[B, L]``        behaviour sequence, ids in the bucket space of
                                      the candidate-item feature, 0 = padding
``<t>_emb`` FP32    ``[B, dim]``      a request-side text feature ``t`` (the search
                                      query) as its sentence embedding, zeros = no
                                      text; the server makes it from the raw string
``ctr``    FP32     ``[B, 1]``        output: the click probability
=========  =======  ===============  ==============================================

Text features (:class:`TextFeature`, ``FeatureSpec.text``) are raw strings in
the click logs, one column each after every other column.  A ``table`` text
(the item title) is encoded at training time and kept inside the model as a
table keyed by the ids of its ``key`` categorical feature, so it is no model
input; a ``request`` text (the search query) is the model input ``<name>_emb``.

Each feature is tagged by side (``user``, ``item``, ``context``) so a ranking
request can carry the user side once for N candidate items.

Hashing (:func:`hash_values`) — *ctredge-fnv1a64-fmix-v1*, documented so any
language can reimplement it (test vectors: ``ctredge/hash_vectors.json``):

1. The raw value is a byte string: ``str`` is UTF-8 encoded; an integer is its
   decimal ASCII form (``123`` and ``"123"`` hash alike); ``bytes`` as given.
   Trailing NUL bytes are not significant.
2. The empty value maps to id 0 (reserved: missing / padding).
3. Otherwise ``h`` is 64-bit FNV-1a (offset basis ``0xcbf29ce484222325``, prime
   ``0x100000001b3``, arithmetic mod 2**64) over the bytes of
   ``feature_name + b"\\x1f" + value``; the feature name makes the same raw value
   land in different buckets for different features.
4. ``h`` is finalised with MurmurHash3's ``fmix64``:
   ``h ^= h >> 33; h *= 0xff51afd7ed558ccd; h ^= h >> 33;
   h *= 0xc4ceb93fe53cd34f; h ^= h >> 33``.
5. ``id = 1 + h mod (buckets - 1)``, so ids fall in ``[1, buckets)``.

The behaviour sequence hashes its raw item ids with the *item feature's* name and
bucket count, so a history entry and the same candidate item share one row.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ctredge.errors import SpecError

SIDES = ("user", "item", "context")
DENSE_TRANSFORMS = ("log1p", "identity")
HASH_ALGORITHM = "ctredge-fnv1a64-fmix-v1"
INPUT_DENSE = "dense"
INPUT_CAT = "cat"
INPUT_HIST = "hist"
INPUT_CAT_RAW = "cat_raw"
TEXT_SOURCES = ("table", "request")
TEXT_EMB_SUFFIX = "_emb"
OUTPUT_CTR = "ctr"
METADATA_KEY = "ctredge.feature_spec"

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB93FE53CD34F)
_SHIFT_33 = np.uint64(33)
_SEPARATOR = 0x1F


@dataclass(frozen=True)
class DenseFeature:
    """One float column of ``dense``.

    ``transform`` is applied inside the model: ``log1p`` is
    ``sign(x) * log(1 + |x|)`` (Criteo counts, negatives kept), ``identity``
    leaves the value; NaN becomes a learned per-feature value either way.
    ``integer`` features (Criteo's counts) must hold integers in click logs; the
    reader rejects ``1.5`` there but accepts it in a non-integer feature.
    """

    name: str
    side: str = "context"
    transform: str = "log1p"
    integer: bool = True

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_side(self.name, self.side)
        if self.transform not in DENSE_TRANSFORMS:
            raise SpecError(
                f"dense feature {self.name!r}: transform must be one of {DENSE_TRANSFORMS}, "
                f"got {self.transform!r}"
            )


@dataclass(frozen=True)
class CatFeature:
    """One column of ``cat``: raw values hashed into ``buckets`` ids (id 0 = empty).

    ``vocabulary`` (default: the feature's own name) is the hash namespace:
    features that name the same vocabulary (and have the same ``buckets``) give
    the same raw value the same id, so a model can compare them (a search
    query's category with the candidate's category, say).
    """

    name: str
    buckets: int
    side: str = "context"
    vocabulary: str | None = None

    @property
    def hash_name(self) -> str:
        """The name its raw values are hashed under: its vocabulary, else its own name."""
        return self.vocabulary or self.name

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_side(self.name, self.side)
        if self.vocabulary is not None:
            _check_name(self.vocabulary)
        if not isinstance(self.buckets, int) or isinstance(self.buckets, bool) or self.buckets < 2:
            raise SpecError(
                f"categorical feature {self.name!r}: buckets must be an integer >= 2 "
                f"(id 0 is reserved for the empty value), got {self.buckets!r}"
            )


@dataclass(frozen=True)
class HistorySpec:
    """The behaviour sequence ``hist``: up to ``max_len`` past items of the user.

    ``item_feature`` names the categorical feature whose bucket space (and
    embedding rows) the history shares.  In click logs the history is one extra
    column of comma-separated raw item ids, oldest first; the tensor keeps the
    most recent ``max_len`` of them, oldest first, padded with 0 on the right.
    """

    item_feature: str
    max_len: int = 20
    side: str = "user"

    def __post_init__(self) -> None:
        _check_side("hist", self.side)
        if not isinstance(self.max_len, int) or self.max_len < 1:
            raise SpecError(f"history: max_len must be an integer >= 1, got {self.max_len!r}")


@dataclass(frozen=True)
class TextFeature:
    """One raw-string column of the click logs, encoded by a sentence encoder of ``dim`` outputs.

    ``source``: ``table`` (e.g. the item title: encoded from the training rows into a
    table inside the model, looked up by the id of the categorical feature ``key``)
    or ``request`` (e.g. the search query: the model input ``<name>_emb``, FP32
    ``[B, dim]``, zeros for an empty string; a server with the encoder makes it
    from the raw string).  ``encoder`` names the encoder (documentation and checks).
    """

    name: str
    source: str = "request"
    side: str = "context"
    key: str | None = None
    dim: int = 384
    encoder: str = "all-MiniLM-L6-v2"

    @property
    def input_name(self) -> str:
        """The model input of a ``request`` text: ``<name>_emb``."""
        return self.name + TEXT_EMB_SUFFIX

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_side(self.name, self.side)
        if self.source not in TEXT_SOURCES:
            raise SpecError(f"text feature {self.name!r}: source must be one of {TEXT_SOURCES}, got {self.source!r}")
        if (self.source == "table") != (self.key is not None):
            raise SpecError(f"text feature {self.name!r}: a 'table' text needs a key (the categorical feature "
                            f"whose ids index the table) and a 'request' text has none, got key {self.key!r}")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise SpecError(f"text feature {self.name!r}: dim must be an integer >= 1, got {self.dim!r}")


@dataclass(frozen=True)
class FeatureSpec:
    """The feature contract: which tensors exist, their columns, sides and buckets."""

    dense: tuple[DenseFeature, ...]
    cat: tuple[CatFeature, ...]
    history: HistorySpec | None = None
    name: str = "ctr"
    hash_algorithm: str = HASH_ALGORITHM
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    text: tuple[TextFeature, ...] = ()
    skip_text: tuple[str, ...] = ()  # text columns of the file this model does not use (read and dropped)

    def __post_init__(self) -> None:
        if not self.cat and not self.dense:
            raise SpecError("a FeatureSpec needs at least one dense or categorical feature")
        names = [f.name for f in self.dense] + [f.name for f in self.cat] + [f.name for f in self.text]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"feature names must be unique, repeated: {dupes}")
        sizes: dict[str, set[int]] = {}
        for f in self.cat:
            sizes.setdefault(f.hash_name, set()).add(f.buckets)
        mixed = sorted(v for v, b in sizes.items() if len(b) > 1)
        if mixed:
            raise SpecError(f"categorical features sharing a vocabulary must have the same buckets; "
                            f"vocabularies {mixed} have {[sorted(sizes[v]) for v in mixed]}")
        if self.hash_algorithm != HASH_ALGORITHM:
            raise SpecError(
                f"hash_algorithm {self.hash_algorithm!r} is not supported; "
                f"this ctredge implements {HASH_ALGORITHM!r}"
            )
        if self.history is not None:
            cat_names = [f.name for f in self.cat]
            if self.history.item_feature not in cat_names:
                raise SpecError(
                    f"history.item_feature {self.history.item_feature!r} is not a categorical "
                    f"feature; expected one of {cat_names}"
                )

        cat_names = [f.name for f in self.cat]
        for t in self.text:
            if t.key is not None and t.key not in cat_names:
                raise SpecError(f"text feature {t.name!r}: key {t.key!r} is not a categorical feature; "
                                f"expected one of {cat_names}")

    # ----------------------------------------------------------------- shape
    @property
    def request_text(self) -> tuple[TextFeature, ...]:
        """The ``request`` text features: each one model input ``<name>_emb``."""
        return tuple(t for t in self.text if t.source == "request")

    def without_text(self) -> "FeatureSpec":
        """The same spec with no text features: a model without them, on the same files.

        Its ``skip_text`` names the text columns, so the reader still expects and drops them.
        """
        return dataclasses.replace(self, text=(), skip_text=self.skip_text + tuple(t.name for t in self.text))

    @property
    def n_text_columns(self) -> int:
        """Text columns at the end of a click-log line: used ones and skipped ones."""
        return len(self.text) + len(self.skip_text)

    @property
    def n_dense(self) -> int:
        return len(self.dense)

    @property
    def n_cat(self) -> int:
        return len(self.cat)

    @property
    def hist_len(self) -> int:
        return 0 if self.history is None else self.history.max_len

    @property
    def n_columns(self) -> int:
        """Fields per click-log line: label, dense, cat, and history if declared."""
        return 1 + self.n_dense + self.n_cat + (1 if self.history is not None else 0) + self.n_text_columns

    @property
    def buckets(self) -> np.ndarray:
        return np.array([f.buckets for f in self.cat], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        """Start row of each categorical feature in the one shared embedding table."""
        b = self.buckets
        return np.concatenate([[0], np.cumsum(b)[:-1]]).astype(np.int64) if len(b) else b

    @property
    def total_buckets(self) -> int:
        return int(self.buckets.sum())

    @property
    def item_feature_index(self) -> int | None:
        if self.history is None:
            return None
        return [f.name for f in self.cat].index(self.history.item_feature)

    def input_names(self) -> list[str]:
        names = []
        if self.dense:
            names.append(INPUT_DENSE)
        if self.cat:
            names.append(INPUT_CAT)
        if self.history is not None:
            names.append(INPUT_HIST)
        names.extend(t.input_name for t in self.request_text)
        return names

    def input_signature(self) -> dict[str, tuple[str, tuple[int | None, ...]]]:
        """``{name: (numpy dtype name, shape with None for the batch)}`` of every input."""
        sig: dict[str, tuple[str, tuple[int | None, ...]]] = {}
        if self.dense:
            sig[INPUT_DENSE] = ("float32", (None, self.n_dense))
        if self.cat:
            sig[INPUT_CAT] = ("int64", (None, self.n_cat))
        if self.history is not None:
            sig[INPUT_HIST] = ("int64", (None, self.history.max_len))
        for t in self.request_text:
            sig[t.input_name] = ("float32", (None, t.dim))
        return sig

    def onnx_input_types(self) -> dict[str, tuple[str, int]]:
        """``{name: (ONNX Runtime type string, rank)}`` every graph input must have."""
        return {name: ("tensor(float)" if dt == "float32" else "tensor(int64)", len(shape))
                for name, (dt, shape) in self.input_signature().items()}

    def columns(self, kind: str, side: str) -> list[int]:
        """Indices of the ``kind`` (``dense``/``cat``) columns tagged ``side``."""
        feats = {"dense": self.dense, "cat": self.cat}.get(kind)
        if feats is None:
            raise SpecError(f"kind must be 'dense' or 'cat', got {kind!r}")
        _check_side(kind, side)
        return [i for i, f in enumerate(feats) if f.side == side]

    # ----------------------------------------------------------------- hashing
    def hash_cat(self, raw: np.ndarray | Sequence[Sequence[Any]]) -> np.ndarray:
        """Hash raw categorical values ``[B, n_cat]`` into the ``cat`` tensor (int64)."""
        raw = _as_2d_raw(raw, self.n_cat, "cat_raw")
        out = np.empty(raw.shape, dtype=np.int64)
        for j, feat in enumerate(self.cat):
            out[:, j] = hash_values(raw[:, j], feat.hash_name, feat.buckets)
        return out

    def hash_history(self, raw_lists: Sequence[Sequence[Any]]) -> np.ndarray:
        """Hash per-row lists of raw item ids into the ``hist`` tensor ``[B, L]``.

        Each list is oldest first; the most recent ``max_len`` ids are kept.
        """
        if self.history is None:
            raise SpecError("this FeatureSpec declares no behaviour history")
        feat = self.cat[self.item_feature_index]  # type: ignore[index]
        L = self.history.max_len
        out = np.zeros((len(raw_lists), L), dtype=np.int64)
        kept = [list(r)[-L:] for r in raw_lists]
        lengths = np.fromiter((len(r) for r in kept), dtype=np.int64, count=len(kept))
        if lengths.sum() == 0:
            return out
        flat = [v for r in kept for v in r]
        ids = hash_values(flat, feat.hash_name, feat.buckets)
        rows = np.repeat(np.arange(len(kept)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        cols = np.arange(len(flat)) - np.repeat(starts, lengths)
        out[rows, cols] = ids
        return out

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dense"] = [dataclasses.asdict(f) for f in self.dense]
        d["cat"] = [dataclasses.asdict(f) for f in self.cat]
        if self.text:
            d["text"] = [dataclasses.asdict(f) for f in self.text]
        else:
            del d["text"]   # specs without text read and write as before
        if self.skip_text:
            d["skip_text"] = list(self.skip_text)
        else:
            del d["skip_text"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FeatureSpec":
        """Build a spec from :meth:`to_dict` output.

        Raises:
            SpecError: unknown keys, missing keys or invalid values.
        """
        if not isinstance(data, dict):
            raise SpecError(f"a FeatureSpec must be a JSON object, got {type(data).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise SpecError(f"FeatureSpec: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
        try:
            dense = tuple(_build(DenseFeature, d) for d in data.get("dense", []))
            cat = tuple(_build(CatFeature, d) for d in data.get("cat", []))
            hist = data.get("history")
            history = _build(HistorySpec, hist) if hist is not None else None
            text = tuple(_build(TextFeature, d) for d in data.get("text", []))
        except TypeError as exc:
            raise SpecError(f"FeatureSpec: {exc}") from exc
        rest = {k: v for k, v in data.items() if k not in ("dense", "cat", "history", "text", "skip_text")}
        skip = data.get("skip_text", [])
        if not isinstance(skip, list) or not all(isinstance(n, str) for n in skip):
            raise SpecError(f"FeatureSpec: skip_text must be a list of column names, got {skip!r}")
        return cls(dense=dense, cat=cat, history=history, text=text, skip_text=tuple(skip), **rest)

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"FeatureSpec is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str) -> "FeatureSpec":
        try:
            with open(path, encoding="utf-8") as fh:
                return cls.from_json(fh.read())
        except OSError as exc:
            raise SpecError(f"cannot read FeatureSpec {path}: {exc}") from exc

    # ----------------------------------------------------------------- presets
    @classmethod
    def criteo(cls, buckets: int | Sequence[int] = 100_000, history: HistorySpec | None = None) -> "FeatureSpec":
        """The Criteo layout: 13 integer counts ``I1..I13`` and 26 hashed ``C1..C26``.

        Criteo's columns are anonymous, so every feature is tagged ``context``.
        """
        if isinstance(buckets, int):
            buckets = [buckets] * 26
        if len(buckets) != 26:
            raise SpecError(f"criteo: expected 26 bucket counts, got {len(buckets)}")
        dense = tuple(DenseFeature(f"I{i}") for i in range(1, 14))
        cat = tuple(CatFeature(f"C{i}", int(b)) for i, b in enumerate(buckets, start=1))
        return cls(dense=dense, cat=cat, history=history, name="criteo")


def _build(kind: type, data: Any) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{kind.__name__}: expected a JSON object, got {data!r}")
    allowed = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{kind.__name__}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return kind(**data)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or "\t" in name or "\n" in name:
        raise SpecError(f"feature names must be non-empty strings without tabs/newlines, got {name!r}")


def _check_side(name: str, side: str) -> None:
    if side not in SIDES:
        raise SpecError(f"feature {name!r}: side must be one of {SIDES}, got {side!r}")


def _as_2d_raw(raw: Any, n_cols: int, what: str) -> np.ndarray:
    arr = raw if isinstance(raw, np.ndarray) else np.array(raw, dtype=object)
    if arr.ndim != 2 or arr.shape[1] != n_cols:
        raise SpecError(f"{what}: expected shape [B, {n_cols}], got {list(arr.shape)}")
    return arr


# --------------------------------------------------------------------- hashing
def _to_bytes_array(values: np.ndarray | Iterable[Any]) -> np.ndarray:
    """Normalise raw values to a 1-D numpy ``S`` (fixed-width bytes) array."""
    if not isinstance(values, np.ndarray):
        values = list(values)
        if values and all(type(v) is bytes for v in values):  # fast path: the reader's history tokens
            return np.array(values, dtype="S")
        values = np.asarray(values, dtype=object)
    arr = values.reshape(-1)
    kind = arr.dtype.kind
    if kind == "S":
        return arr
    if kind == "U":
        return np.char.encode(arr, "utf-8")
    if kind in "iu":
        return arr.astype("S")
    if kind == "b":
        raise SpecError("categorical values must be strings, bytes or integers, got booleans")
    if kind == "O":
        out = []
        for v in arr:
            if isinstance(v, bytes):
                out.append(v)
            elif isinstance(v, str):
                out.append(v.encode("utf-8"))
            elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
                out.append(str(int(v)).encode("ascii"))
            elif v is None:
                out.append(b"")
            else:
                raise SpecError(
                    f"categorical values must be strings, bytes or integers, got {type(v).__name__}: {v!r}"
                )
        return np.array(out, dtype="S") if out else np.zeros(0, dtype="S1")
    raise SpecError(f"categorical values must be strings, bytes or integers, got dtype {arr.dtype}")


def _fnv_prefix(feature: str) -> np.uint64:
    h = int(_FNV_OFFSET)
    for b in feature.encode("utf-8") + bytes([_SEPARATOR]):
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return np.uint64(h)


def hash_values(values: np.ndarray | Iterable[Any], feature: str, buckets: int) -> np.ndarray:
    """Hash raw categorical values into bucket ids of one feature.

    Takes: ``values`` (strings, bytes or integers; a numpy ``S``/``U``/int array is
    fastest), the feature's name and its bucket count (>= 2).  Returns an int64
    array of ids in ``[0, buckets)``, 0 for empty values.  The algorithm is in the
    module docstring; it is the same on every platform and process.

    Raises:
        SpecError: ``buckets`` < 2 or values of an unsupported type.
    """
    if int(buckets) < 2:
        raise SpecError(f"buckets must be >= 2, got {buckets}")
    arr = _to_bytes_array(values)
    n = arr.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.strings.str_len(arr)
    width = int(lengths.max())  # columns sliced from a wider table carry unused padding
    mat = np.frombuffer(arr.tobytes(), dtype=np.uint8).reshape(n, arr.dtype.itemsize)[:, :width]
    h = np.full(n, _fnv_prefix(feature), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width):
            col = mat[:, j].astype(np.uint64)
            step = (h ^ col) * _FNV_PRIME
            active = lengths > j
            if active.all():
                h = step
            else:
                h = np.where(active, step, h)
        h ^= h >> _SHIFT_33
        h *= _FMIX_1
        h ^= h >> _SHIFT_33
        h *= _FMIX_2
        h ^= h >> _SHIFT_33
    ids = (h % np.uint64(int(buckets) - 1)).astype(np.int64) + 1
    ids[lengths == 0] = 0
    return ids


def hash_value(value: Any, feature: str, buckets: int) -> int:
    """Hash one raw value (see :func:`hash_values`)."""
    return int(hash_values([value], feature, buckets)[0])
