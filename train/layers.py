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

    Takes: ``total_buckets``, ``dim``, ``offsets`` (one per cat feature),
    ``hist_offset`` (None when there is no history), ``embeddings_initializer``,
    ``kept_rows`` (None = no remap, the table has ``total_buckets`` rows).
    Input ``cat`` int ``[B, n_cat]`` or ``[cat, hist]``; output the embedding(s).
    """

    def __init__(self, total_buckets: int, dim: int, offsets: Sequence[int], hist_offset: int | None = None,
                 embeddings_initializer: Any = "uniform", kept_rows: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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
        self.embeddings = self.add_weight(name="embeddings", shape=(rows, self.dim),
                                          initializer=self.embeddings_initializer)
        self.remap = None
        if self.kept_rows is not None:  # filled in by the pruner; zeros (all -> row 0) is a valid start
            self.remap = self.add_weight(name="remap", shape=(self.total_buckets,), dtype="int32",
                                         initializer="zeros", trainable=False)

    def _lookup(self, rows: tf.Tensor) -> tf.Tensor:
        """``E[rows]``, through the remap when the vocabulary was pruned."""
        if self.remap is not None:
            rows = tf.gather(self.remap, rows)
        return tf.gather(self.embeddings, rows)

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
        return cat_emb, hist_emb

    def compute_output_shape(self, input_shape: Any) -> Any:
        if isinstance(input_shape, list) and input_shape and isinstance(input_shape[0], (list, tuple)):
            return tuple(tuple(s) + (self.dim,) for s in input_shape)
        return tuple(input_shape) + (self.dim,)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "total_buckets": self.total_buckets, "dim": self.dim,
                "offsets": list(self.offsets), "hist_offset": self.hist_offset,
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
                "kept_rows": self.kept_rows}


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
        width = 4 * int(input_shape[0][-1])
        self.kernels, self.biases = [], []
        for i, u in enumerate(self.units + [1]):
            self.kernels.append(self.add_weight(name=f"kernel_{i}", shape=(width, u), initializer="glorot_uniform"))
            self.biases.append(self.add_weight(name=f"bias_{i}", shape=(u,), initializer="zeros"))
            width = u

    def call(self, inputs: Sequence[tf.Tensor]) -> tf.Tensor:
        query, keys, ids = inputs
        q = tf.broadcast_to(tf.expand_dims(query, 1), tf.shape(keys))
        h = tf.concat([q, keys, q - keys, q * keys], axis=-1)  # [B, L, 4d]
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            h = tf.matmul(h, kernel) + bias
            if i < len(self.units):
                h = self._act(h)
        scores = tf.squeeze(h, -1)  # [B, L]
        valid = tf.not_equal(ids, tf.zeros([], ids.dtype))
        scores = tf.where(valid, scores, tf.constant(_NEG_LARGE, scores.dtype))
        weights = tf.nn.softmax(scores, axis=-1) * tf.cast(valid, scores.dtype)
        return tf.reduce_sum(tf.expand_dims(weights, -1) * keys, axis=1)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[0])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "units": list(self.units), "activation": self.activation}
