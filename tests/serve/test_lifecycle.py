"""SIGTERM: health NOT_SERVING, new requests UNAVAILABLE, in-flight requests finish, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servekit import contract_feeds, mlp_model, save, small_spec
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve.codec import build_request, decode_response


def _serve(repo, grace_seconds: float) -> tuple[subprocess.Popen, str]:
    """``ctredge serve`` on ``repo`` in a subprocess, once it prints its address; returns (process, url)."""
    proc = subprocess.Popen([sys.executable, "-m", "ctredge.cli", "serve", "--repository", str(repo),
                             "--port", "0", "--grace-seconds", str(grace_seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        raise AssertionError(proc.stderr.read())
    return proc, line.rsplit(" on ", 1)[1].strip()


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    spec = small_spec()
    save(mlp_model(spec), tmp_path / "slow" / "1" / "model.onnx")
    # requests wait up to 400 ms in the batching queue: they are in flight when SIGTERM comes
    (tmp_path / "slow" / "config.json").write_text(json.dumps(
        {"instances": 1, "dynamic_batching": {"max_queue_delay_us": 400_000}}))
    proc, url = _serve(tmp_path, grace_seconds=5)
    try:
        with grpc.insecure_channel(url) as ch:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            requests = [contract_feeds(spec, n, seed=n) for n in range(1, 9)]
            futures = [stub.ModelInfer.future(build_request("slow", f), timeout=20) for f in requests]
            time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            # draining: health says NOT_SERVING and new requests are refused
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                stub.ModelInfer(build_request("slow", requests[0]), timeout=5)
                raise AssertionError("a request was accepted while the server was draining")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in exc.details()
            answers = [decode_response(f.result())["ctr"] for f in futures]
        assert [a.shape[0] for a in answers] == list(range(1, 9))
        assert proc.wait(timeout=15) == 0
        err = proc.stderr.read()
        assert "draining: 8 request(s) in flight" in err and "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_with_many_calls_in_flight_cancels_none(tmp_path):
    """Calls sent before SIGTERM are answered OK; calls sent during the drain get UNAVAILABLE; none is CANCELLED."""
    spec = small_spec()
    save(mlp_model(spec, hidden=(256, 256)), tmp_path / "slow" / "1" / "model.onnx")
    (tmp_path / "slow" / "config.json").write_text(json.dumps({"instances": 1, "inline_max_rows": 0}))
    proc, url = _serve(tmp_path, grace_seconds=20)
    try:
        channels = [grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
        stubs = [service_pb2_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
        request = build_request("slow", contract_feeds(spec, 256))
        stubs[0].ModelInfer(request, timeout=20)  # warm
        before = [stubs[k % 4].ModelInfer.future(request, timeout=60) for k in range(48)]
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        during = []
        for k in range(16):
            during.append(stubs[k % 4].ModelInfer.future(request, timeout=60))
            time.sleep(0.01)

        def code(f):
            try:
                f.result()
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()

        assert [code(f) for f in before] == [grpc.StatusCode.OK] * 48
        assert {code(f) for f in during} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        for ch in channels:
            ch.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
