"""Providers (CUDA -> CPU fallback, loudly with require_gpu), session options, the Runner seam."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from servekit import contract_feeds, ctr_model, save, small_spec

from ctredge.serve import runtime
from ctredge.serve.errors import GpuRequired, InvalidInput, LoadError
from ctredge.serve.runtime import CPU, CUDA, Runner, create_session, resolve_providers


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save(ctr_model(small_spec(), seed=3), tmp_path_factory.mktemp("rt") / "model.onnx")


def test_resolve_providers(caplog):
    assert resolve_providers(["auto"], [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers(["auto"], [CPU]) == [CPU]
    assert resolve_providers(["cuda"], [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers(["cpu"], [CUDA, CPU]) == [CPU]
    with caplog.at_level(logging.WARNING, logger="ctredge.serve"):
        assert resolve_providers(["cuda", "cpu"], ["AzureExecutionProvider", CPU]) == [CPU]
    assert "CUDAExecutionProvider is not in this onnxruntime build" in caplog.text


def test_cpu_fallback_is_logged_and_session_is_quiet(model_path, caplog):
    with caplog.at_level(logging.INFO, logger="ctredge.serve"):
        session, provider = create_session(str(model_path), label="m v1")
    assert provider == CPU  # this machine's onnxruntime has no CUDA provider
    assert "m v1: no CUDA provider in this onnxruntime build; falling back to the CPU" in caplog.text
    assert "m v1: running on CPUExecutionProvider" in caplog.text
    opts = session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_require_gpu_without_cuda_fails_loudly(model_path):
    with pytest.raises(GpuRequired, match="--require-gpu, but this onnxruntime has no CUDA provider"):
        create_session(str(model_path), require_gpu=True, label="m v1")
    session, provider = create_session(str(model_path), providers=["cpu"], require_gpu=True)  # CPU on purpose
    assert provider == CPU


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_silent_cuda_fallback_is_detected(model_path, monkeypatch, caplog):
    """onnxruntime-gpu without CUDA libraries: CUDA asked, CPU used. Simulated: ORT here lacks CUDA."""
    monkeypatch.setattr(runtime, "available_providers", lambda: [CUDA, CPU])
    with caplog.at_level(logging.WARNING, logger="ctredge.serve"):
        _, provider = create_session(str(model_path), providers=["cuda"], label="m v1")
    assert provider == CPU
    assert "m v1: CUDAExecutionProvider was requested but ONNX Runtime runs the model on CPUExecutionProvider" \
        in caplog.text
    with pytest.raises(GpuRequired, match="failing because of --require-gpu"):
        create_session(str(model_path), providers=["auto"], require_gpu=True, label="m v1")


def test_unloadable_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(LoadError, match="ONNX Runtime cannot load"):
        create_session(str(bad))


def test_io_binding_path_equals_plain_run(model_path):
    session, _ = create_session(str(model_path), providers=["cpu"])
    feeds = contract_feeds(small_spec(), 9, seed=1)
    plain = Runner(session, io_binding=False).run(feeds)
    bound = Runner(session, io_binding=True).run(feeds)
    np.testing.assert_array_equal(plain["ctr"], bound["ctr"])
    assert Runner(session, provider=CUDA).io_binding  # chosen automatically on the GPU


def test_run_maps_onnx_runtime_errors(model_path):
    session, _ = create_session(str(model_path), providers=["cpu"])
    runner = Runner(session, name="m", version=4)
    feeds = contract_feeds(small_spec(), 3, seed=2)
    np.testing.assert_array_equal(runner.run(feeds)["ctr"], runner.run(feeds)["ctr"])
    with pytest.raises(InvalidInput, match="ONNX Runtime rejected the inputs"):
        runner.run({**feeds, "cat": feeds["cat"].astype(np.int32)})
