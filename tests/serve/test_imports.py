"""The serving install stays small: importing the server loads no TensorFlow, Keras, tf2onnx, onnx, PyTorch or
transformers (its text encoder runs on ONNX Runtime, tokenized by the Rust ``tokenizers``)."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
import json, sys
import ctredge.serve
import ctredge.serve.server, ctredge.serve.client, ctredge.serve.repository, ctredge.serve.codec
import ctredge.serve.runtime, ctredge.serve.signature, ctredge.serve.metadata, ctredge.serve.errors
import ctredge.textenc
import ctredge.cli
import tritonclient.grpc  # Triton's client beside the server: one set of inference.* protobuf symbols
ctredge.cli.build_parser().parse_args(["serve", "--repository", "x"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "onnx", "torch",
                                                             "transformers", "sentence_transformers"))
print(json.dumps(heavy))
"""


def test_serve_imports_no_training_stack():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
