"""ModelStatistics (Triton's counters) and the Prometheus scrape move as requests are served."""

from __future__ import annotations

import re
import urllib.request

import grpc
import numpy as np
import pytest
from servekit import contract_feeds, ctr_model, save, small_spec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve.codec import build_request
from ctredge.serve.server import ServerThread


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _value(text: str, metric: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(metric + "{") and line.split(" ")[0] != metric:
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_statistics_and_metrics_move(tmp_path):
    spec = small_spec()
    save(ctr_model(spec, seed=1), tmp_path / "ctr" / "1" / "model.onnx")
    with ServerThread(tmp_path, port=0, metrics_port=0) as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        port = s.server.metrics_port
        before = _scrape(port)
        assert _value(before, "ctredge_model_state", model="ctr", version="1", state="READY") == 1
        assert _value(before, "ctredge_model_info", model="ctr", provider="CPUExecutionProvider") == 1
        stats0 = stub.ModelStatistics(pb.ModelStatisticsRequest(name="ctr", version="1")).model_stats[0]
        for n in (1, 3, 5):
            stub.ModelInfer(build_request("ctr", contract_feeds(spec, n)))
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(build_request("ctr", {"dense": np.zeros((1, 1), np.float32)}))
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="ctr")).model_stats[0]
        after = _scrape(port)
        everything = stub.ModelStatistics(pb.ModelStatisticsRequest())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelStatistics(pb.ModelStatisticsRequest(name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (stats.name, stats.version) == ("ctr", "1")
    inf = stats.inference_stats
    assert inf.success.count - stats0.inference_stats.success.count == 3
    assert inf.fail.count - stats0.inference_stats.fail.count == 1
    assert stats.inference_count - stats0.inference_count == 9
    assert stats.execution_count - stats0.execution_count == 3
    for d in (inf.success, inf.queue, inf.compute_input, inf.compute_infer, inf.compute_output):
        assert d.count == 3 and d.ns > 0
    assert inf.success.ns >= inf.compute_infer.ns
    assert {b.batch_size for b in stats.batch_stats} >= {1, 3, 5}
    assert stats.last_inference > 0
    assert [m.name for m in everything.model_stats] == ["ctr"]
    assert _value(after, "ctredge_requests_total", model="ctr", code="OK") - \
        _value(before, "ctredge_requests_total", model="ctr", code="OK") == 3
    assert _value(after, "ctredge_requests_total", model="ctr", code="INVALID_ARGUMENT") == 1
    assert _value(after, "ctredge_inferences_total", model="ctr") - _value(before, "ctredge_inferences_total",
                                                                           model="ctr") == 9
    assert _value(after, "ctredge_batch_rows_count", model="ctr") - _value(before, "ctredge_batch_rows_count",
                                                                           model="ctr") == 3
    for h in ("ctredge_request_duration_seconds", "ctredge_queue_duration_seconds",
              "ctredge_compute_duration_seconds"):
        assert _value(after, h + "_count", model="ctr") >= 3, h
    assert re.search(r'ctredge_queue_depth\{model="ctr",version="1"\} 0', after)
