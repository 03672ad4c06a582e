"""Chunked click-log reader (numpy only): Criteo TSV (+ optional history column) -> feeds.

Layout of a line, tab-separated::

    label \\t dense_1 .. dense_n \\t cat_1 .. cat_m [\\t item,item,...] [\\t text_1 .. text_k]

``label`` is 0 or 1; empty fields are missing values; categorical values are raw
strings (Criteo: 8-hex hashes) that :meth:`FeatureSpec.hash_cat` turns into
bucket ids; the optional last column is the user's behaviour history (raw item
ids, comma-separated, oldest first); text features (``FeatureSpec.text``) come
last, one raw UTF-8 string each (no tab or newline inside), kept as bytes in
``RawChunk.text_raw`` and ``Batch.text``: the model's text inputs are made from
them by an encoder, never here.  Real files trim trailing empty fields, so
short lines are padded with empty fields (a line needs at least the label, the
dense columns and one categorical column).  Files may be plain or gzip.

The reader never holds more than one chunk: memory is constant for files larger
than RAM.  Rows are identified by ``(file_no, line_no)``; :func:`split_codes`
assigns each row deterministically to train/valid/test from that key and a seed,
so every stage re-reads exactly the same held-out rows.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ctredge.errors import DataError
from ctredge.features import INPUT_CAT, INPUT_DENSE, INPUT_HIST, FeatureSpec

DEFAULT_CHUNK_ROWS = 65_536
SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class ReadStats:
    """Counters of one read: rows yielded, bad rows skipped, short lines padded."""

    rows: int = 0
    bad_rows: int = 0
    padded_lines: int = 0
    first_bad: list[str] = field(default_factory=list)

    def note_bad(self, message: str) -> None:
        self.bad_rows += 1
        if len(self.first_bad) < 5:
            self.first_bad.append(message)


@dataclass
class RawChunk:
    """Parsed but not hashed rows: what the server's ``cat_raw`` input carries."""

    labels: np.ndarray  # float32 [n]
    dense: np.ndarray  # float32 [n, n_dense], NaN = missing
    cat_raw: np.ndarray  # bytes (numpy S) [n, n_cat], b"" = missing
    hist_raw: list[list[bytes]] | None  # per row, oldest first
    line_no: np.ndarray  # int64 [n], 1-based line numbers
    file_no: int = 0
    text_raw: np.ndarray | None = None  # object [n, n_text] of bytes, b"" = empty; None without text features

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, mask: np.ndarray) -> "RawChunk":
        """Rows selected by a boolean mask."""
        hist = None if self.hist_raw is None else [h for h, k in zip(self.hist_raw, mask) if k]
        text = None if self.text_raw is None else self.text_raw[mask]
        return RawChunk(self.labels[mask], self.dense[mask], self.cat_raw[mask], hist, self.line_no[mask], self.file_no,
                        text)


