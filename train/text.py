"""Text features in the CTR model: the title table inside the graph, the query embedding as an input.

For a spec with text features (:class:`ctredge.features.TextFeature`):

* a ``table`` text (the item title) becomes :class:`TitleTable`: a non-trainable
  ``remap`` (key bucket id -> row, 0 = no title) and ``table`` (``[rows, dim]``,
  row 0 zeros), filled from the training rows by :func:`fill_title_table`.  The
  titles are encoded once, at training time, so ONNX holds the table and the
  server never encodes a title;
* a ``request`` text (the search query) is the input ``<name>_emb`` (FP32
  ``[B, dim]``, zeros = no query), made by :func:`add_query_embeddings` from the
  rows' raw strings here and by the server from a request's raw string there.

:func:`text_vector` turns them into ``[B, 1 + 3 p]``: the dot product of the two
unit vectors (their cosine; 0 without a query) times ``cos_scale``, a ``p``-wide
projection of each, and one of their elementwise product (the vectors times
``sqrt(dim)`` before the projections, so their components are about 1).  The
scales matter: a logit weight grows by about the learning rate per Adam step, so
an unscaled cosine (about 0.1 to 0.5) would need a weight of about 3 that two
epochs at 2e-3 with the cosine decay cannot reach (measured: the model took a
fifth of what a logistic regression on its logit and the cosine took).  :func:`ctredge.train.models.build_model`
feeds it to the deep part (DCN-v2's input) and, through one ``Dense(1)``, straight
to the logit.  Everything here uses :class:`ctredge.textenc.SentenceEncoder`, the
serving encoder, so training and serving embed a string alike.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from ctredge.errors import ConfigError
from ctredge.features import INPUT_CAT, FeatureSpec
from ctredge.reader import Batch

log = logging.getLogger("ctredge.train")

TITLE_TABLE = "title_table"
TEXT_LOGIT = "text_logit"
_PACKAGE = "ctredge"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TitleTable(keras.layers.Layer):
    """Key ids ``[B]`` -> precomputed text embeddings ``[B, dim]``: ``table[remap[id]]`` (two Gathers).

    Takes the key feature's bucket count, the table's rows (distinct titles + 1)
    and the embedding width.  Both weights are non-trainable and start at zero
    (every id: no title), until :func:`fill_title_table`.
    """

    def __init__(self, key_buckets: int, rows: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_buckets, self.rows, self.dim = int(key_buckets), int(rows), int(dim)

    def build(self, input_shape: Any) -> None:
        self.remap = self.add_weight(name="remap", shape=(self.key_buckets,), dtype="int32", initializer="zeros",
                                     trainable=False)
        self.table = self.add_weight(name="table", shape=(self.rows, self.dim), initializer="zeros", trainable=False)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.table, tf.gather(self.remap, ids))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (input_shape[0], self.dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "key_buckets": self.key_buckets, "rows": self.rows, "dim": self.dim}


def text_vector(inputs: dict[str, Any], spec: FeatureSpec, rows: int, proj: int, cos_scale: float = 10.0) -> Any:
    """The text part of the model ``[B, 1 + 3 proj]`` from its inputs (see the module doc), or None.

    Needs one ``table`` and one ``request`` text feature of the same width.

    Raises:
        ConfigError: the spec's text features are not one table text and one request text of one width.
    """
    from ctredge.train.layers import SelectFields

    if not spec.text:
        return None
    tables = [t for t in spec.text if t.source == "table"]
    requests = list(spec.request_text)
    if len(tables) != 1 or len(requests) != 1 or tables[0].dim != requests[0].dim:
        raise ConfigError(f"the model takes one 'table' text and one 'request' text of one width, got "
                          f"{[(t.name, t.source, t.dim) for t in spec.text]}")
    title, query = tables[0], requests[0]
    key = [f.name for f in spec.cat].index(title.key)
    ids = SelectFields(key, name="title_key")(inputs[INPUT_CAT])
    t = TitleTable(spec.cat[key].buckets, max(rows, 1), title.dim, name=TITLE_TABLE)(ids)
    q = inputs[query.input_name]
    cos = keras.layers.Rescaling(float(cos_scale), name="text_cosine_scaled")(
        keras.layers.Dot(axes=1, name="text_cosine")([q, t]))
    root = float(np.sqrt(title.dim))
    qs = keras.layers.Rescaling(root, name="query_scaled")(q)
    ts = keras.layers.Rescaling(root, name="title_scaled")(t)
    pq = keras.layers.Dense(proj, activation="relu", name="query_proj")(qs)
    pt = keras.layers.Dense(proj, activation="relu", name="title_proj")(ts)
    qt = keras.layers.Dense(proj, activation="relu", name="query_title_proj")(
        keras.layers.Multiply(name="query_x_title")([qs, ts]))
    return keras.layers.Concatenate(name="text_vector")([cos, pq, pt, qt])


def title_rows(spec: FeatureSpec, batch: Batch) -> tuple[np.ndarray, list[bytes]]:
    """The distinct key ids of the training rows that have a title, and the title of each (its first one).

    Raises:
        ConfigError: the rows carry no raw text (read with a spec without text).
    """
    title = next(t for t in spec.text if t.source == "table")
    if batch.text is None or title.name not in batch.text:
        raise ConfigError(f"the rows carry no raw {title.name!r} column; read them with the spec that declares it")
    key = [f.name for f in spec.cat].index(title.key)
    ids = batch.feeds[INPUT_CAT][:, key]
    texts = batch.text[title.name]
    has = np.array([bool(v) for v in texts.tolist()], dtype=bool) & (ids > 0)
    uniq, first = np.unique(ids[has], return_index=True)
    return uniq, [texts[has][i] for i in first.tolist()]


def fill_title_table(model: Any, ids: np.ndarray, embeddings: np.ndarray) -> None:
    """Set the :class:`TitleTable`: ``remap[ids[k]] = k + 1``, ``table[k + 1] = embeddings[k]``, row 0 zeros."""
    layer = model.get_layer(TITLE_TABLE)
    remap = np.zeros(layer.key_buckets, dtype=np.int32)
    remap[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    table = np.zeros((layer.rows, layer.dim), dtype=np.float32)
    table[1:len(ids) + 1] = embeddings
    layer.set_weights([remap, table])
    log.info("title table: %d titles of %d-d embeddings (%.1f MB) in the graph", len(ids), layer.dim,
             table.nbytes / 1e6)


def add_query_embeddings(spec: FeatureSpec, batches: Sequence[Batch], encoder: Any) -> None:
    """Put ``<name>_emb`` (FP32 ``[n, dim]``, zeros for an empty string) in each batch's feeds, in place."""
    for t in spec.request_text:
        for b in batches:
            if b.text is None or t.name not in b.text:
                raise ConfigError(f"the rows carry no raw {t.name!r} column; read them with the spec that declares it")
            b.feeds[t.input_name] = encoder.encode(b.text[t.name].tolist())


__all__ = ["TitleTable", "text_vector", "title_rows", "fill_title_table", "add_query_embeddings", "TITLE_TABLE",
           "TEXT_LOGIT"]
