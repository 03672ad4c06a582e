"""Custom Keras 3 layers of the CTR models (TensorFlow backend).

Every layer is registered serializable under the package ``ctredge``, has a
complete ``get_config`` and states its formula and paper below.  The layers call
TensorFlow ops directly (the backend is fixed to TensorFlow) so that the graph
tf2onnx exports stays small: one ``Gather`` per embedding lookup instead of the
negative-index handling Keras 3 adds to ``keras.layers.Embedding``.

Layers taking several tensors take them as one list, ``layer([a, b, ...])``.
``ids`` arguments are the raw ``hist`` ids: position ``t`` of a row is valid when
``ids[:, t] != 0`` (0 is padding), and every pooling is exact zero — never NaN —
for a row whose history is empty.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import tensorflow as tf

_PACKAGE = "ctredge"
_TRANSFORMS = ("log1p", "identity")
_NEG_LARGE = -1e9  # "minus infinity" that stays finite in float32 arithmetic


def _valid_mask(ids: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``[B, L]`` 1.0 where ``ids != 0`` else 0.0, in ``dtype``."""
    return tf.cast(tf.not_equal(ids, tf.zeros([], ids.dtype)), dtype)


def _build_scorer(layer: Any, width: int) -> None:
    """The attention scoring MLP's weights on ``layer``: ``kernel_i``/``bias_i`` for ``layer.units`` then 1 output."""
    layer.kernels, layer.biases = [], []
    for i, u in enumerate(layer.units + [1]):
        layer.kernels.append(layer.add_weight(name=f"kernel_{i}", shape=(width, u), initializer="glorot_uniform"))
        layer.biases.append(layer.add_weight(name=f"bias_{i}", shape=(u,), initializer="zeros"))
        width = u


