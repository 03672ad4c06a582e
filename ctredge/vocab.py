"""Statistics of the training rows that become part of a model: vocabularies and the item -> attribute table.

numpy only (the hub imports no stage).  :func:`count_rows` and :func:`vocab_remap`
give the vocabulary with a minimum count (rare ids share their feature's row 0,
the out-of-vocabulary row) that training (``--min-count``) and vocabulary
pruning (``ctredge compress prune``) both use.  The history carries item ids; what each
item is (its category, brand, shop, ...) is seen only in the rows where it is
the candidate.  :func:`item_attribute_table` collects that from the **training**
rows, and the trainer stores it in the model (``ItemAttributes``), so the
validation and test rows never inform it and serving needs no extra input.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ctredge.errors import ConfigError
from ctredge.features import INPUT_CAT, INPUT_HIST, FeatureSpec
from ctredge.reader import Batch


def count_rows(batches: Iterable[Batch], spec: FeatureSpec) -> tuple[np.ndarray, int]:
    """How often each global embedding row is used: ``(counts [total_buckets], rows read)``.

    Row ``offsets[j] + id`` counts feature ``j``'s id in ``cat``; every non-zero
    ``hist`` id counts in the item feature's rows.
    """
    counts = np.zeros(spec.total_buckets, dtype=np.int64)
    offsets = spec.offsets
    rows = 0
    for batch in batches:
        rows += len(batch)
        if spec.n_cat:
            counts += np.bincount((batch.feeds[INPUT_CAT] + offsets).reshape(-1), minlength=spec.total_buckets)
        if spec.history is not None:
            hist = batch.feeds[INPUT_HIST]
            ids = hist[hist != 0] + offsets[spec.item_feature_index]
            counts += np.bincount(ids, minlength=spec.total_buckets)
    return counts, rows


def vocab_remap(counts: np.ndarray, spec: FeatureSpec, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Which rows survive and where every global row goes.

    Takes the per-row counts, the spec and N.  Returns ``(remap, kept)``:
    ``kept`` the surviving global rows in order (each feature's row 0 always
    survives), ``remap`` int32 ``[total_buckets]`` mapping a surviving row to its
    new index and any other row to the new index of its feature's row 0.
    """
    total = spec.total_buckets
    row0 = np.repeat(spec.offsets, spec.buckets)  # each global row's feature start
    keep = counts >= min_count
    keep[spec.offsets] = True
    new_index = np.cumsum(keep) - 1
    remap = new_index[np.where(keep, np.arange(total), row0)].astype(np.int32)
    return remap, np.flatnonzero(keep)


def item_attribute_table(cat: np.ndarray, item: int, fields: Sequence[int], item_buckets: int) -> np.ndarray:
    """For each item bucket, the most frequent bucket of each attribute field among the rows: ``int32 [buckets, F]``.

    Takes the training rows' ``cat`` ids ``[N, n_cat]``, the item feature's column,
    the attribute columns and the item feature's bucket count.  An item never seen
    as a candidate, the empty item (bucket 0) and an empty attribute value give 0
    (unknown); ties go to the smaller bucket id.

    Raises:
        ConfigError: ``cat`` is not a 2-D integer array or a column is out of range.
    """
    cat = np.asarray(cat)
    if cat.ndim != 2 or not np.issubdtype(cat.dtype, np.integer):
        raise ConfigError(f"item_attribute_table: expected integer ids [rows, n_cat], got {cat.dtype} {cat.shape}")
    bad = [j for j in (item, *fields) if not 0 <= j < cat.shape[1]]
    if bad:
        raise ConfigError(f"item_attribute_table: columns {bad} out of range for {cat.shape[1]} cat columns")
    out = np.zeros((int(item_buckets), len(fields)), dtype=np.int32)
    items = cat[:, item].astype(np.int64)
    if items.size and (items.min() < 0 or items.max() >= item_buckets):
        raise ConfigError(f"item_attribute_table: item ids must lie in [0, {item_buckets}), got "
                          f"[{items.min()}, {items.max()}]")
    for f, j in enumerate(fields):
        values = cat[:, j].astype(np.int64)
        keep = (items > 0) & (values > 0)
        if not keep.any():
            continue
        scale = int(values[keep].max()) + 1
        keys, counts = np.unique(items[keep] * scale + values[keep], return_counts=True)
        it, val = keys // scale, keys % scale
        order = np.lexsort((val, -counts, it))          # by item, most frequent first, smaller id on ties
        it, val = it[order], val[order]
        first = np.concatenate([[True], it[1:] != it[:-1]])
        out[it[first], f] = val[first]
    return out


def quantile_edges(dense: np.ndarray, n_edges: int) -> np.ndarray:
    """Per dense feature, ``n_edges`` ascending quantile edges of its finite values: ``float32 [n, n_edges]``.

    The edges are the ``i / (n_edges + 1)`` quantiles (``i = 1..n_edges``) of the
    training rows; repeated edges (a feature with few distinct values) stay
    repeated, which only leaves some buckets empty; a feature with no finite
    value gets all-zero edges.

    Raises:
        ConfigError: ``dense`` is not 2-D or ``n_edges`` < 1.
    """
    dense = np.asarray(dense, dtype=np.float64)
    if dense.ndim != 2 or n_edges < 1:
        raise ConfigError(f"quantile_edges: expected dense [rows, n] and n_edges >= 1, got {dense.shape}, {n_edges}")
    out = np.zeros((dense.shape[1], n_edges), dtype=np.float32)
    qs = np.arange(1, n_edges + 1) / (n_edges + 1)
    for j in range(dense.shape[1]):
        col = dense[:, j][np.isfinite(dense[:, j])]
        if col.size:
            out[j] = np.quantile(col, qs)
    return out


__all__ = ["count_rows", "vocab_remap", "item_attribute_table", "quantile_edges"]
