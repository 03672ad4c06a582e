"""Versions and hot reload under continuous traffic: new versions appear, corrupt ones are refused, none fails."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from servekit import contract_feeds, ctr_model, save, small_spec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve.codec import build_request
from ctredge.serve.server import ServerThread


class Traffic:
    """Requests without a version, one after another from 4 threads, until stopped; records every outcome."""

    def __init__(self, url: str, model: str, feeds: dict[str, np.ndarray]):
        self.request = build_request(model, feeds)
        self.url = url
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(4)]

    def _run(self) -> None:
        with grpc.insecure_channel(self.url) as ch:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            while not self._stop.is_set():
                try:
                    self.versions.append(stub.ModelInfer(self.request, timeout=10).model_version)
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)
        self._stop.set()
        for t in self._threads:
            t.join()

    def wait_for(self, version: str, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        n = len(self.versions)
        while time.monotonic() < end:
            if version in self.versions[n:]:
                return
            time.sleep(0.02)
        raise AssertionError(f"version {version} never answered; saw {sorted(set(self.versions))}")


@pytest.fixture()
def model_repo(tmp_path):
    spec = small_spec()
    save(ctr_model(spec, seed=1), tmp_path / "ctr" / "1" / "model.onnx")
    (tmp_path / "ctr" / "config.json").write_text(json.dumps({"version_policy": {"kind": "latest",
                                                                                 "num_versions": 1}}))
    return tmp_path, spec


def _index(stub) -> dict[str, tuple[str, str]]:
    return {f"{m.name}/{m.version}": (m.state, m.reason)
            for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}


def test_reload_under_traffic_loses_nothing(model_repo, caplog):
    root, spec = model_repo
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with Traffic(s.url, "ctr", contract_feeds(spec, 4)) as traffic:
            # a new version: loaded and warmed, then it takes the traffic; v1 drains and unloads
            save(ctr_model(spec, seed=2), root / "ctr" / "2" / "model.onnx")
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"))
            traffic.wait_for("2")
            # a corrupt newer version is refused with the reason; v2 keeps serving
            (root / "ctr" / "3").mkdir()
            (root / "ctr" / "3" / "model.onnx").write_bytes(b"\x08\x07 not a model")
            with pytest.raises(grpc.RpcError) as info:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == ("model 'ctr': v3: ONNX Runtime cannot load its model file (details in the server log); "
                                            "still serving version(s) [2]")
            traffic.wait_for("2")
            # an invalid model config is refused too; v2 keeps serving
            (root / "ctr" / "config.json").write_text('{"version_policy": {"kind": "newest"}}')
            with pytest.raises(grpc.RpcError):
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"))
            traffic.wait_for("2")
        index = _index(stub)
    assert traffic.failures == []
    assert set(traffic.versions) == {"1", "2"} and traffic.versions[-1] == "2"
    assert index["ctr/2"] == ("READY", "")
    assert index["ctr/3"] == ("UNAVAILABLE", "ONNX Runtime cannot load its model file (details in the server log)")
    assert "ctr v3: ONNX Runtime cannot load" in caplog.text  # the details are in the log only
    assert index["ctr/1"] == ("UNAVAILABLE", "not selected by the version_policy")
    assert "keeping v2 serving because v3 failed to load" in caplog.text


def test_polling_picks_up_new_versions_and_new_models(model_repo):
    root, spec = model_repo
    with ServerThread(root, port=0, model_control_mode="poll", poll_seconds=0.1) as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        with Traffic(s.url, "ctr", contract_feeds(spec, 2)) as traffic:
            save(ctr_model(spec, seed=5), root / "ctr" / "5" / "model.onnx")
            traffic.wait_for("5")
            shutil.copytree(root / "ctr", root / "copy")
            deadline = time.monotonic() + 10
            while not stub.ModelReady(pb.ModelReadyRequest(name="copy")).ready:
                assert time.monotonic() < deadline, "the new model never became ready"
                time.sleep(0.05)
        assert traffic.failures == []


def test_unload_and_load_again(model_repo):
    root, spec = model_repo
    request = build_request("ctr", contract_feeds(spec, 1))
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="ctr"))
        assert not stub.ModelReady(pb.ModelReadyRequest(name="ctr")).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "RepositoryModelUnload" in info.value.details()
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"))
        assert stub.ModelInfer(request).model_version == "1"
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_tritonclient_grpc_unload_and_load_work_unchanged(model_repo):
    """tritonclient.grpc's unload_model always sends the unload_dependents parameter: it must be accepted."""
    import tritonclient.grpc as tg

    root, _ = model_repo
    with ServerThread(root, port=0, model_control_mode="explicit") as s:
        client = tg.InferenceServerClient(s.url)
        client.unload_model("ctr")
        assert not client.is_model_ready("ctr")
        client.load_model("ctr")
        assert client.is_model_ready("ctr")
        with pytest.raises(tg.InferenceServerException, match="not supported"):
            client.load_model("ctr", config='{"x": 1}')
