"""Tiny text models for the tests: a word-level tokenizer and a mean-pooling ONNX encoder, a CTR graph with query_emb.

No PyTorch: the tokenizer is built with ``tokenizers``, the graphs with ``onnx.helper``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ctredge.features import METADATA_KEY, FeatureSpec, TextFeature

OPSET, IR = 17, 8
DIM = 8
WORDS = ("red", "crimson", "blue", "azure", "shoes", "trainers", "sofa", "settee", "for", "men", "ladies", "in")


def tokenizer_file(path: Path) -> Path:
    """A WordLevel tokenizer ([CLS] words [SEP], lower case, whitespace split) saved as tokenizer.json."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                              ("[SEP]", 3)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def word_vectors(seed: int = 0) -> np.ndarray:
    """The encoder's token table ``[vocab, DIM]``."""
    return np.random.default_rng(seed).normal(0, 1, (len(WORDS) + 4, DIM)).astype(np.float32)


def encoder_model(seed: int = 0):
    """input_ids, attention_mask INT64 [B, T] -> embedding FP32 [B, DIM]: masked mean of a table, L2-normalised."""
    from onnx import TensorProto, helper, numpy_helper

    n = helper.make_node
    inits = [numpy_helper.from_array(word_vectors(seed), "table"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_last"),
             numpy_helper.from_array(np.array(1e-9, dtype=np.float32), "eps")]
    nodes = [
        n("Gather", ["table", "input_ids"], ["tok"]),
        n("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT), n("Unsqueeze", ["m", "axis_last"], ["m3"]),
        n("Mul", ["tok", "m3"], ["tm"]), n("ReduceSum", ["tm", "axis1"], ["s"], keepdims=0),
        n("ReduceSum", ["m3", "axis1"], ["c"], keepdims=0), n("Max", ["c", "eps"], ["c1"]),
        n("Div", ["s", "c1"], ["mean"]),
        n("Mul", ["mean", "mean"], ["sq"]), n("ReduceSum", ["sq", "axis_last"], ["ss"], keepdims=1),
        n("Sqrt", ["ss"], ["norm"]), n("Max", ["norm", "eps"], ["norm1"]), n("Div", ["mean", "norm1"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", DIM])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR)


def reference_embedding(text: str, seed: int = 0) -> np.ndarray:
    """What the tiny encoder gives for ``text`` (numpy): mean of [CLS], the words' rows, [SEP]; normalised."""
    vocab = {w: i + 4 for i, w in enumerate(WORDS)}
    ids = [2] + [vocab.get(w, 1) for w in text.lower().split()] + [3]
    v = word_vectors(seed)[ids].mean(0)
    return v / np.linalg.norm(v)


def write_encoder(folder: Path, seed: int = 0) -> Path:
    """``folder/model.onnx`` + ``folder/tokenizer.json``: an encoder folder the server and SentenceEncoder read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(encoder_model(seed).SerializeToString())
    tokenizer_file(folder / "tokenizer.json")
    return folder


def text_spec(base: FeatureSpec) -> FeatureSpec:
    """``base`` with a request text ``query`` (context side, DIM wide)."""
    return dataclasses.replace(base, text=(TextFeature("query", source="request", side="context", dim=DIM),))


def ctr_text_model(spec: FeatureSpec, seed: int = 0):
    """The servekit ctr graph plus ``w . query_emb`` in the logit (so the query visibly moves the answer)."""
    from onnx import TensorProto, helper, numpy_helper
    from servekit import ctr_model

    model = ctr_model(dataclasses.replace(spec, text=()), seed)
    g = model.graph
    w = np.random.default_rng(seed + 7).normal(0, 2.0, (DIM, 1)).astype(np.float32)
    g.initializer.append(numpy_helper.from_array(w, "w_query"))
    # the old logit feeds Sigmoid: rename it and add the query term
    sig = next(node for node in g.node if node.op_type == "Sigmoid")
    old = sig.input[0]
    sig.input[0] = "logit_q"
    g.node.insert(len(g.node) - 1, helper.make_node("MatMul", ["query_emb", "w_query"], ["qv"]))
    g.node.insert(len(g.node) - 1, helper.make_node("Add", [old, "qv"], ["logit_q"]))
    g.input.append(helper.make_tensor_value_info("query_emb", TensorProto.FLOAT, ["B", DIM]))
    del model.metadata_props[:]
    helper.set_model_props(model, {METADATA_KEY: spec.to_json(), "ctredge.model_name": "ctr-text",
                                   "ctredge.model_version": str(seed)})
    return model, w
