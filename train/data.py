"""tf.data input pipelines over the hub reader.

The hub reader (numpy, chunked) does the parsing and hashing; this module only
turns its :class:`~ctredge.reader.Batch` es into ``tf.data`` datasets of
``(feeds, labels)`` for Keras.  Shuffling: rows are permuted within a window of
``shuffle_rows`` (the reader chunk), then mini-batches are shuffled again by a
``tf.data`` buffer; a new permutation every epoch, seeded.  Small files are
held in memory once; files larger than ``max_memory_bytes`` are streamed from
disk every epoch in constant memory (train.py picks by file size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from ctredge.features import FeatureSpec
from ctredge.reader import Batch, SplitSpec, iter_batches


@dataclass
class Source:
    """Click-log files (optionally one split part of them) streamed from disk."""

    paths: Sequence[str]
    split: SplitSpec | None = None
    part: str | None = None

    def batches(self, spec: FeatureSpec, chunk_rows: int, skip_bad_rows: bool) -> Iterator[Batch]:
        return iter_batches(list(self.paths), spec, chunk_rows=chunk_rows, skip_bad_rows=skip_bad_rows,
                            split=self.split, part=self.part)


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
    rows: Batch | Source,
    spec: FeatureSpec,
    *,
    batch_size: int,
    seed: int,
    shuffle_rows: int = 65_536,
    skip_bad_rows: bool = False,
) -> tf.data.Dataset:
    """A shuffled dataset of ``(feeds, labels [B, 1])`` mini-batches, a new order every epoch.

    ``rows`` is either an in-memory :class:`Batch` (one permutation over all rows
    per epoch) or a :class:`Source` streamed from disk every epoch in constant
    memory (rows permuted within windows of ``shuffle_rows``).
    """
    epoch = {"n": 0}

    def generate() -> Iterator[tuple[dict, np.ndarray]]:
        rng = np.random.default_rng([seed, epoch["n"]])
        epoch["n"] += 1
        if isinstance(rows, Batch):
            yield from _minibatches(rows, batch_size, rng)
            return
        for chunk in rows.batches(spec, shuffle_rows, skip_bad_rows):
            yield from _minibatches(chunk, batch_size, rng)

    ds = tf.data.Dataset.from_generator(generate, output_signature=_signature(spec))
    if isinstance(rows, Batch):  # known length: Keras shows a real progress bar and no "ran out of data"
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-len(rows) // batch_size)))
    return ds.shuffle(16, seed=seed).prefetch(4)
