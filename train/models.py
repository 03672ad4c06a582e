"""CTR model architectures: DCN-v2, DeepFM and our behaviour-sequence model "seed".

:func:`build_model` turns a :class:`~ctredge.features.FeatureSpec` and a
:class:`ModelConfig` into a Keras 3 functional model whose inputs are named as
``spec.input_signature()`` says (``dense`` float32 ``[B, n_dense]``, ``cat`` int64
``[B, n_cat]``, ``hist`` int64 ``[B, L]``; each only when the spec has it) and
whose one output, ``ctr``, is the float32 click probability ``[B, 1]``.  Call it
with a feed dict ``{"dense": ..., "cat": ..., "hist": ...}``.

Shared by every architecture: the dense transform (signed log1p / identity, NaN
filled by a learned value) and one shared embedding table for all categorical
features and the history (see :mod:`ctredge.train.layers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ctredge.errors import ConfigError
from ctredge.features import INPUT_CAT, INPUT_DENSE, INPUT_HIST, OUTPUT_CTR, FeatureSpec
from ctredge.train import layers as L

MODELS = ("dcnv2", "deepfm", "seed")
HISTORY_POOLINGS = ("attention", "mean")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture settings (saved as ``model_config.json``); defaults suit 2 CPU cores.

    ``model``: ``dcnv2`` | ``deepfm`` | ``seed``.  ``embedding_dim``: width of every
    embedding row.  ``cross_layers`` / ``cross_rank`` (0 = full matrix): DCN-v2's
    cross network.  ``mlp_units``: the deep tower of dcnv2 and deepfm.  ``dropout``:
    after each hidden layer.  ``history_pooling``: ``attention`` (DIN) or ``mean``,
    for dcnv2 and deepfm.  ``attention_units``: DIN's scoring MLP.
    ``conv_filters`` / ``conv_kernel`` / ``seed_mlp``: the seed model.
    ``missing_indicator``: append a 0/1 "was NaN" column per dense feature.
    ``vocab_rows``: physical rows of the shared embedding table(s) after vocabulary
    pruning (0 = every bucket has its own row, no remap; see ``SharedEmbedding``).
    ``history_attributes``: look up the history items' item-side fields (category,
    brand, ...) in a table filled from the training rows (``ItemAttributes``), so
    the history is embedded with them.  ``history_match``: explicit matches of
    the candidate (item and attributes) against the history by recency
    (``HistoryMatch``).  ``recency_dim``: width of the recency embedding in the
    attention scores (0 = none).  All three need a history; without one they are ignored.
    ``dense_norm``: batch-normalise the transformed dense values.  ``dense_buckets``:
    also embed each dense value's quantile bucket (that many edges, from the
    training rows; 0 = off), see ``DenseBuckets``.  ``embedding_lr_scale``: the
    embedding tables learn at this multiple of the learning rate (``SharedEmbedding``).
    ``vocabulary_match``: for fields sharing a vocabulary (``CatFeature.vocabulary``),
    a 0/1 "same value" feature per pair (``VocabularyMatch``).
    ``wide``: add a wide part to the logit, a hashed logistic regression over every
    id, every pair of fields (hashed into ``wide_buckets`` rows), ``wide_edges``
    quantile buckets per dense value and the match features (``WideLogit``), fitted
    on the training rows before the deep part trains (:mod:`ctredge.train.wide`);
    the logit layers then start at zero, so training starts from the regression.
    ``wide_pairs``: which pairs of fields the wide part crosses, as indices into
    :func:`field_pairs` (None = every pair); ``wide_select``: ``ctredge train``
    chooses them on the valid rows (:func:`ctredge.train.wide.select_pairs`) and
    records them here, so the saved config rebuilds the same graph.
    ``text_rows`` / ``text_proj``: with text features in the spec, the rows of the
    title table (distinct training titles + 1, set by ``ctredge train``) and the
    width of each text projection, ``text_cos_scale`` what the query-title cosine is
    multiplied by before the model sees it (:mod:`ctredge.train.text`).

    Raises:
        ConfigError: a value out of range or of the wrong type.
    """

    model: str = "dcnv2"
    embedding_dim: int = 16
    cross_layers: int = 3
    cross_rank: int = 0
    mlp_units: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    history_pooling: str = "attention"
    attention_units: tuple[int, ...] = (32,)
    conv_filters: int = 32
    conv_kernel: int = 3
    seed_mlp: tuple[int, ...] = (128, 64)
    missing_indicator: bool = False
    vocab_rows: int = 0
    history_attributes: bool = True
    history_match: bool = True
    recency_dim: int = 8
    dense_norm: bool = False
    dense_buckets: int = 0
    embedding_lr_scale: float = 1.0
    vocabulary_match: bool = True
    wide: bool = True
    wide_buckets: int = 2 ** 18
    wide_edges: int = 15
    wide_select: bool = True
    wide_pairs: tuple[int, ...] | None = None
    text_rows: int = 0
    text_proj: int = 16
    text_cos_scale: float = 10.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"model: expected one of {MODELS}, got {self.model!r}")
        if self.history_pooling not in HISTORY_POOLINGS:
            raise ConfigError(f"history_pooling: expected one of {HISTORY_POOLINGS}, got {self.history_pooling!r}")
        _check_int("embedding_dim", self.embedding_dim, 1)
        _check_int("cross_layers", self.cross_layers, 0)
        _check_int("cross_rank", self.cross_rank, 0)
        _check_int("conv_filters", self.conv_filters, 1)
        _check_int("conv_kernel", self.conv_kernel, 1)
        _check_int("vocab_rows", self.vocab_rows, 0)
        _check_int("recency_dim", self.recency_dim, 0)
        _check_int("dense_buckets", self.dense_buckets, 0)
        _check_int("wide_buckets", self.wide_buckets, 0)
        _check_int("wide_edges", self.wide_edges, 1)
        _check_int("text_rows", self.text_rows, 0)
        _check_int("text_proj", self.text_proj, 1)
        if (isinstance(self.text_cos_scale, bool) or not isinstance(self.text_cos_scale, (int, float))
                or not 0 < self.text_cos_scale <= 1000):
            raise ConfigError(f"text_cos_scale: expected a number in (0, 1000], got {self.text_cos_scale!r}")
        if (isinstance(self.embedding_lr_scale, bool) or not isinstance(self.embedding_lr_scale, (int, float))
                or not 0 < self.embedding_lr_scale <= 100):
            raise ConfigError(f"embedding_lr_scale: expected a number in (0, 100], got {self.embedding_lr_scale!r}")
        if self.wide_pairs is not None:
            if (isinstance(self.wide_pairs, (str, bytes)) or not isinstance(self.wide_pairs, (tuple, list))
                    or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.wide_pairs)
                    or len(set(self.wide_pairs)) != len(self.wide_pairs)):
                raise ConfigError(f"wide_pairs: expected null or a list of distinct pair indices >= 0, "
                                  f"got {self.wide_pairs!r}")
            object.__setattr__(self, "wide_pairs", tuple(sorted(self.wide_pairs)))
        for name in ("history_attributes", "history_match", "dense_norm", "vocabulary_match", "wide", "wide_select"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        for name, allow_empty in (("mlp_units", True), ("attention_units", True), ("seed_mlp", False)):
            object.__setattr__(self, name, _check_units(name, getattr(self, name), allow_empty))
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.missing_indicator, bool):
            raise ConfigError(f"missing_indicator: expected true or false, got {self.missing_indicator!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _check_units(name: str, value: Any, allow_empty: bool) -> tuple[int, ...]:
    """Layer widths as a tuple of positive ints (a JSON list is accepted)."""
    what = "a list of integers >= 1" + ("" if allow_empty else " (at least one)")
    if not isinstance(value, (tuple, list)) or (not value and not allow_empty):
        raise ConfigError(f"{name}: expected {what}, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ConfigError(f"{name}: expected {what}, got {value!r}")
    return tuple(int(v) for v in value)


# ------------------------------------------------------------------ layer names other stages rely on
#: the logit layer of every architecture (deepfm's is the Add of its three logits); dcnv2's and seed's is the
#: Dense after the MLP, to which MATCH_LOGIT is added when the model has match features
LOGIT = "logit"
#: deepfm's deep-part logit, fed by the last hidden layer of its MLP
DEEP_LOGIT = "deep_logit"
#: DCN-v2's i-th cross layer is named CROSS_LAYER.format(i)
CROSS_LAYER = "cross_{}"
#: the ItemAttributes layer, whose table train/train.py fills from the training rows
HISTORY_ATTRIBUTES = "history_attributes"
#: the HistoryMatch layer
HISTORY_MATCH = "history_match"
#: the linear logit of the match features, added to LOGIT before the sigmoid (dcnv2, seed)
MATCH_LOGIT = "match_logit"
#: the VocabularyMatch layer
VOCABULARY_MATCH = "vocabulary_match"
#: the WideLogit layer (ModelConfig.wide), fitted by ctredge.train.wide.fit_wide before the deep part trains
WIDE_LOGIT = "wide_logit"
#: the DenseBuckets layer, whose edges train/train.py fills from the training rows
DENSE_BUCKETS = "dense_buckets"


@dataclass(frozen=True)
class MlpChain:
    """The deep MLP of a model: its ModelConfig field, hidden widths, hidden layer names and next layer's name.

    Structured pruning (``ctredge.compress.prune``) removes hidden units along this
    chain; the names are the ones :func:`build_model` gives, so they cannot drift.
    """

    field: str
    units: tuple[int, ...]
    hidden: tuple[str, ...]
    next_layer: str


def mlp_chain(cfg: "ModelConfig") -> MlpChain:
    """The :class:`MlpChain` that :func:`build_model` builds for ``cfg``."""
    if cfg.model == "seed":
        field_name, units, prefix, nxt = "seed_mlp", cfg.seed_mlp, "seed", LOGIT
    else:
        field_name, units, prefix = "mlp_units", cfg.mlp_units, "deep"
        nxt = LOGIT if cfg.model == "dcnv2" else DEEP_LOGIT
    return MlpChain(field_name, tuple(units), tuple(_dense_name(prefix, i) for i in range(len(units))), nxt)


def _dense_name(prefix: str, i: int) -> str:
    return f"{prefix}_dense_{i}"


# ------------------------------------------------------------------ building blocks
def _mlp(x: Any, units: tuple[int, ...], dropout: float, prefix: str) -> Any:
    for i, u in enumerate(units):
        x = keras.layers.Dense(u, activation="relu", name=_dense_name(prefix, i))(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"{prefix}_dropout_{i}")(x)
    return x


def _start(cfg: ModelConfig) -> dict[str, Any]:
    """The logit layers' initializer: zeros with a wide part, so training starts from the fitted regression."""
    return {"kernel_initializer": "zeros"} if cfg.wide else {}


def _concat(parts: list[Any], name: str, axis: int = -1) -> Any:
    return parts[0] if len(parts) == 1 else keras.layers.Concatenate(axis=axis, name=name)(parts)


def vocabulary_pairs(spec: FeatureSpec) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of categorical fields that share a vocabulary."""
    cat = spec.cat
    return [(i, j) for i in range(len(cat)) for j in range(i + 1, len(cat)) if cat[i].hash_name == cat[j].hash_name]


def attribute_fields(spec: FeatureSpec) -> list[int]:
    """The item-side categorical fields other than the item id: what ``ItemAttributes`` looks up."""
    item = spec.item_feature_index
    if spec.history is None or item is None:
        return []
    return [j for j in spec.columns("cat", "item") if j != item]


class _Features:
    """The model's inputs and the tensors every architecture starts from."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig) -> None:
        self.spec = spec
        self.text = None  # [B, 1 + 3 p]: ctredge.train.text.text_vector, set by build_model
        self.inputs: dict[str, Any] = {
            name: keras.Input(shape=shape[1:], dtype=dtype, name=name)
            for name, (dtype, shape) in spec.input_signature().items()
        }
        self.dense = None  # [B, n_dense(*2)]
        if spec.dense:
            self.dense = L.DenseTransform([f.transform for f in spec.dense], cfg.missing_indicator,
                                          name="dense_transform")(self.inputs[INPUT_DENSE])
            if cfg.dense_norm:
                self.dense = keras.layers.BatchNormalization(name="dense_norm")(self.dense)
        self.dense_emb = None  # [B, n_dense, d]
        if spec.dense and cfg.dense_buckets:
            self.dense_emb = L.DenseBuckets(spec.n_dense, cfg.dense_buckets, cfg.embedding_dim,
                                            name=DENSE_BUCKETS)(self.inputs[INPUT_DENSE])
        self.cat_emb = self.hist_emb = self.hist_ids = self.item_emb = None
        self.attr_ids = self.attr_emb = None
        self.attrs = attribute_fields(spec) if cfg.history_attributes else []
        if spec.cat:
            item = spec.item_feature_index
            table = L.SharedEmbedding(spec.total_buckets, cfg.embedding_dim, spec.offsets.tolist(),
                                      hist_offset=None if item is None else int(spec.offsets[item]),
                                      kept_rows=cfg.vocab_rows or None,
                                      attr_offsets=[int(spec.offsets[j]) for j in self.attrs] or None,
                                      lr_scale=cfg.embedding_lr_scale, name="embedding")
            if spec.history is None:
                self.cat_emb = table(self.inputs[INPUT_CAT])  # [B, n_cat, d]
            else:
                self.hist_ids = self.inputs[INPUT_HIST]
                if self.attrs:
                    self.attr_ids = L.ItemAttributes(spec.cat[item].buckets, len(self.attrs),
                                                     name=HISTORY_ATTRIBUTES)(self.hist_ids)   # [B, L, F]
                    self.cat_emb, self.hist_emb, self.attr_emb = table(
                        [self.inputs[INPUT_CAT], self.hist_ids, self.attr_ids])
                else:
                    self.cat_emb, self.hist_emb = table([self.inputs[INPUT_CAT], self.hist_ids])
                self.item_emb = L.SelectFields(item, name="candidate_item")(self.cat_emb)  # [B, d]

    def flat_cat(self) -> Any:
        return keras.layers.Flatten(name="cat_flat")(self.cat_emb)

    def history_keys(self) -> tuple[Any, Any]:
        """``(query [B, G*d], keys [B, L, G*d])``: the candidate's and the history's item + attribute embeddings."""
        if not self.attrs:
            return self.item_emb, self.hist_emb
        item = self.spec.item_feature_index
        d = self.hist_emb.shape[-1]
        query = keras.layers.Flatten(name="candidate_flat")(
            L.SelectFields([item] + self.attrs, name="candidate_fields")(self.cat_emb))
        attrs = keras.layers.Reshape((self.spec.history.max_len, len(self.attrs) * d),
                                     name="history_attr_flat")(self.attr_emb)
        keys = keras.layers.Concatenate(axis=-1, name="history_keys")([self.hist_emb, attrs])
        return query, keys

    def history_vector(self, cfg: ModelConfig) -> Any:
        """The pooled history (attention with recency ``[B, 2*G*d]``, or masked mean ``[B, G*d]``), or None."""
        if self.hist_emb is None:
            return None
        query, keys = self.history_keys()
        if cfg.history_pooling == "attention":
            return L.RecencyAttention(cfg.attention_units, cfg.recency_dim, self.spec.history.max_len,
                                      name="history_attention")([query, keys, self.hist_ids])
        return L.MaskedMeanPooling(name="history_mean")([keys, self.hist_ids])

    def matches(self, cfg: ModelConfig) -> Any:
        """The explicit match features: :meth:`history_match` and ``VocabularyMatch``, concatenated (or None).

        Built once per model (later calls return the same tensor).
        """
        if hasattr(self, "_matches"):
            return self._matches
        self._matches = self._build_matches(cfg)
        return self._matches

    def _build_matches(self, cfg: ModelConfig) -> Any:
        parts = [self.history_match(cfg)]
        pairs = vocabulary_pairs(self.spec) if cfg.vocabulary_match and self.spec.cat else []
        if pairs:
            parts.append(L.VocabularyMatch(pairs, name=VOCABULARY_MATCH)(self.inputs[INPUT_CAT]))
        parts = [p for p in parts if p is not None]
        return _concat(parts, "matches") if parts else None

    def history_match(self, cfg: ModelConfig) -> Any:
        """:class:`~ctredge.train.layers.HistoryMatch` features ``[B, R*G + G + 1]``, or None."""
        if self.hist_emb is None or not cfg.history_match:
            return None
        cand = L.SelectFields([self.spec.item_feature_index] + self.attrs, name="candidate_ids")(
            self.inputs[INPUT_CAT])
        ins = [cand, self.hist_ids] + ([self.attr_ids] if self.attrs else [])
        return L.HistoryMatch(self.spec.history.max_len, name=HISTORY_MATCH)(ins)


# ------------------------------------------------------------------ architectures
def _dcnv2(f: _Features, cfg: ModelConfig) -> Any:
    """DCN-v2 (Wang et al. 2021), stacked: [embeddings, dense, history] -> cross -> MLP -> logit."""
    parts = []
    if f.cat_emb is not None:
        parts.append(f.flat_cat())
    if f.dense is not None:
        parts.append(f.dense)
    if f.dense_emb is not None:
        parts.append(keras.layers.Flatten(name="dense_buckets_flat")(f.dense_emb))
    parts += [t for t in (f.history_vector(cfg), f.matches(cfg), f.text) if t is not None]
    x0 = _concat(parts, "dcn_input")
    x = x0
    for i in range(cfg.cross_layers):
        x = L.CrossLayer(cfg.cross_rank, name=CROSS_LAYER.format(i))([x0, x])
    x = _mlp(x, cfg.mlp_units, cfg.dropout, "deep")
    return keras.layers.Dense(1, name=LOGIT, **_start(cfg))(x)


def _deepfm(f: _Features, spec: FeatureSpec, cfg: ModelConfig) -> Any:
    """DeepFM (Guo et al. 2017): first order + FM over field embeddings + deep MLP, summed logits."""
    linear_in, fields = [], []
    if f.cat_emb is not None:
        w = L.SharedEmbedding(spec.total_buckets, 1, spec.offsets.tolist(), kept_rows=cfg.vocab_rows or None,
                              lr_scale=cfg.embedding_lr_scale, name="first_order")(f.inputs[INPUT_CAT])
        linear_in.append(keras.layers.Flatten(name="first_order_flat")(w))  # [B, n_cat]
        fields.append(f.cat_emb)
    if f.dense is not None:
        linear_in.append(f.dense)
        fields.append(L.DenseFieldEmbedding(cfg.embedding_dim, name="dense_fields")(f.dense))
    if f.dense_emb is not None:
        fields.append(f.dense_emb)
    hist = f.history_vector(cfg)
    if hist is not None:
        if hist.shape[-1] != cfg.embedding_dim:   # attention with attributes: project to one field
            hist = keras.layers.Dense(cfg.embedding_dim, name="history_project")(hist)
        fields.append(keras.layers.Reshape((1, cfg.embedding_dim), name="history_field")(hist))
    match = f.matches(cfg)
    if match is not None:
        linear_in.append(match)
    first = keras.layers.Dense(1, name="first_order_logit", **_start(cfg))(_concat(linear_in, "first_order_input"))
    field_tensor = _concat(fields, "fields", axis=1)  # [B, F, d]
    second = L.FMInteraction(name="fm")(field_tensor)
    deep_in = keras.layers.Flatten(name="fields_flat")(field_tensor)
    if match is not None:
        deep_in = keras.layers.Concatenate(name="deep_input")([deep_in, match])
    deep = _mlp(deep_in, cfg.mlp_units, cfg.dropout, "deep")
    deep = keras.layers.Dense(1, name=DEEP_LOGIT, **_start(cfg))(deep)
    return keras.layers.Add(name=LOGIT)([first, second, deep])


def _seed(f: _Features, spec: FeatureSpec, cfg: ModelConfig) -> Any:
    """Our behaviour-sequence model "seed".

    The history embeddings ``[B, L, d]`` (with ``history_attributes``, each
    position's item and attribute embeddings side by side, ``[B, L, G*d]``) and the
    candidate item's field embeddings (the ``item``-side cat features, always including the history's item feature,
    ``[B, n_item, d]``) each go through their own Conv1D (``conv_filters``,
    ``conv_kernel``, same padding, ReLU) and a max-pool over positions (masked for
    the history: padding never wins, an empty history pools to 0).  Those two vectors
    are concatenated with the flattened user/context embeddings and the transformed
    dense features, then Dense ``seed_mlp`` (128 -> 64) -> 1 logit.  The original
    design pooled only history and item; without the user/context fields and dense
    features the model cannot learn effects such as position bias or a user's base
    click rate, so they are part of the MLP input; so are the ``HistoryMatch``
    features and the dense buckets, when configured.
    """
    item_idx = sorted(set(spec.columns("cat", "item")) | {spec.item_feature_index})
    other_idx = [j for j in range(spec.n_cat) if j not in item_idx]
    conv = dict(kernel_size=cfg.conv_kernel, padding="same", activation="relu")
    hist = keras.layers.Conv1D(cfg.conv_filters, name="history_conv", **conv)(f.history_keys()[1])
    hist = L.MaskedMaxPooling(name="history_maxpool")([hist, f.hist_ids])
    item = L.SelectFields(item_idx, name="item_fields")(f.cat_emb)
    item = keras.layers.Conv1D(cfg.conv_filters, name="item_conv", **conv)(item)
    item = L.MaskedMaxPooling(name="item_maxpool")(item)
    parts = [hist, item]
    if other_idx:
        ctx = L.SelectFields(other_idx, name="user_context_fields")(f.cat_emb)
        parts.append(keras.layers.Flatten(name="user_context_flat")(ctx))
    if f.dense is not None:
        parts.append(f.dense)
    if f.dense_emb is not None:
        parts.append(keras.layers.Flatten(name="dense_buckets_flat")(f.dense_emb))
    match = f.matches(cfg)
    if match is not None:
        parts.append(match)
    x = _mlp(_concat(parts, "seed_input"), cfg.seed_mlp, cfg.dropout, "seed")
    return keras.layers.Dense(1, name=LOGIT, **_start(cfg))(x)


def build_model(spec: FeatureSpec, cfg: ModelConfig | None = None) -> keras.Model:
    """Build the (uncompiled) Keras model for ``spec``.

    Takes: the feature contract and a :class:`ModelConfig` (default: dcnv2).
    Returns: a functional ``keras.Model`` with inputs named as
    ``spec.input_signature()`` (a dict feed) and one output ``ctr`` (sigmoid,
    float32 ``[B, 1]``).

    Raises:
        ConfigError: ``cfg`` is not a ModelConfig, or the architecture does not fit
            the spec (``seed`` needs a behaviour history).
    """
    cfg = ModelConfig() if cfg is None else cfg
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"build_model: expected a ModelConfig, got {type(cfg).__name__}")
    if not isinstance(spec, FeatureSpec):
        raise ConfigError(f"build_model: expected a FeatureSpec, got {type(spec).__name__}")
    if cfg.vocab_rows > spec.total_buckets:
        raise ConfigError(f"vocab_rows: expected at most the spec's {spec.total_buckets} buckets "
                          f"(0 = no vocabulary pruning), got {cfg.vocab_rows}")
    if cfg.model == "seed" and spec.history is None:
        raise ConfigError("model 'seed': seed needs a behaviour history, but this FeatureSpec declares none "
                          "(history is None); declare a history or use model 'dcnv2' or 'deepfm'")
    f = _Features(spec, cfg)
    if spec.text:
        from ctredge.train.text import TEXT_LOGIT, text_vector

        f.text = text_vector(f.inputs, spec, cfg.text_rows, cfg.text_proj, cfg.text_cos_scale)
    if cfg.model == "dcnv2":
        logit = _dcnv2(f, cfg)
    elif cfg.model == "deepfm":
        logit = _deepfm(f, spec, cfg)  # its first-order part already takes the match features
    else:
        logit = _seed(f, spec, cfg)
    if cfg.model != "deepfm" and f.matches(cfg) is not None:
        # a linear path from the explicit matches to the logit (wide & deep's "wide" part): through the
        # cross layers and the MLP alone, one epoch under-uses them ("already in the history" by a third)
        match_logit = keras.layers.Dense(1, name=MATCH_LOGIT, **_start(cfg))(f.matches(cfg))
        logit = keras.layers.Add(name="logit_sum")([logit, match_logit])
    if f.text is not None:
        # the text part reaches the logit straight too (dcnv2 also feeds it to its deep part)
        logit = keras.layers.Add(name="text_sum")([logit, keras.layers.Dense(1, name=TEXT_LOGIT, **_start(cfg))(f.text)])
    if cfg.wide and spec.cat:
        ins = [f.inputs[INPUT_CAT]] + ([f.inputs[INPUT_DENSE]] if spec.dense else [])
        match = f.matches(cfg)
        if match is not None:
            ins.append(match)
        pairs = field_pairs(spec.n_cat) if cfg.wide_buckets else []
        if cfg.wide_pairs is not None:
            if any(k >= len(pairs) for k in cfg.wide_pairs):
                raise ConfigError(f"wide_pairs: indices must lie below the {len(pairs)} pairs of {spec.n_cat} "
                                  f"fields, got {list(cfg.wide_pairs)}")
            pairs = [pairs[k] for k in cfg.wide_pairs]
        wide = L.WideLogit(spec.offsets.tolist(), spec.total_buckets, pairs, cfg.wide_buckets, spec.n_dense,
                           cfg.wide_edges, 0 if match is None else int(match.shape[-1]), name=WIDE_LOGIT)(ins)
        logit = keras.layers.Add(name="wide_sum")([logit, wide])
    ctr = keras.layers.Activation("sigmoid", dtype="float32", name=OUTPUT_CTR)(logit)
    return keras.Model(inputs=f.inputs, outputs=ctr, name=f"ctredge_{cfg.model}")


def field_pairs(n_cat: int) -> list[tuple[int, int]]:
    """Every pair ``(i, j)``, ``i < j``, of ``n_cat`` categorical fields, in the order ``wide_pairs`` indexes."""
    return [(i, j) for i in range(n_cat) for j in range(i + 1, n_cat)]


def model_summary(model: keras.Model) -> dict[str, int]:
    """Parameter counts for the manifest.

    Takes a Keras model.  Returns ``{"total", "embedding", "remap", "wide", "dense"}``: all
    weights, the rows of :class:`~ctredge.train.layers.SharedEmbedding` tables (what
    compression targets), their int32 vocabulary remaps (0 unless pruned), the fitted
    :class:`~ctredge.train.layers.WideLogit` weights, and the rest.
    """
    total = sum(int(np.prod(w.shape)) for w in model.weights)
    tables = [layer for layer in model.layers if isinstance(layer, L.SharedEmbedding)]
    embedding = sum(int(np.prod(t.embeddings.shape)) for t in tables)
    remap = sum(int(np.prod(t.remap.shape)) for t in tables if t.remap is not None)
    wide = sum(int(np.prod(w.shape)) for layer in model.layers if isinstance(layer, L.WideLogit) for w in layer.weights)
    return {"total": total, "embedding": embedding, "remap": remap, "wide": wide,
            "dense": total - embedding - remap - wide}