def _score(layer: Any, h: tf.Tensor) -> tf.Tensor:
    """Run ``h`` through the scoring MLP built by :func:`_build_scorer` (activation on the hidden layers)."""
    for i, (kernel, bias) in enumerate(zip(layer.kernels, layer.biases)):
        h = tf.matmul(h, kernel) + bias
        if i < len(layer.units):
            h = layer._act(h)
    return h


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DenseTransform(keras.layers.Layer):
    """Transforms the raw ``dense`` tensor ``[B, n]`` (NaN = missing) inside the graph.

    Per feature ``j``::

        t_j(x) = sign(x) * log(1 + |x|)   if transforms[j] == "log1p"
        t_j(x) = x                        if transforms[j] == "identity"
        y_j    = fill_j   if x is NaN   else t_j(x)      (fill_j learned, init 0)

    (computed as ``log(1 + |x|)``: tf2onnx cannot convert ``Log1p``; for |x| below
    ~1e-7 this rounds to 0, irrelevant for counts).
    With ``missing_indicator`` the output is ``[y, 1{x is NaN}]`` of width ``2n``.
    The signed log keeps negative counts (Criteo has some) and compresses the
    heavy-tailed counts, in the spirit of the Criteo contest winners (Juan et al.,
    "Field-aware Factorization Machines for CTR Prediction", RecSys 2016, who binned
    counts by ``floor(log(x)^2)``).

    Takes: ``transforms``, one name per dense feature; ``missing_indicator``.
    Input float ``[B, n]``; output float ``[B, n]`` or ``[B, 2n]``.
    """

    def __init__(self, transforms: Sequence[str], missing_indicator: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        transforms = list(transforms)
        bad = [t for t in transforms if t not in _TRANSFORMS]
        if not transforms or bad:
            raise ValueError(f"DenseTransform: transforms must be a non-empty list of {_TRANSFORMS}, got {transforms}")
        self.transforms = transforms
        self.missing_indicator = bool(missing_indicator)

    def build(self, input_shape: Any) -> None:
        n = len(self.transforms)
        if input_shape[-1] is not None and input_shape[-1] != n:
            raise ValueError(f"DenseTransform: expected {n} dense columns, got input shape {input_shape}")
        self.fill = self.add_weight(name="fill", shape=(n,), initializer="zeros")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        x = tf.convert_to_tensor(inputs)
        missing = tf.math.is_nan(x)
        x0 = tf.where(missing, tf.zeros([], x.dtype), x)  # no NaN reaches the log or the gradient
        if "log1p" in self.transforms:
            # log(1 + |x|), not tf.math.log1p: tf2onnx has no Log1p; same value for counts
            logged = tf.sign(x0) * tf.math.log(1.0 + tf.abs(x0))
            if "identity" in self.transforms:
                is_log = tf.constant([t == "log1p" for t in self.transforms])
                logged = tf.where(is_log, logged, x0)
            x0 = logged
        fill = tf.cast(self.fill, x0.dtype)
        y = tf.where(missing, fill, x0)  # fill broadcasts over the batch
        if self.missing_indicator:
            y = tf.concat([y, tf.cast(missing, y.dtype)], axis=-1)
        return y

    def compute_output_shape(self, input_shape: Any) -> tuple:
        width = len(self.transforms) * (2 if self.missing_indicator else 1)
        return (input_shape[0], width)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "transforms": list(self.transforms),
                "missing_indicator": self.missing_indicator}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SharedEmbedding(keras.layers.Layer):
    """One embedding table for all categorical features and the behaviour history.

    ``E`` has ``total_buckets`` rows; feature ``j``'s bucket ``i`` is row
    ``offsets[j] + i`` (``FeatureSpec.offsets``, a graph constant)::

        cat_emb[b, j]  = E[offsets[j] + cat[b, j]]                  -> [B, n_cat, dim]
        hist_emb[b, t] = E[hist_offset + hist[b, t]] * 1{hist[b, t] != 0}   -> [B, L, dim]

    The history lives in the candidate item's bucket space, so a past item and the
    same candidate share a row; padding (id 0) embeds to exactly zero.  One table
    and one ``tf.gather`` per input keep the exported graph to a handful of nodes
    (the "shared embedding" layout of e.g. Naumov et al., DLRM, 2019, with the
    per-feature offsets of TorchRec's ``KeyedJaggedTensor``).  Ids must lie in
    ``[0, buckets_j)``; an out-of-range id is an error in TensorFlow and ONNX Runtime.

    Vocabulary pruning (``kept_rows``, set by :mod:`ctredge.compress.prune`): the
    table keeps only ``kept_rows`` physical rows and a non-trainable int32 lookup
    ``remap`` (``[total_buckets]``, global row -> physical row) is gathered first::

        cat_emb[b, j] = E[remap[offsets[j] + cat[b, j]]]

    so the input contract (ids in ``[0, buckets_j)``) is unchanged, pruned buckets
    share their feature's reserved row 0, and the float table stays the direct data
    input of its own ``Gather`` (what row-wise embedding quantization rewrites).
    The remap costs 4 bytes per bucket against ``4 * dim`` per dropped row.

    History attributes (``attr_offsets``, one global offset per attribute field):
    a third input ``attr`` ``[B, L, F]`` (:class:`ItemAttributes`) embeds as
    ``E[attr_offsets[f] + attr[b, t, f]] * 1{attr != 0}`` -> ``[B, L, F, dim]``,
    so a past item's category shares the row of the candidate's category.

    Learning-rate scale (``lr_scale`` = ``s``): the layer stores ``E / s`` and
    multiplies each looked-up row by ``s``.  The function is the same, but Adam's
    step (about ``lr`` per weight, whatever the gradient's size) moves ``E`` by
    ``s * lr``: the embeddings learn at ``s`` times the dense layers' rate, the
    per-parameter-group learning rate that Keras' single optimizer lacks.

    Takes: ``total_buckets``, ``dim``, ``offsets`` (one per cat feature),
    ``hist_offset`` (None when there is no history), ``embeddings_initializer``,
    ``kept_rows`` (None = no remap, the table has ``total_buckets`` rows), ``attr_offsets``.
    Input ``cat`` int ``[B, n_cat]``, ``[cat, hist]`` or ``[cat, hist, attr]``; output the embedding(s).
    """

    def __init__(self, total_buckets: int, dim: int, offsets: Sequence[int], hist_offset: int | None = None,
                 embeddings_initializer: Any = "uniform", kept_rows: int | None = None,
                 attr_offsets: Sequence[int] | None = None, lr_scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lr_scale = float(lr_scale)
        if not self.lr_scale > 0:
            raise ValueError(f"SharedEmbedding: lr_scale must be > 0, got {lr_scale}")
        self.attr_offsets = None if attr_offsets is None else [int(o) for o in attr_offsets]
        self.total_buckets = int(total_buckets)
        self.dim = int(dim)
        self.offsets = [int(o) for o in offsets]
        self.hist_offset = None if hist_offset is None else int(hist_offset)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.kept_rows = None if kept_rows is None else int(kept_rows)
        self.remap = None
        if self.total_buckets < 1 or self.dim < 1 or not self.offsets:
            raise ValueError(f"SharedEmbedding: need total_buckets >= 1, dim >= 1 and offsets, got "
                             f"{self.total_buckets}, {self.dim}, {self.offsets}")
        if self.kept_rows is not None and not 1 <= self.kept_rows <= self.total_buckets:
            raise ValueError(f"SharedEmbedding: kept_rows must be in [1, total_buckets={self.total_buckets}] "
                             f"or None, got {kept_rows}")

    def build(self, input_shape: Any) -> None:
        rows = self.total_buckets if self.kept_rows is None else self.kept_rows
        init = self.embeddings_initializer
        if self.lr_scale != 1.0:
            base = init
            init = lambda shape, dtype=None: base(shape, dtype=dtype) / self.lr_scale  # noqa: E731
        self.embeddings = self.add_weight(name="embeddings", shape=(rows, self.dim), initializer=init)
        self.remap = None
        if self.kept_rows is not None:  # filled in by the pruner; zeros (all -> row 0) is a valid start
            self.remap = self.add_weight(name="remap", shape=(self.total_buckets,), dtype="int32",
                                         initializer="zeros", trainable=False)

    def _lookup(self, rows: tf.Tensor) -> tf.Tensor:
        """``E[rows]``, through the remap when the vocabulary was pruned."""
        if self.remap is not None:
            rows = tf.gather(self.remap, rows)
        out = tf.gather(self.embeddings, rows)
        return out * self.lr_scale if self.lr_scale != 1.0 else out

    def call(self, inputs: Any) -> Any:
        with_hist = isinstance(inputs, (list, tuple))
        cat = inputs[0] if with_hist else inputs
        offsets = tf.constant(self.offsets, dtype=cat.dtype)
        cat_emb = self._lookup(cat + offsets)
        if not with_hist:
            return cat_emb
        if self.hist_offset is None:
            raise ValueError("SharedEmbedding: got a history but hist_offset is None")
        hist = inputs[1]
        rows = hist + tf.constant(self.hist_offset, hist.dtype) if self.hist_offset else hist
        hist_emb = self._lookup(rows) * tf.expand_dims(_valid_mask(hist, cat_emb.dtype), -1)
        if len(inputs) == 2:
            return cat_emb, hist_emb
        if self.attr_offsets is None:
            raise ValueError("SharedEmbedding: got history attributes but attr_offsets is None")
        attr = inputs[2]                                              # [B, L, F], 0 = unknown / padding
        attr_emb = self._lookup(attr + tf.constant(self.attr_offsets, attr.dtype))
        return cat_emb, hist_emb, attr_emb * tf.expand_dims(_valid_mask(attr, cat_emb.dtype), -1)

    def compute_output_shape(self, input_shape: Any) -> Any:
        if isinstance(input_shape, list) and input_shape and isinstance(input_shape[0], (list, tuple)):
            return tuple(tuple(s) + (self.dim,) for s in input_shape)
        return tuple(input_shape) + (self.dim,)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "total_buckets": self.total_buckets, "dim": self.dim,
                "offsets": list(self.offsets), "hist_offset": self.hist_offset,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "kept_rows": self.kept_rows, "attr_offsets": self.attr_offsets, "lr_scale": self.lr_scale}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SelectFields(keras.layers.Layer):
    """Picks fields of a field tensor ``[B, F, d]``: one ``Gather`` on axis 1.

    ``out = x[:, indices, :]`` (``[B, k, d]``), or ``x[:, i, :]`` (``[B, d]``) when
    ``indices`` is a single integer.
    """

    def __init__(self, indices: int | Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.indices = int(indices) if isinstance(indices, int) else [int(i) for i in indices]

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.gather(inputs, tf.constant(self.indices, tf.int64), axis=1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        if isinstance(self.indices, int):
            return (input_shape[0],) + tuple(input_shape[2:])
        return (input_shape[0], len(self.indices)) + tuple(input_shape[2:])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "indices": self.indices}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CrossLayer(keras.layers.Layer):
    """One cross layer of DCN-v2 (Wang et al., "DCN V2: Improved Deep & Cross Network", WWW 2021).

    ``x_{l+1} = x_0 * (W x_l + b) + x_l``, with ``*`` elementwise.  The code works on
    row vectors (a batch ``[B, D]``), so it computes ``x_l @ kernel`` with ``kernel``
    ``[D, D]``.  With ``rank > 0`` the matrix is low-rank, ``x_l @ V @ U`` with ``V``
    stored ``[D, rank]`` and ``U`` stored ``[rank, D]`` (so ``kernel = V U``), the
    paper's cost-saving "mixture of low-rank" with one expert.

    Takes: ``rank`` (0 = full ``D x D``), ``kernel_initializer``.
    Input ``[x0, xl]``, both ``[B, D]``; output ``[B, D]``.
    """

    def __init__(self, rank: int = 0, kernel_initializer: Any = "glorot_uniform", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank = int(rank)
        if self.rank < 0:
            raise ValueError(f"CrossLayer: rank must be >= 0, got {rank}")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape: Any) -> None:
        d = int(input_shape[0][-1])
        if self.rank:
            self.v = self.add_weight(name="v", shape=(d, self.rank), initializer=self.kernel_initializer)
            self.u = self.add_weight(name="u", shape=(self.rank, d), initializer=self.kernel_initializer)
        else:
            self.kernel = self.add_weight(name="kernel", shape=(d, d), initializer=self.kernel_initializer)
        self.bias = self.add_weight(name="bias", shape=(d,), initializer="zeros")

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        x0, xl = inputs
        if self.rank:
            w_x = tf.matmul(tf.matmul(xl, self.v), self.u)
        else:
            w_x = tf.matmul(xl, self.kernel)
        return x0 * (w_x + self.bias) + xl

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rank": self.rank,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FMInteraction(keras.layers.Layer):
    """Second-order factorization-machine term of DeepFM (Guo et al., IJCAI 2017; Rendle, ICDM 2010).

    For field embeddings ``v_1..v_F`` (input ``[B, F, k]``)::

        fm = sum_{i<j} <v_i, v_j> = 0.5 * sum_k ((sum_i v_ik)^2 - sum_i v_ik^2)

    Output ``[B, 1]``.
    """

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        square_of_sum = tf.square(tf.reduce_sum(inputs, axis=1))
        sum_of_square = tf.reduce_sum(tf.square(inputs), axis=1)
        return 0.5 * tf.reduce_sum(square_of_sum - sum_of_square, axis=1, keepdims=True)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], 1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DenseFieldEmbedding(keras.layers.Layer):
    """Turns each (transformed) dense value into a field embedding, as in DeepFM/FM.

    ``e_j = x_j * v_j`` with one learned vector ``v_j`` (``[dim]``) per dense column,
    so the FM term treats a numeric feature like a weighted one-hot field
    (Rendle, "Factorization Machines", ICDM 2010).  Input ``[B, n]``; output ``[B, n, dim]``.
    """

    def __init__(self, dim: int, embeddings_initializer: Any = "uniform", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dim = int(dim)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)

    def build(self, input_shape: Any) -> None:
        self.embeddings = self.add_weight(name="embeddings", shape=(int(input_shape[-1]), self.dim),
                                          initializer=self.embeddings_initializer)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return tf.expand_dims(inputs, -1) * self.embeddings

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], input_shape[1], self.dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "dim": self.dim,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer)}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedMeanPooling(keras.layers.Layer):
    """Mean of the valid history embeddings (YouTube DNN's "average of watches", Covington et al. 2016).

    ``out_b = sum_t m_bt e_bt / max(1, sum_t m_bt)``, ``m_bt = 1{ids_bt != 0}``;
    an empty history gives the zero vector.  Input ``[seq [B, L, d], ids [B, L]]``;
    output ``[B, d]``.
    """

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        seq, ids = inputs
        mask = _valid_mask(ids, seq.dtype)
        total = tf.reduce_sum(seq * tf.expand_dims(mask, -1), axis=1)
        count = tf.maximum(tf.reduce_sum(mask, axis=1, keepdims=True), 1.0)
        return total / count

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0][0], input_shape[0][2])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedMaxPooling(keras.layers.Layer):
    """Max over the valid positions of a sequence, e.g. a Conv1D output ``[B, L, c]``.

    ``out_bc = max_{t: ids_bt != 0} x_btc``, and 0 for a row with no valid position.
    Input ``[x, ids]`` (masked) or ``x`` alone (plain max over axis 1); output ``[B, c]``.
    """

    def call(self, inputs: Any) -> tf.Tensor:
        if not isinstance(inputs, (list, tuple)):
            return tf.reduce_max(inputs, axis=1)
        x, ids = inputs
        valid = tf.expand_dims(tf.not_equal(ids, tf.zeros([], ids.dtype)), -1)
        best = tf.reduce_max(tf.where(valid, x, tf.constant(_NEG_LARGE, x.dtype)), axis=1)
        any_valid = tf.reduce_any(valid, axis=1)
        return tf.where(any_valid, best, tf.zeros([], best.dtype))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        shape = input_shape[0] if isinstance(input_shape, list) else input_shape
        return (shape[0], shape[2])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TargetAttention(keras.layers.Layer):
    """DIN target attention of the history against the candidate item.

    Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
    With query ``q`` (candidate item embedding, ``[B, d]``) and history embeddings
    ``k_t`` (``[B, L, d]``)::

        s_t = MLP([q, k_t, q - k_t, q * k_t])           (hidden units, then 1 linear)
        a_t = m_t * softmax_{t: m_t = 1}(s_t)            m_t = 1{ids_t != 0}
        out = sum_t a_t k_t                               -> [B, d]

    Unlike DIN's unnormalised weights the scores are softmax-normalised over the
    valid positions (stable for long histories); an empty history gives exactly 0.
    Input ``[query, keys, ids]``.

    Takes: ``units`` (hidden sizes of the scoring MLP), ``activation``.
    """

    def __init__(self, units: Sequence[int] = (32,), activation: str = "relu", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = [int(u) for u in units]
        self.activation = activation
        self._act = keras.activations.get(activation)

    def build(self, input_shape: Any) -> None:
        _build_scorer(self, 4 * int(input_shape[0][-1]))

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        query, keys, ids = inputs
        q = tf.broadcast_to(tf.expand_dims(query, 1), tf.shape(keys))
        h = tf.concat([q, keys, q - keys, q * keys], axis=-1)  # [B, L, 4d]
        h = _score(self, h)
        scores = tf.squeeze(h, -1)  # [B, L]
        valid = tf.not_equal(ids, tf.zeros([], ids.dtype))
        scores = tf.where(valid, scores, tf.constant(_NEG_LARGE, scores.dtype))
        weights = tf.nn.softmax(scores, axis=-1) * tf.cast(valid, scores.dtype)
        return tf.reduce_sum(tf.expand_dims(weights, -1) * keys, axis=1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": list(self.units), "activation": self.activation}


#: recency buckets of the history: the i-th most recent item (0 = the latest) falls in bucket
#: ``sum(i >= e for e in RECENCY_EDGES)``: 0, 1, 2, 3-4, 5-9, 10+
RECENCY_EDGES = (1, 2, 3, 5, 10)


def recency_buckets(max_len: int) -> list[int]:
    """Bucket of each recency ``0..max_len-1`` (0 = the most recent item), see :data:`RECENCY_EDGES`."""
    return [sum(r >= e for e in RECENCY_EDGES) for r in range(max_len)]


def _recency_onehot(ids: tf.Tensor, n_buckets_of: Sequence[int], dtype: tf.DType) -> tf.Tensor:
    """``[B, L, R]``: one-hot recency bucket of each valid position (rows of padding are all 0).

    The history is oldest first and left-aligned (padding after the last item), so
    position ``t`` of a row with ``n`` items has recency ``n - 1 - t``.
    """
    valid = _valid_mask(ids, dtype)                                      # [B, L]
    n = tf.reduce_sum(valid, axis=1, keepdims=True)                      # [B, 1]
    length = len(n_buckets_of)
    recency = n - 1.0 - tf.range(length, dtype=dtype)[None, :]           # [B, L]
    rec_idx = tf.cast(tf.clip_by_value(recency, 0.0, float(length - 1)), tf.int64)
    table = tf.constant(list(n_buckets_of), dtype=tf.int64)
    bucket = tf.gather(table, rec_idx)                                   # [B, L]
    n_buckets = max(n_buckets_of) + 1
    return tf.one_hot(bucket, n_buckets, dtype=dtype) * tf.expand_dims(valid, -1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ItemAttributes(keras.layers.Layer):
    """The attributes (category, brand, shop, ...) of the history's items, from a lookup table.

    The history carries item ids only; what an item *is* lives in the candidate
    rows, where the item id and its item-side fields come together.  ``table``
    (non-trainable int32 ``[item_buckets, F]``) holds, for each item bucket, the
    bucket id of each of its ``F`` attribute fields (0 = unknown), filled from the
    **training rows** by :func:`ctredge.vocab.item_attribute_table` before
    training; it travels with the model (an ONNX initializer), so serving needs
    no extra input.  ``out[b, t, f] = table[hist[b, t], f]``; padding (id 0)
    gives 0.  Input int ``[B, L]``; output int64 ``[B, L, F]``.
    """

    def __init__(self, buckets: int, n_fields: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buckets, self.n_fields = int(buckets), int(n_fields)
        if self.buckets < 1 or self.n_fields < 1:
            raise ValueError(f"ItemAttributes: need buckets >= 1 and n_fields >= 1, got {buckets}, {n_fields}")

    def build(self, input_shape: Any) -> None:
        self.table = self.add_weight(name="table", shape=(self.buckets, self.n_fields), dtype="int32",
                                     initializer="zeros", trainable=False)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.gather(self.table, ids), tf.int64)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape) + (self.n_fields,)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "buckets": self.buckets, "n_fields": self.n_fields}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HistoryMatch(keras.layers.Layer):
    """Explicit matches of the candidate against its history, by recency: the "have they just looked at this" signal.

    For the candidate's item id and each attribute (input ``cand`` ``[B, G]``,
    column 0 the item) and the history's ids with the same columns (the item ids
    ``hist`` ``[B, L]`` and, when ``G > 1``, their attributes ``attr`` ``[B, L, G-1]``
    from :class:`ItemAttributes`; 0 = padding or unknown)::

        eq[b, t, g]   = 1{hist[b, t, g] == cand[b, g] != 0}
        count[b, r, g] = sum_t eq[b, t, g] * 1{recency bucket of t is r}      (RECENCY_EDGES)
        out = [log(1 + count) (R*G), sum_t eq / max(1, n) (G), log(1 + n)]

    with ``n`` the history's length.  These are the features hand-built CTR systems
    feed a linear model ("candidate's category in the last k items"); a model with
    only embeddings has to learn equality from data, which it does poorly for
    thousands of ids.  Input ``[cand, hist]`` or ``[cand, hist, attr]``; output
    float ``[B, R*G + G + 1]``.
    """

    def __init__(self, max_len: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_len = int(max_len)
        self.buckets = recency_buckets(self.max_len)

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        cand, item_ids = inputs[0], inputs[1]                   # [B, G], [B, L]
        hist = tf.expand_dims(item_ids, -1)
        if len(inputs) == 3:                                    # + attributes [B, L, G - 1]
            hist = tf.concat([hist, tf.cast(inputs[2], hist.dtype)], axis=-1)
        cand = tf.cast(cand, hist.dtype)
        valid = _valid_mask(item_ids, tf.float32)               # [B, L]
        known = tf.not_equal(cand, tf.zeros([], cand.dtype))[:, None, :]
        eq = tf.cast(tf.logical_and(tf.equal(hist, cand[:, None, :]), known), tf.float32)
        eq = eq * tf.expand_dims(valid, -1)                     # [B, L, G]
        onehot = _recency_onehot(item_ids, self.buckets, tf.float32)   # [B, L, R]
        counts = tf.einsum("btr,btg->brg", onehot, eq)
        n = tf.reduce_sum(valid, axis=1, keepdims=True)
        frac = tf.reduce_sum(eq, axis=1) / tf.maximum(n, 1.0)
        flat = tf.reshape(tf.math.log(1.0 + counts), [-1, counts.shape[1] * counts.shape[2]])
        return tf.concat([flat, frac, tf.math.log(1.0 + n)], axis=-1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        g = int(input_shape[0][-1])
        return (input_shape[0][0], (max(self.buckets) + 1) * g + g + 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "max_len": self.max_len}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RecencyAttention(keras.layers.Layer):
    """DIN target attention whose scores also see each history item's recency.

    Zhou et al., "Deep Interest Network", KDD 2018, with the time-aware scoring of
    e.g. Alibaba's DSIN/BST (position embeddings of the behaviour sequence).  With
    query ``q`` ``[B, D]`` (candidate item + attribute embeddings), keys ``k_t``
    ``[B, L, D]`` (history items + their attributes) and ``p_t`` a learned
    embedding ``[recency_dim]`` of position ``t``'s recency bucket::

        s_t = MLP([q, k_t, q - k_t, q * k_t, p_t])
        a_t = m_t * softmax_{t: m_t = 1}(s_t)          m_t = 1{ids_t != 0}
        out = [sum_t a_t k_t,  sum_t m_t sigmoid(s_t) k_t / L]     -> [B, 2D]

    The second half is DIN's unnormalised sum (how *much* related history there
    is), scaled by ``1/L`` to stay in range; an empty history gives exactly 0.
    Input ``[query, keys, ids]``.
    """

    def __init__(self, units: Sequence[int] = (32,), recency_dim: int = 8, max_len: int = 20,
                 activation: str = "relu", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = [int(u) for u in units]
        self.recency_dim, self.max_len = int(recency_dim), int(max_len)
        self.activation = activation
        self._act = keras.activations.get(activation)
        self.buckets = recency_buckets(self.max_len)

    def build(self, input_shape: Any) -> None:
        d = int(input_shape[0][-1])
        width = 4 * d + self.recency_dim
        if self.recency_dim:
            self.recency = self.add_weight(name="recency", shape=(max(self.buckets) + 1, self.recency_dim),
                                           initializer="uniform")
        _build_scorer(self, width)

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        query, keys, ids = inputs
        q = tf.broadcast_to(tf.expand_dims(query, 1), tf.shape(keys))
        parts = [q, keys, q - keys, q * keys]
        if self.recency_dim:
            onehot = _recency_onehot(ids, self.buckets, keys.dtype)               # [B, L, R]
            parts.append(tf.einsum("blr,rp->blp", onehot, self.recency))
        h = tf.concat(parts, axis=-1)
        h = _score(self, h)
        scores = tf.squeeze(h, -1)                                               # [B, L]
        valid = tf.not_equal(ids, tf.zeros([], ids.dtype))
        fvalid = tf.cast(valid, scores.dtype)
        masked = tf.where(valid, scores, tf.constant(_NEG_LARGE, scores.dtype))
        weights = tf.nn.softmax(masked, axis=-1) * fvalid
        gates = tf.sigmoid(scores) * fvalid / float(self.max_len)
        pooled = tf.reduce_sum(tf.expand_dims(weights, -1) * keys, axis=1)
        summed = tf.reduce_sum(tf.expand_dims(gates, -1) * keys, axis=1)
        return tf.concat([pooled, summed], axis=-1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0][0], 2 * int(input_shape[0][-1]))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": list(self.units), "recency_dim": self.recency_dim,
                "max_len": self.max_len, "activation": self.activation}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DenseBuckets(keras.layers.Layer):
    """Each dense value's quantile bucket, embedded: the numeric features as categorical fields.

    ``edges`` (non-trainable ``[n, k]``, ascending per feature) are quantiles of
    the **training rows** (filled by :func:`ctredge.vocab.quantile_edges` before
    training); bucket ``0`` is "missing" (NaN), bucket ``1 + #{edges <= x}`` any
    other value, so each feature has ``k + 2`` rows of its own in ``embeddings``::

        b_j = 0 if x_j is NaN else 1 + sum_i 1{x_j >= edges[j, i]}
        out[:, j] = embeddings[j * (k + 2) + b_j]                      -> [B, n, dim]

    What the Criteo winners did to counts (binning, Juan et al. 2016) and what
    the hashed-LR baseline does; a raw log count only allows a monotone effect
    per layer.  Input float ``[B, n]`` (raw, NaN = missing); output ``[B, n, dim]``.
    """

    def __init__(self, n_features: int, n_edges: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_features, self.n_edges, self.dim = int(n_features), int(n_edges), int(dim)
        if min(self.n_features, self.n_edges, self.dim) < 1:
            raise ValueError(f"DenseBuckets: need n_features, n_edges, dim >= 1, got "
                             f"{n_features}, {n_edges}, {dim}")

    def build(self, input_shape: Any) -> None:
        self.edges = self.add_weight(name="edges", shape=(self.n_features, self.n_edges), initializer="zeros",
                                     trainable=False)
        self.embeddings = self.add_weight(name="embeddings", shape=(self.n_features * (self.n_edges + 2), self.dim),
                                          initializer="uniform")

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        x = tf.convert_to_tensor(inputs)
        missing = tf.math.is_nan(x)
        x0 = tf.where(missing, tf.zeros([], x.dtype), x)
        above = tf.cast(tf.expand_dims(x0, -1) >= tf.cast(self.edges, x.dtype), tf.int64)     # [B, n, k]
        bucket = tf.where(missing, tf.zeros([], tf.int64), 1 + tf.reduce_sum(above, axis=-1))
        rows = bucket + tf.range(self.n_features, dtype=tf.int64) * (self.n_edges + 2)
        return tf.gather(self.embeddings, rows)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], self.n_features, self.dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "n_features": self.n_features, "n_edges": self.n_edges, "dim": self.dim}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class VocabularyMatch(keras.layers.Layer):
    """Whether two categorical fields of the same vocabulary hold the same value, per row.

    For each pair ``(i, j)`` (fields whose ``CatFeature.vocabulary`` is the same,
    e.g. the search query's category and the candidate's category)::

        out[b, p] = 1{cat[b, i] == cat[b, j] != 0}                  -> [B, P]

    The relevance signal of a search query for a candidate, which embeddings of
    two different fields would have to learn as a 300 x 300 diagonal.
    Takes ``pairs``; input int ``[B, n_cat]``; output float ``[B, P]``.
    """

    def __init__(self, pairs: Sequence[Sequence[int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pairs = [[int(a), int(b)] for a, b in pairs]
        if not self.pairs:
            raise ValueError("VocabularyMatch: expected at least one pair of fields")

    def call(self, cat: tf.Tensor) -> tf.Tensor:
        left = tf.gather(cat, tf.constant([a for a, _ in self.pairs], tf.int64), axis=1)
        right = tf.gather(cat, tf.constant([b for _, b in self.pairs], tf.int64), axis=1)
        same = tf.logical_and(tf.equal(left, right), tf.not_equal(left, tf.zeros([], left.dtype)))
        return tf.cast(same, tf.float32)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], len(self.pairs))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "pairs": [list(p) for p in self.pairs]}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WideLogit(keras.layers.Layer):
    """The "wide" part of wide & deep: a logistic regression inside the graph, fitted before the deep part.

    One weight per categorical id, per hashed pair of ids and per dense quantile
    bucket, plus a linear weight per match feature and a bias::

        cols[b]  = [offsets[j] + cat[b, j]                             for each field j]
                 + [T + (cat[b, i] * K1 + cat[b, j] * K2 + (p+1) * K3) mod H   for each pair p = (i, j)]
                 + [T + H + j * (k + 2) + bucket_j(dense[b, j])         for each dense feature j]
        out[b]   = sum(table[cols[b]]) + matches[b] . match_w + bias            -> [B, 1]

    with ``T`` the spec's total buckets, ``H`` = ``buckets`` rows of crosses, ``k``
    quantile edges per dense feature (bucket 0 = NaN, ``1 + #{edges <= x}``
    otherwise, as :class:`DenseBuckets`), and fixed odd multipliers ``K1 =
    1_000_003``, ``K2 = 8_191``, ``K3 = 104_729``: ids are below 2**31, so every
    term stays far below 2**63 and TensorFlow and ONNX Runtime compute the same
    int64 rows.  Every weight is **non-trainable**: :func:`ctredge.train.wide.fit_wide`
    fits them as an L2 logistic regression on the training rows (the strength
    chosen on the valid rows) before the deep part trains, so the deep part learns
    what a hashed logistic regression misses (the residual), and SGD's one epoch,
    which moves a rare id's weight by about one learning rate per sighting, never
    has to learn main effects and crosses from a few rows each.

    Takes ``offsets`` (per field), ``total_buckets``, ``pairs``, ``buckets``,
    ``n_dense``, ``n_edges``, ``n_match`` (0 = no matches input).  Inputs
    ``[cat int [B, n_cat], dense float [B, n_dense]]`` (+ ``matches float [B, n_match]``).
    """

    K1, K2, K3 = 1_000_003, 8_191, 104_729

    def __init__(self, offsets: Sequence[int], total_buckets: int, pairs: Sequence[Sequence[int]], buckets: int,
                 n_dense: int, n_edges: int, n_match: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offsets = [int(o) for o in offsets]
        self.total_buckets = int(total_buckets)
        self.pairs = [[int(a), int(b)] for a, b in pairs]
        self.buckets = int(buckets) if self.pairs else 0
        self.n_dense, self.n_edges, self.n_match = int(n_dense), int(n_edges), int(n_match)
        if not self.offsets or self.total_buckets < 1 or self.n_edges < 1 or min(self.n_dense, self.n_match) < 0:
            raise ValueError(f"WideLogit: need offsets, total_buckets >= 1, n_edges >= 1, n_dense/n_match >= 0; "
                             f"got {len(self.offsets)} offsets, {total_buckets}, {n_edges}, {n_dense}, {n_match}")
        if self.pairs and self.buckets < 1:
            raise ValueError(f"WideLogit: crosses need buckets >= 1, got {buckets}")

    @property
    def n_rows(self) -> int:
        """Rows of the weight table: ids, crosses, dense buckets."""
        return self.total_buckets + self.buckets + self.n_dense * (self.n_edges + 2)

    def build(self, input_shape: Any) -> None:
        fixed = dict(initializer="zeros", trainable=False)
        self.table = self.add_weight(name="table", shape=(self.n_rows, 1), **fixed)
        self.edges = self.add_weight(name="edges", shape=(max(self.n_dense, 1), self.n_edges), **fixed)
        self.match_w = self.add_weight(name="match_w", shape=(max(self.n_match, 1), 1), **fixed)
        self.bias = self.add_weight(name="bias", shape=(1,), **fixed)

    def columns(self, cat: tf.Tensor, dense: tf.Tensor | None) -> tf.Tensor:
        """``[B, n_cat + P + n_dense]`` int64 rows of ``table`` (the formula above)."""
        cat = tf.cast(cat, tf.int64)
        parts = [cat + tf.constant(self.offsets, tf.int64)]
        if self.pairs:
            left = tf.gather(cat, tf.constant([a for a, _ in self.pairs], tf.int64), axis=1)
            right = tf.gather(cat, tf.constant([b for _, b in self.pairs], tf.int64), axis=1)
            salt = tf.constant([(p + 1) * self.K3 for p in range(len(self.pairs))], tf.int64)
            h = tf.math.floormod(left * self.K1 + right * self.K2 + salt, tf.constant(self.buckets, tf.int64))
            parts.append(h + self.total_buckets)
        if self.n_dense:
            x = tf.convert_to_tensor(dense)
            missing = tf.math.is_nan(x)
            x0 = tf.where(missing, tf.zeros([], x.dtype), x)
            above = tf.cast(tf.expand_dims(x0, -1) >= tf.cast(self.edges, x.dtype), tf.int64)   # [B, n, k]
            bucket = tf.where(missing, tf.zeros([], tf.int64), 1 + tf.reduce_sum(above, axis=-1))
            base = self.total_buckets + self.buckets
            parts.append(bucket + base + tf.range(self.n_dense, dtype=tf.int64) * (self.n_edges + 2))
        return tf.concat(parts, axis=1)

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        cat, dense = inputs[0], (inputs[1] if self.n_dense else None)
        out = tf.reduce_sum(tf.gather(self.table[:, 0], self.columns(cat, dense)), axis=1, keepdims=True)
        if self.n_match:
            out = out + tf.matmul(tf.cast(inputs[-1], tf.float32), self.match_w)
        return out + self.bias

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0][0], 1)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "offsets": self.offsets, "total_buckets": self.total_buckets,
                "pairs": [list(p) for p in self.pairs], "buckets": self.buckets, "n_dense": self.n_dense,
                "n_edges": self.n_edges, "n_match": self.n_match}
