"""The sentence encoder at run time: ``tokenizers`` + ONNX Runtime, no PyTorch, no transformers.

An encoder folder (what :mod:`ctredge.export.text_encoder` writes, e.g.
``REPO/text-encoder/1/``) holds

* ``model.onnx``: inputs ``input_ids`` and ``attention_mask`` (INT64 ``[B, T]``),
  output ``embedding`` (FP32 ``[B, dim]``): the transformer, then the mean of the
  token vectors under the mask and an L2 normalisation, as sentence-transformers'
  ``Pooling(mean)`` + ``Normalize`` modules do, inside the graph;
* ``tokenizer.json``: the Hugging Face tokenizer file shipped with the model,
  read by the Rust ``tokenizers`` package.

:class:`SentenceEncoder` is used by the server (queries, from raw strings), by
the text benchmark (titles and queries of the training rows) and by the export's
validation, so training and serving tokenize and encode alike.  An empty string
encodes to zeros: "no text", what the model learned for rows without a query.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge.errors import ConfigError

ENCODER_MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
INPUT_IDS = "input_ids"
INPUT_MASK = "attention_mask"
OUTPUT_EMBEDDING = "embedding"
#: tokens per string (with [CLS] and [SEP]); longer strings are truncated, as sentence-transformers
#: truncates at its max_seq_length (256 for all-MiniLM-L6-v2; queries and titles are far shorter)
DEFAULT_MAX_TOKENS = 64


def encoder_files(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(model.onnx, tokenizer.json)`` of an encoder folder.

    Raises:
        ConfigError: either file is missing.
    """
    folder = Path(folder)
    model, tok = folder / ENCODER_MODEL_FILE, folder / TOKENIZER_FILE
    missing = [p.name for p in (model, tok) if not p.is_file()]
    if missing:
        raise ConfigError(f"text encoder folder {folder}: missing {missing}; expected {ENCODER_MODEL_FILE} and "
                          f"{TOKENIZER_FILE} (written by python -m ctredge.export.text_encoder)")
    return model, tok


class SentenceEncoder:
    """Raw strings -> normalised sentence embeddings (FP32 ``[n, dim]``), on ONNX Runtime.

    Takes the encoder folder, the token cap per string (truncation) and the
    ONNX Runtime threads (the serving settings of :mod:`ctredge.onnxrt`).
    Strings are tokenized in one batch, padded to the longest; the same string
    twice is encoded once.  Thread-safe (tokenizers and ORT sessions are).

    Raises:
        ConfigError: a missing file, or a graph without the expected inputs/output.
    """

    def __init__(self, folder: str | os.PathLike[str], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                 intra_op_threads: int = 1, session: Any = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from ctredge.onnxrt import ort_session_options

        model_path, tok_path = encoder_files(folder)
        self.folder = Path(folder)
        self.max_tokens = int(max_tokens)
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        self.tokenizer.no_padding()
        self.session = session or ort.InferenceSession(
            str(model_path), ort_session_options(intra_op_threads=intra_op_threads),
            providers=["CPUExecutionProvider"])
        ins = {i.name for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        if not {INPUT_IDS, INPUT_MASK} <= ins or OUTPUT_EMBEDDING not in outs:
            raise ConfigError(f"text encoder {model_path}: expected inputs {INPUT_IDS!r}, {INPUT_MASK!r} and output "
                              f"{OUTPUT_EMBEDDING!r}, got inputs {sorted(ins)} and outputs {sorted(outs)}")
        self._extra = {i.name: i for i in self.session.get_inputs() if i.name not in (INPUT_IDS, INPUT_MASK)}
        dim = outs[OUTPUT_EMBEDDING].shape[-1]
        self.dim = int(dim) if isinstance(dim, int) else int(self._run([["a"]])[0].shape[-1])

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` INT64 ``[n, T]`` of non-empty strings, padded with 0 to the longest."""
        encs = self.tokenizer.encode_batch(list(texts))
        width = max((len(e.ids) for e in encs), default=0)
        ids = np.zeros((len(encs), width), dtype=np.int64)
        mask = np.zeros((len(encs), width), dtype=np.int64)
        for r, e in enumerate(encs):
            ids[r, :len(e.ids)] = e.ids
            mask[r, :len(e.ids)] = 1
        return ids, mask

    def _run(self, texts: Sequence[Any]) -> np.ndarray:
        ids, mask = self.tokenize([t[0] for t in texts])
        feeds = {INPUT_IDS: ids, INPUT_MASK: mask}
        for name in self._extra:   # e.g. token_type_ids of a plain BERT export: all zeros
            feeds[name] = np.zeros_like(ids)
        return self.session.run([OUTPUT_EMBEDDING], feeds)[0].astype(np.float32, copy=False)

    def encode(self, texts: Sequence[str | bytes], *, chunk: int = 256) -> np.ndarray:
        """Embeddings FP32 ``[n, dim]`` of ``texts`` (``bytes`` are UTF-8); empty strings give zeros.

        Distinct non-empty strings are encoded once each, ``chunk`` per run.
        """
        strs = [t.decode("utf-8") if isinstance(t, (bytes, bytearray)) else str(t) for t in texts]
        out = np.zeros((len(strs), self.dim), dtype=np.float32)
        index: dict[str, list[int]] = {}
        for r, s in enumerate(strs):
            if s:
                index.setdefault(s, []).append(r)
        distinct = list(index)
        for at in range(0, len(distinct), chunk):
            part = distinct[at:at + chunk]
            emb = self._run([[s] for s in part])
            for s, v in zip(part, emb):
                out[index[s]] = v
        return out


__all__ = ["SentenceEncoder", "encoder_files", "ENCODER_MODEL_FILE", "TOKENIZER_FILE", "INPUT_IDS", "INPUT_MASK",
           "OUTPUT_EMBEDDING", "DEFAULT_MAX_TOKENS"]