@dataclass
class Batch:
    """Rows as model feeds (``dict[str, np.ndarray]`` keyed by input name) plus labels."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray
    line_no: np.ndarray
    file_no: np.ndarray
    text: dict[str, np.ndarray] | None = None  # text feature name -> object [n] of bytes (raw strings)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> "Batch":
        """Rows selected by a boolean mask or integer index."""
        return Batch(
            {k: v[index] for k, v in self.feeds.items()},
            self.labels[index],
            self.line_no[index],
            self.file_no[index],
            None if self.text is None else {k: v[index] for k, v in self.text.items()},
        )


def open_text(path: str | os.PathLike[str]) -> io.BufferedIOBase:
    """Open a click-log file for binary line reading; gzip by magic number.

    Raises:
        DataError: the file does not exist or cannot be opened.
    """
    try:
        fh = open(path, "rb")
        magic = fh.peek(2)[:2] if hasattr(fh, "peek") else b""
        if magic == b"\x1f\x8b":
            fh.close()
            return gzip.open(path, "rb")  # type: ignore[return-value]
        return fh
    except OSError as exc:
        raise DataError(f"cannot open click log: {exc.strerror or exc}", path=str(path)) from exc


def iter_raw(
    path: str | os.PathLike[str],
    spec: FeatureSpec,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    skip_bad_rows: bool = False,
    stats: ReadStats | None = None,
    file_no: int = 0,
    limit: int | None = None,
) -> Iterator[RawChunk]:
    """Yield :class:`RawChunk` s of up to ``chunk_rows`` parsed rows of one file.

    Takes the file, the spec that fixes its layout, and ``skip_bad_rows`` (count
    and drop malformed rows instead of stopping).  ``limit`` stops after that many
    lines.  ``stats`` (if given) is updated in place.

    Raises:
        DataError: a malformed row (bad label, non-numeric or non-integer count,
            a non-finite value such as ``inf`` or ``nan``, wrong field count),
            naming the file and 1-based line number, unless ``skip_bad_rows``.
    """
    if chunk_rows < 1:
        raise DataError(f"chunk_rows must be >= 1, got {chunk_rows}")
    stats = stats if stats is not None else ReadStats()
    name = str(path)
    line_base = 0
    with open_text(path) as fh:
        lines_iter: Iterator[bytes] = iter(fh)
        if limit is not None:
            lines_iter = itertools.islice(lines_iter, limit)
        while True:
            try:
                lines = list(itertools.islice(lines_iter, chunk_rows))
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise DataError(f"cannot read: {exc}", path=name, line=line_base + 1) from exc
            if not lines:
                break
            chunk = _parse_lines(lines, spec, line_base, name, skip_bad_rows, stats)
            line_base += len(lines)
            if chunk is not None and len(chunk):
                chunk.file_no = file_no
                stats.rows += len(chunk)
                yield chunk


def iter_batches(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    spec: FeatureSpec,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    skip_bad_rows: bool = False,
    stats: ReadStats | None = None,
    split: "SplitSpec | None" = None,
    part: str | None = None,
    limit: int | None = None,
) -> Iterator[Batch]:
    """Yield hashed :class:`Batch` es from one or more files, optionally one split part.

    ``split`` + ``part`` (``train``/``valid``/``test``) keep only that part's rows.
    Raises what :func:`iter_raw` raises.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if (split is None) != (part is None):
        raise DataError("give both split and part, or neither")
    for file_no, path in enumerate(paths):
        for raw in iter_raw(path, spec, chunk_rows=chunk_rows, skip_bad_rows=skip_bad_rows,
                            stats=stats, file_no=file_no, limit=limit):
            if split is not None:  # select before hashing
                raw = raw.take(split.codes(np.full(len(raw), file_no), raw.line_no) == SPLIT_NAMES.index(part))  # type: ignore[arg-type]
            if len(raw):
                yield to_batch(raw, spec)


def to_batch(raw: RawChunk, spec: FeatureSpec) -> Batch:
    """Hash a :class:`RawChunk` into model feeds."""
    feeds: dict[str, np.ndarray] = {}
    if spec.n_dense:
        feeds[INPUT_DENSE] = raw.dense
    if spec.n_cat:
        feeds[INPUT_CAT] = spec.hash_cat(raw.cat_raw)
    if spec.history is not None:
        feeds[INPUT_HIST] = spec.hash_history(raw.hist_raw or [])
    n = len(raw)
    text = None
    if spec.text and raw.text_raw is not None:
        text = {t.name: raw.text_raw[:, k] for k, t in enumerate(spec.text)}
    return Batch(feeds, raw.labels, raw.line_no, np.full(n, raw.file_no, dtype=np.int64), text)


def read_all(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    spec: FeatureSpec,
    **kwargs,
) -> Batch:
    """Concatenate everything :func:`iter_batches` yields (for data that fits in memory)."""
    return concat_batches(list(iter_batches(paths, spec, **kwargs)), spec)


