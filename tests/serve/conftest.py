"""Fixtures of the serving tests: a repository of hand-built models and a running in-process server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from servekit import ctr_model, plain_model, save, small_spec

from ctredge.features import FeatureSpec


@pytest.fixture(scope="session")
def spec() -> FeatureSpec:
    return small_spec()


@pytest.fixture(scope="session")
def repo(tmp_path_factory, spec) -> Path:
    """``ctr`` v1 + v2 (all versions served, max 64 rows), ``plain``, and a corrupt ``broken``."""
    root = tmp_path_factory.mktemp("repo")
    save(ctr_model(spec, seed=1), root / "ctr" / "1" / "model.onnx")
    save(ctr_model(spec, seed=2), root / "ctr" / "2" / "model.onnx")
    (root / "ctr" / "config.json").write_text(json.dumps({"max_batch_size": 64, "version_policy": {"kind": "all"},
                                                          "notes": "test model"}))
    save(plain_model(), root / "plain" / "1" / "model.onnx")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX file")
    (root / "index.json").write_text("{}")
    return root


@pytest.fixture(scope="session")
def server(repo):
    from ctredge.serve.server import ServerThread

    with ServerThread(repo, port=0, max_message_bytes=1 << 20) as s:
        yield s


@pytest.fixture(scope="session")
def ort_session(repo):
    """In-process ONNX Runtime on ``ctr`` v2 (the default version): the reference."""
    import onnxruntime as ort

    return ort.InferenceSession(str(repo / "ctr" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
