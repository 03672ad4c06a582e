"""tf.data input pipelines over the hub reader.

The hub reader (numpy, chunked) does the parsing and hashing; this module only
turns its :class:`~ctredge.reader.Batch` es into ``tf.data`` datasets of
``(feeds, labels)`` for Keras.  Shuffling: rows are permuted within a window of
``shuffle_rows`` (the reader chunk), then mini-batches are shuffled again by a
``tf.data`` buffer; a new permutation every epoch, seeded.  Small files are
held in memory once; files larger than ``max_memory_bytes`` are streamed from
disk every epoch in constant memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from ctredge.features import FeatureSpec
from ctredge.reader import Batch, ReadStats, SplitSpec, iter_batches, read_all


@dataclass
class Source:
    """Where one part (train/valid/test) of the data comes from."""

    paths: Sequence[str]
    split: SplitSpec | None = None
    part: str | None = None

    def batches(self, spec: FeatureSpec, chunk_rows: int, skip_bad_rows: bool, stats: ReadStats | None = None) -> Iterator[Batch]:
        return iter_batches(list(self.paths), spec, chunk_rows=chunk_rows, skip_bad_rows=skip_bad_rows,
                            stats=stats, split=self.split, part=self.part)

    def read(self, spec: FeatureSpec, skip_bad_rows: bool, stats: ReadStats | None = None) -> Batch:
        return read_all(list(self.paths), spec, skip_bad_rows=skip_bad_rows, stats=stats,
                        split=self.split, part=self.part)

    def file_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.paths)


def _signature(spec: FeatureSpec) -> tuple[dict[str, tf.TensorSpec], tf.TensorSpec]:
    feeds = {name: tf.TensorSpec(shape=shape, dtype=dt, name=name)
             for name, (dt, shape) in spec.input_signature().items()}
    return feeds, tf.TensorSpec(shape=(None, 1), dtype=tf.float32)


def _minibatches(batch: Batch, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[dict, np.ndarray]]:
    order = rng.permutation(len(batch))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield {k: v[idx] for k, v in batch.feeds.items()}, batch.labels[idx].reshape(-1, 1)


def train_dataset(
    source: Source,
    spec: FeatureSpec,
    *,
    batch_size: int,
    seed: int,
    shuffle_rows: int = 65_536,
    skip_bad_rows: bool = False,
    max_memory_bytes: int = 1 << 30,
    stats: ReadStats | None = None,
) -> tuple[tf.data.Dataset, int | None]:
    """A shuffled, repeated-per-epoch dataset of ``(feeds, labels)`` mini-batches.

    Returns the dataset and the number of training rows when known (in-memory
    path) or ``None`` (streaming path).
    """
    epoch = {"n": 0}
    in_memory: Batch | None = None
    if source.file_bytes() <= max_memory_bytes:
        in_memory = source.read(spec, skip_bad_rows, stats=stats)

    def generate() -> Iterator[tuple[dict, np.ndarray]]:
        rng = np.random.default_rng([seed, epoch["n"]])
        epoch["n"] += 1
        if in_memory is not None:  # one permutation over all rows
            yield from _minibatches(in_memory, batch_size, rng)
            return
        for chunk in source.batches(spec, shuffle_rows, skip_bad_rows):  # permuted per window
            yield from _minibatches(chunk, batch_size, rng)

    ds = tf.data.Dataset.from_generator(generate, output_signature=_signature(spec))
    ds = ds.shuffle(16, seed=seed).prefetch(4)
    return ds, (len(in_memory) if in_memory is not None else None)