def concat_batches(parts: Sequence[Batch], spec: FeatureSpec) -> Batch:
    """One batch of several, in order; none gives an empty batch with the spec's shapes and dtypes."""
    if not parts:
        empty = {name: np.zeros((0,) + tuple(s[1:]), dtype=dt) for name, (dt, s) in spec.input_signature().items()}
        z = np.zeros(0, dtype=np.int64)
        return Batch(empty, np.zeros(0, dtype=np.float32), z, z)
    text = None
    if all(p.text is not None for p in parts):
        text = {k: np.concatenate([p.text[k] for p in parts]) for k in parts[0].text}  # type: ignore[index]
    return Batch(
        {k: np.concatenate([p.feeds[k] for p in parts]) for k in parts[0].feeds},
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.line_no for p in parts]),
        np.concatenate([p.file_no for p in parts]),
        text,
    )


# ------------------------------------------------------------------ parsing
def _parse_lines(
    lines: list[bytes], spec: FeatureSpec, line_base: int, name: str,
    skip_bad_rows: bool, stats: ReadStats,
) -> RawChunk | None:
    n_fields = spec.n_columns
    n_table = 1 + spec.n_dense + spec.n_cat  # the history column is kept out of the table:
    has_hist = spec.history is not None      # it is far wider than the other fields
    min_fields = 1 + spec.n_dense + (1 if spec.n_cat else 0)
    n_text = spec.n_text_columns             # the text columns come last, also kept out of the table
    rows: list[list[bytes]] = []
    hists: list[bytes] = []
    texts: list[list[bytes]] = []
    line_no: list[int] = []
    pad = [b""] * n_fields
    for i, line in enumerate(lines):
        fields = line.rstrip(b"\r\n").split(b"\t")
        k = len(fields)
        if k != n_fields:
            if k > n_fields or k < min_fields:
                _bad(f"expected {n_fields} tab-separated fields (trailing empty ones may be trimmed, "
                     f"so at least {min_fields}), got {k}", name, line_base + i + 1, skip_bad_rows, stats)
                continue
            fields.extend(pad[: n_fields - k])
            stats.padded_lines += 1
        if n_text:
            texts.append(fields[len(fields) - n_text:len(fields) - n_text + len(spec.text)])
            del fields[-n_text:]
        if has_hist:
            hists.append(fields.pop())
        rows.append(fields)
        line_no.append(line_base + i + 1)
    if not rows:
        return None
    table = np.array(rows, dtype="S")
    if table.shape[1] != n_table:  # a spec with no categorical features and all fields empty
        table = table.reshape(len(rows), n_table)
    lines_arr = np.array(line_no, dtype=np.int64)
    dense, bad = _convert_checked(table, spec)
    if bad:
        for idx, msg in bad:
            _bad(msg, name, int(lines_arr[idx]), skip_bad_rows, stats)
        keep = np.ones(len(rows), dtype=bool)
        keep[[idx for idx, _ in bad]] = False
        table, lines_arr, dense = table[keep], lines_arr[keep], dense[keep]
        hists = [h for h, k in zip(hists, keep) if k]
        texts = [t for t, k in zip(texts, keep) if k]
        if not len(table):
            return None
    labels = (table[:, 0] == b"1").astype(np.float32)
    cat_raw = table[:, 1 + spec.n_dense:]
    hist_raw = None
    if has_hist:
        hist_raw = [[v for v in h.split(b",") if v] if h else [] for h in hists]
    text_raw = None
    if spec.text:
        text_raw = np.empty((len(texts), len(spec.text)), dtype=object)
        text_raw[:] = texts if texts else np.empty((0, len(spec.text)), dtype=object)
    return RawChunk(labels, dense, cat_raw, hist_raw, lines_arr, text_raw=text_raw)


def _bad(message: str, name: str, line: int, skip: bool, stats: ReadStats) -> None:
    if not skip:
        raise DataError(message + " (use --skip-bad-rows to skip and count such rows)", path=name, line=line)
    stats.note_bad(f"{name}:{line}: {message}")


