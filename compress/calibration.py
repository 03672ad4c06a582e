"""Calibration data for static int8 quantization: feed dicts in, ORT's reader out.

Static QDQ quantization (:mod:`ctredge.compress.quantize`) runs the float model
on representative inputs to fix every activation's scale and zero point.  The
inputs are the project's one feed type, ``dict[str, np.ndarray]`` keyed by input
name (DESIGN.md, convention 5): held-out click-log rows from the hub reader in
production, :func:`ctredge.export.validate.random_feeds` or planted data in tests.

:class:`FeedCalibrationReader` turns any iterable of such dicts (of any batch
sizes) into ONNX Runtime's ``CalibrationDataReader``: it checks names, dtypes and
shapes against the model's inputs, re-batches rows into batches of
``batch_size``, stops after ``max_rows`` rows and can be rewound.  It imports
neither TensorFlow nor the ONNX Runtime quantizer at module import.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from ctredge.errors import ConfigError

def model_inputs(model: Any) -> dict[str, tuple[np.dtype, int]]:
    """``{name: (numpy dtype, rank)}`` of an ONNX model's graph inputs (initializers excluded).

    Takes an ``onnx.ModelProto``.  Raises :class:`ConfigError` for an input type
    the readers cannot feed.
    """
    import onnx

    inits = {i.name for i in model.graph.initializer}
    out: dict[str, tuple[np.dtype, int]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        elem = vi.type.tensor_type.elem_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        except Exception as exc:  # onnx raises KeyError/ValueError on unknown types
            raise ConfigError(f"model input {vi.name!r} has a tensor type ({elem}) calibration cannot feed") from exc
        out[vi.name] = (dtype, len(vi.type.tensor_type.shape.dim))
    return out


class FeedCalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over an iterable of feed dicts.

    Takes: ``feeds`` (an iterable of ``{input name: array}`` dicts; each dict's
    arrays share their first, batch, dimension; a list is re-iterable, a
    generator is consumed once and cached for :meth:`rewind`), ``inputs``
    (``{name: (dtype, rank)}``, see :func:`model_inputs`: every input must be
    there, other keys such as labels are dropped, arrays are cast to these
    dtypes; ``None`` keeps every key and skips the checks), ``batch_size`` (rows
    per calibration batch) and ``max_rows`` (rows used at most; 0 = all).

    :meth:`get_next` returns the next batch or ``None`` at the end, as ORT's
    calibrators expect; the reader is also a Python iterator.  ``drop_remainder``:
    leave out a last batch shorter than ``batch_size`` when full batches exist.

    Raises:
        ConfigError: (while reading) a feed is not a dict, misses an input,
            has arrays of the wrong rank or of unequal batch sizes, or the
            whole iterable holds no rows.
    """

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]],
                 inputs: Mapping[str, tuple[np.dtype, int]] | None = None,
                 *, batch_size: int = 256, max_rows: int = 4096, drop_remainder: bool = False) -> None:
        if isinstance(feeds, Mapping):
            feeds = [feeds]  # one feed dict given bare
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"calibration batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
            raise ConfigError(f"calibration max_rows must be an integer >= 0 (0 = all), got {max_rows!r}")
        self._source = feeds
        self._inputs = dict(inputs) if inputs is not None else None
        self.batch_size = batch_size
        self.max_rows = max_rows
        self.drop_remainder = drop_remainder
        self._batches: list[dict[str, np.ndarray]] | None = None
        self._pos = 0

    # ------------------------------------------------------------------ ORT API
    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration batch, or ``None`` when all were given."""
        batches = self.batches()
        if self._pos >= len(batches):
            return None
        self._pos += 1
        return batches[self._pos - 1]

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._pos = 0

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_next()
        if batch is None:
            raise StopIteration
        return batch

    def __len__(self) -> int:
        return len(self.batches())

    def set_range(self, start_index: int, end_index: int) -> None:
        raise NotImplementedError("FeedCalibrationReader serves its batches in order")

    # ------------------------------------------------------------------ batching
    @property
    def rows(self) -> int:
        """Rows the reader serves in all (after ``max_rows``)."""
        return sum(len(next(iter(b.values()))) for b in self.batches())

    def batches(self) -> list[dict[str, np.ndarray]]:
        """All calibration batches (read from the source on first use)."""
        if self._batches is None:
            self._batches = self._collect()
        return self._batches

    def _collect(self) -> list[dict[str, np.ndarray]]:
        pending: dict[str, list[np.ndarray]] = {}
        pending_rows = 0
        total = 0
        out: list[dict[str, np.ndarray]] = []
        names: list[str] | None = None
        for k, feed in enumerate(self._source):
            feed = self._check(feed, k)
            if names is None:
                names = sorted(feed)
            elif sorted(feed) != names:
                raise ConfigError(f"calibration feed #{k} has inputs {sorted(feed)}, the first had {names}")
            n = len(next(iter(feed.values())))
            if self.max_rows:
                n = min(n, self.max_rows - total)
            for name, arr in feed.items():
                pending.setdefault(name, []).append(arr[:n])
            pending_rows += n
            total += n
            while pending_rows >= self.batch_size:
                out.append(self._take(pending, self.batch_size))
                pending_rows -= self.batch_size
            if self.max_rows and total >= self.max_rows:
                break
        if pending_rows and not (self.drop_remainder and out):
            out.append(self._take(pending, pending_rows))
        if not out:
            raise ConfigError("calibration data holds no rows: static quantization needs representative "
                              "feed dicts (e.g. held-out click-log rows read with the hub reader)")
        return out

    @staticmethod
    def _take(pending: dict[str, list[np.ndarray]], n: int) -> dict[str, np.ndarray]:
        batch = {}
        for name, parts in pending.items():
            arr = np.concatenate(parts) if len(parts) > 1 else parts[0]
            batch[name] = np.ascontiguousarray(arr[:n])
            pending[name] = [arr[n:]]
        return batch

    def _check(self, feed: Any, k: int) -> dict[str, np.ndarray]:
        if not isinstance(feed, Mapping):
            raise ConfigError(f"calibration feed #{k} must be a dict of input name -> array, "
                              f"got {type(feed).__name__}")
        if not feed:
            raise ConfigError(f"calibration feed #{k} is empty")
        if self._inputs is not None:
            missing = sorted(set(self._inputs) - set(feed))
            if missing:
                raise ConfigError(f"calibration feed #{k} lacks input(s) {missing}: it has {sorted(feed)}, "
                                  f"the model expects {sorted(self._inputs)}")
            feed = {name: feed[name] for name in self._inputs}  # extra keys (labels, ...) are left out
        out: dict[str, np.ndarray] = {}
        for name, value in feed.items():
            arr = np.asarray(value)
            if self._inputs is not None:
                dtype, rank = self._inputs[name]
                if arr.ndim != rank:
                    raise ConfigError(f"calibration feed #{k}: input {name!r} has shape {list(arr.shape)}, "
                                      f"expected rank {rank}")
                arr = arr.astype(dtype, copy=False)
            if arr.ndim == 0:
                raise ConfigError(f"calibration feed #{k}: input {name!r} is a scalar, expected a batch")
            out[name] = arr
        sizes = {name: a.shape[0] for name, a in out.items()}
        if len(set(sizes.values())) != 1:
            raise ConfigError(f"calibration feed #{k}: inputs differ in batch size: {sizes}")
        return out


__all__ = ["FeedCalibrationReader", "model_inputs"]
