"""Features of the cheap baselines (:mod:`.baselines`), built from the model's input tensors only.

Everything here is computed from the ``dense``/``cat``/``hist`` feeds of a
:class:`ctredge.reader.Batch`, and every statistic (quantile edges, id counts,
the item -> attribute maps) from the **training** rows only (:meth:`Encoder.fit`),
so the baselines see exactly what the deep models see.

History features (when the spec declares ``hist``): whether the candidate item
is in the history and in its last :data:`RECENT` items, the history's length;
and, for every other item-side categorical feature (the synthetic data's
category, brand and shop), whether the candidate's value appears among the
history items' values (and among the last :data:`RECENT`), the history items'
values being looked up in an item -> most frequent value map learned from the
training rows' candidates (items never seen as a candidate get "unknown").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctredge.features import INPUT_CAT, INPUT_DENSE, INPUT_HIST, FeatureSpec
from ctredge.reader import Batch

#: hashed buckets of the pairwise categorical crosses of the logistic regression
CROSS_BUCKETS = 2 ** 20
#: quantile bins per dense feature (plus one for missing)
DENSE_BINS = 16
#: "recent" = the last RECENT items of the history
RECENT = 3
#: history-length bins: 0, 1-2, 3-5, 6-10, 11+
HIST_LEN_EDGES = np.array([1, 3, 6, 11])
_P1, _P2, _P3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)


def _item_map(items: np.ndarray, values: np.ndarray, n_items: int) -> np.ndarray:
    """For each item id, its most frequent value among the rows (0 = unknown)."""
    out = np.zeros(n_items, dtype=np.int64)
    keep = (items > 0) & (values > 0)
    if not keep.any():
        return out
    scale = int(values.max()) + 1
    keys, counts = np.unique(items[keep] * scale + values[keep], return_counts=True)
    it, val = keys // scale, keys % scale
    order = np.lexsort((-counts, it))  # by item, then most frequent first
    it, val = it[order], val[order]
    first = np.concatenate([[True], it[1:] != it[:-1]])
    out[it[first]] = val[first]
    return out


@dataclass
class Encoder:
    """Train-row statistics that turn a batch into baseline features (see the module docstring)."""

    spec: FeatureSpec
    dense_edges: list[np.ndarray] = field(default_factory=list)
    cat_counts: list[np.ndarray] = field(default_factory=list)
    item_maps: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def fit(cls, spec: FeatureSpec, train: Batch) -> "Encoder":
        """Quantile edges, id counts and item -> attribute maps from the training rows only."""
        enc = cls(spec)
        dense = train.feeds.get(INPUT_DENSE)
        for j in range(spec.n_dense):
            col = dense[:, j].astype(np.float64)
            col = col[np.isfinite(col)]
            edges = np.unique(np.quantile(col, np.linspace(0, 1, DENSE_BINS + 1)[1:-1])) if col.size else np.zeros(0)
            enc.dense_edges.append(edges)
        cat = train.feeds.get(INPUT_CAT)
        for j, feat in enumerate(spec.cat):
            enc.cat_counts.append(np.bincount(cat[:, j], minlength=feat.buckets)[:feat.buckets])
        item = spec.item_feature_index
        if item is not None:
            n_items = spec.cat[item].buckets
            for j in enc.attribute_fields():
                enc.item_maps[j] = _item_map(cat[:, item], cat[:, j], n_items)
        return enc

    def attribute_fields(self) -> list[int]:
        """The item-side categorical columns besides the item itself (the history is looked up in them)."""
        item = self.spec.item_feature_index
        if item is None:
            return []
        return [j for j, f in enumerate(self.spec.cat) if f.side == "item" and j != item]

    # ------------------------------------------------------------------ shared pieces
    def dense_bins(self, batch: Batch) -> np.ndarray:
        """``[B, n_dense]`` bin codes in ``[0, DENSE_BINS]``; the last code (``len(edges)+1``) is missing."""
        dense = batch.feeds.get(INPUT_DENSE)
        out = np.zeros((len(batch), self.spec.n_dense), dtype=np.int64)
        for j, edges in enumerate(self.dense_edges):
            col = dense[:, j].astype(np.float64)
            codes = np.searchsorted(edges, col, side="right")
            codes[~np.isfinite(col)] = DENSE_BINS + 1
            out[:, j] = codes
        return out

    def history(self, batch: Batch) -> dict[str, np.ndarray]:
        """Named history features ``{name: int array [B]}`` (empty without a history)."""
        item = self.spec.item_feature_index
        if item is None or INPUT_HIST not in batch.feeds:
            return {}
        hist = batch.feeds[INPUT_HIST]
        cat = batch.feeds[INPUT_CAT]
        present = hist != 0
        lengths = present.sum(axis=1)
        col = np.arange(hist.shape[1])[None, :]
        recent = present & (col >= (lengths[:, None] - RECENT))
        cand = cat[:, item][:, None]
        out = {"hist_len": np.searchsorted(HIST_LEN_EDGES, lengths, side="right"),
               "item_in_hist": ((hist == cand) & present).any(axis=1).astype(np.int64),
               "item_in_recent": ((hist == cand) & recent).any(axis=1).astype(np.int64)}
        for j in self.attribute_fields():
            values = self.item_maps[j][np.clip(hist, 0, len(self.item_maps[j]) - 1)]
            known = present & (values != 0)
            match = known & (values == cat[:, j][:, None]) & (cat[:, j][:, None] != 0)
            name = self.spec.cat[j].name
            n_match = match.sum(axis=1)
            out[f"{name}_in_hist"] = np.minimum(n_match, 3)  # 0, 1, 2, 3+
            out[f"{name}_in_recent"] = (match & recent).any(axis=1).astype(np.int64)
            out[f"{name}_share_hist"] = np.where(known.sum(axis=1) > 0,
                                                 np.floor(4 * n_match / np.maximum(known.sum(axis=1), 1)), -1)
        return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}

    # ------------------------------------------------------------------ the two feature sets
    def sparse(self, batch: Batch) -> Any:
        """The logistic regression's one-hot CSR matrix (scipy): ids, hashed crosses, dense bins, history."""
        import scipy.sparse as sp

        n = len(batch)
        cols: list[np.ndarray] = []
        base = 0
        cat = batch.feeds.get(INPUT_CAT)
        if self.spec.n_cat:
            cols.extend(cat[:, j] + off for j, off in enumerate(self.spec.offsets))
            base = self.spec.total_buckets
            u = cat.astype(np.uint64)
            pair = 0
            with np.errstate(over="ignore"):
                for a in range(self.spec.n_cat):
                    for b in range(a + 1, self.spec.n_cat):
                        h = u[:, a] * _P1 + u[:, b] * _P2 + np.uint64(pair + 1) * _P3
                        h ^= h >> np.uint64(29)
                        cols.append(base + (h % np.uint64(CROSS_BUCKETS)).astype(np.int64))
                        pair += 1
            base += CROSS_BUCKETS
        bins = self.dense_bins(batch)
        for j in range(self.spec.n_dense):
            cols.append(base + bins[:, j])
            base += DENSE_BINS + 2
        for values in self.history(batch).values():
            cols.append(base + values + 1)  # values from -1 up to 3
            base += 6
        indices = np.stack(cols, axis=1).reshape(-1)
        width = len(cols)
        indptr = np.arange(0, n * width + 1, width, dtype=np.int64)
        data = np.ones(n * width, dtype=np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(n, base))

    def tabular(self, batch: Batch) -> tuple[np.ndarray, list[str], list[int]]:
        """LightGBM's matrix: raw dense, per categorical id its train count and a capped code, history.

        Returns ``(X float32 [B, k], column names, indices of categorical columns)``.
        The code of an id is its frequency rank among ids seen at least
        :data:`MIN_COUNT` times in the training rows, capped at :data:`MAX_CODES`
        (the rest share code 0); counts give the trees the ids' popularity.
        """
        cols, names, categorical = [], [], []
        dense = batch.feeds.get(INPUT_DENSE)
        for j, f in enumerate(self.spec.dense):
            cols.append(dense[:, j].astype(np.float32))
            names.append(f.name)
        cat = batch.feeds.get(INPUT_CAT)
        for j, f in enumerate(self.spec.cat):
            counts = self.cat_counts[j]
            ids = cat[:, j]
            cols.append(np.log1p(counts[ids]).astype(np.float32))
            names.append(f"{f.name}_count")
            categorical.append(len(cols))
            cols.append(self.codes(j)[ids].astype(np.float32))
            names.append(f"{f.name}_code")
        for name, values in self.history(batch).items():
            cols.append(values.astype(np.float32))
            names.append(name)
        return np.stack(cols, axis=1), names, categorical

    def codes(self, j: int) -> np.ndarray:
        """Per id of categorical column ``j``: 1 + its frequency rank (top :data:`MAX_CODES`, count >= MIN_COUNT), else 0."""
        counts = self.cat_counts[j]
        order = np.argsort(-counts, kind="stable")
        top = order[:MAX_CODES]
        top = top[counts[top] >= MIN_COUNT]
        out = np.zeros(len(counts), dtype=np.int64)
        out[top] = np.arange(1, len(top) + 1)
        return out


#: LightGBM: ids seen fewer times in the training rows share one code
MIN_COUNT = 20
#: LightGBM: at most this many distinct codes per categorical column
MAX_CODES = 200

__all__ = ["CROSS_BUCKETS", "DENSE_BINS", "RECENT", "MIN_COUNT", "MAX_CODES", "Encoder"]