def _convert_checked(table: np.ndarray, spec: FeatureSpec) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Dense floats (NaN = missing) and the rows (index, reason) with a bad label or value.

    Columns convert vectorised; only a column that fails is scanned row by row.
    A value must be finite in float32: ``nan``, ``inf`` and magnitudes past
    float32's range are refused (only an empty field means missing), since the
    model cannot tell a NaN that came from the file from a missing value and an
    infinite count makes every prediction NaN.
    """
    bad: dict[int, str] = {}
    labels = table[:, 0]
    for idx in np.flatnonzero((labels != b"0") & (labels != b"1")):
        bad[int(idx)] = f"label must be 0 or 1, got {labels[idx].decode('utf-8', 'replace')!r}"
    dense = np.full((table.shape[0], spec.n_dense), np.nan, dtype=np.float32)
    for j, feat in enumerate(spec.dense):
        col = table[:, 1 + j]
        present = col != b""
        if not present.any():
            continue
        kind = "an integer count" if feat.integer else "a finite number (empty = missing)"
        try:
            with np.errstate(over="ignore"):
                dense[present, j] = col[present].astype(np.int64 if feat.integer else np.float64)
        except (ValueError, OverflowError):
            for idx in np.flatnonzero(present):
                v = col[idx]
                try:
                    value = int(v) if feat.integer else float(v)
                except (ValueError, OverflowError):
                    bad.setdefault(int(idx), f"dense feature {feat.name} (field {2 + j}) must be {kind}, "
                                             f"got {v.decode('utf-8', 'replace')!r}")
                    continue
                with np.errstate(over="ignore"):
                    dense[idx, j] = value
        for idx in np.flatnonzero(present & ~np.isfinite(dense[:, j])):
            if int(idx) not in bad:
                bad[int(idx)] = (f"dense feature {feat.name} (field {2 + j}) must be {kind} within float32's range, "
                                 f"got {col[idx].decode('utf-8', 'replace')!r}")
    return dense, sorted(bad.items())


# ------------------------------------------------------------------ splitting
@dataclass(frozen=True)
class SplitSpec:
    """Deterministic train/valid/test assignment of rows by ``(file_no, line_no)``.

    A row's key is mixed with ``seed`` through SplitMix64 into a uniform number
    ``u`` in [0, 1): ``u < valid`` -> valid, ``u < valid + test`` -> test, else
    train.  The same file, seed and fractions always give the same rows.
    """

    seed: int = 0
    valid: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        if not (0 <= self.valid < 1 and 0 <= self.test < 1 and self.valid + self.test < 1):
            raise DataError(f"split fractions must be in [0, 1) with valid + test < 1, "
                            f"got valid={self.valid}, test={self.test}")

    def codes(self, file_no: np.ndarray, line_no: np.ndarray) -> np.ndarray:
        """0 (train), 1 (valid) or 2 (test) for every row."""
        key = (np.asarray(file_no, dtype=np.uint64) << np.uint64(40)) ^ np.asarray(line_no, dtype=np.uint64)
        u = _splitmix64(key ^ _splitmix64(np.full_like(key, self.seed)))
        frac = (u >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        out = np.zeros(frac.shape, dtype=np.int64)
        out[frac < self.valid + self.test] = 2
        out[frac < self.valid] = 1
        return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))




def sidecar_path(data_path: str | os.PathLike[str], kind: str) -> str:
    """``clicks.tsv`` (or ``clicks.tsv.gz``) -> ``clicks.<kind>.json`` beside it."""
    p = str(data_path)
    for suffix in (".gz", ".tsv", ".txt"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    return f"{p}.{kind}.json"


def resolve_spec(data_path: str | os.PathLike[str], spec: str | None = None, *, buckets: int = 100_000) -> FeatureSpec:
    """The FeatureSpec for a click log: ``spec`` is a JSON path or ``criteo``;
    without it, ``<data>.spec.json`` beside the data (``ctredge datagen`` writes one).

    Raises:
        DataError: no spec given and none beside the data.
    """
    if spec == "criteo":
        return FeatureSpec.criteo(buckets)
    path = spec or sidecar_path(data_path, "spec")
    if not os.path.isfile(path):
        raise DataError(f"no FeatureSpec for {data_path}: expected {path} (written by `ctredge datagen`), "
                        f"or pass --spec FILE.json / --spec criteo")
    return FeatureSpec.load(path)
