"""``ctredge serve --workers N``: N servers on one port behind a supervisor (serve/workers.py, serve/worker.py).

Each test starts ``ctredge serve`` in a subprocess and finds a gRPC channel to
each worker (one channel is one connection, which the kernel gives to one
worker; ServerMetadata's ``ctredge-worker`` header says which).  No test
asserts a duration: waits poll for a state, with generous timeouts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servekit import contract_feeds, ctr_model, mlp_model, save, small_spec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve.codec import build_request, decode_response
from ctredge.serve.workers import available_cores

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_S = 90.0  # the most any wait below polls for (2 shared cores: never a measure of speed)


class Served:
    """A ``ctredge serve`` subprocess: its url, metrics url, stderr (a file) and channels to its workers."""

    def __init__(self, repo: Path, tmp: Path, *args: str):
        self.err_path = tmp / "serve.err"
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "ctredge.cli", "serve", "--repository", str(repo),
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if " on " not in line:
            self.close()
            raise AssertionError(f"the server did not start: {self.stderr()}")
        self.url = line.rsplit(" on ", 1)[1].strip()
        m = re.search(r"metrics on (http://\S+)", self.stderr())
        self.metrics_url = m.group(1) if m else None
        self.channels: list[grpc.Channel] = []

    def stderr(self) -> str:
        self.err.flush()
        return self.err_path.read_text()

    def channel(self) -> grpc.Channel:
        """A channel of its own connection (a local subchannel pool)."""
        ch = grpc.insecure_channel(self.url, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(ch)
        return ch

    def workers(self, n: int = 2, tries: int = 64, metadata=None) -> dict[int, tuple[grpc.Channel, int]]:
        """{worker index: (a channel to it, its pid)} for ``n`` workers."""
        found: dict[int, tuple[grpc.Channel, int]] = {}
        for _ in range(tries):
            ch = self.channel()
            _, call = service_pb2_grpc.GRPCInferenceServiceStub(ch).ServerMetadata.with_call(
                pb.ServerMetadataRequest(), timeout=30, metadata=metadata)
            index, pid = dict(call.initial_metadata())["ctredge-worker"].split()
            found.setdefault(int(index), (ch, int(pid)))
            if len(found) == n:
                return found
        raise AssertionError(f"{tries} connections reached only workers {sorted(found)}")

    def wait_log(self, pattern: str) -> None:
        end = time.monotonic() + WAIT_S
        while not re.search(pattern, self.stderr()):
            assert time.monotonic() < end, f"no {pattern!r} in the server log:\n{self.stderr()[-4000:]}"
            assert self.proc.poll() is None, f"the server exited:\n{self.stderr()[-4000:]}"
            time.sleep(0.02)

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()


def _stub(ch: grpc.Channel) -> service_pb2_grpc.GRPCInferenceServiceStub:
    return service_pb2_grpc.GRPCInferenceServiceStub(ch)


def _health(ch: grpc.Channel, name: str = "") -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status


def _wait_health(ch: grpc.Channel, status: int, name: str = "") -> None:
    end = time.monotonic() + WAIT_S
    while _health(ch, name) != status:
        assert time.monotonic() < end, f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        time.sleep(0.01)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@pytest.fixture()
def one_model(tmp_path) -> Path:
    """``ctr`` v1 only (version policy latest)."""
    repo = tmp_path / "repo"
    save(ctr_model(small_spec(), seed=1), repo / "ctr" / "1" / "model.onnx")
    return repo


# ------------------------------------------------------------------------------------------------ cores
def test_available_cores_is_the_affinity_capped_by_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 workers
    assert available_cores(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cores(tmp_path) == 1


def test_workers_1_is_todays_single_process_server(one_model, tmp_path):
    s = Served(one_model, tmp_path, "--workers", "1")
    try:
        children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
        assert children == []
        _, call = _stub(s.channel()).ServerMetadata.with_call(pb.ServerMetadataRequest(), timeout=30)
        assert "ctredge-worker" not in dict(call.initial_metadata())
        assert not re.search(r"starting \d+ workers|worker \d+: ", s.stderr())
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ control
def test_explicit_reload_and_unload_reach_every_worker_and_no_request_is_lost(one_model, tmp_path):
    spec = small_spec()
    s = Served(one_model, tmp_path, "--workers", "2", "--model-control-mode", "explicit")
    try:
        w = s.workers()
        request = build_request("ctr", contract_feeds(spec, 3, seed=0))
        seen: list[tuple[int, str]] = []  # (worker, code or answered version)
        stop = threading.Event()

        def load(index: int) -> None:
            stub = _stub(w[index][0])
            while not stop.is_set():
                try:
                    seen.append((index, stub.ModelInfer(request, timeout=60).model_version))
                except grpc.RpcError as exc:
                    seen.append((index, exc.code().name))

        threads = [threading.Thread(target=load, args=(i,)) for i in (0, 1, 0, 1)]
        for t in threads:
            t.start()
        save(ctr_model(spec, seed=2), one_model / "ctr" / "2" / "model.onnx")
        _stub(w[0][0]).RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"), timeout=120)
        # the load returned: every worker serves v2 now
        for index in (0, 1):
            assert _stub(w[index][0]).ModelInfer(request, timeout=30).model_version == "2"
        stop.set()
        for t in threads:
            t.join()
        assert {v for _, v in seen} <= {"1", "2"}, sorted({v for _, v in seen})
        assert {i for i, _ in seen} == {0, 1}

        # unload at worker 1: no worker serves it; load at worker 0: both do again
        _stub(w[1][0]).RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="ctr"), timeout=60)
        for index in (0, 1):
            stub = _stub(w[index][0])
            assert not stub.ModelReady(pb.ModelReadyRequest(name="ctr"), timeout=30).ready
            assert _code(lambda: stub.ModelInfer(request, timeout=30)) == grpc.StatusCode.UNAVAILABLE
            _wait_health(w[index][0], NOT_SERVING, "ctr")
        _stub(w[0][0]).RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"), timeout=120)
        for index in (0, 1):
            assert _stub(w[index][0]).ModelInfer(request, timeout=30).model_version == "2"
            _wait_health(w[index][0], SERVING, "ctr")
        # a refused load is refused by every worker, with the same message a single server gives
        (one_model / "ctr" / "config.json").write_text("{not json")
        with pytest.raises(grpc.RpcError) as exc:
            _stub(w[1][0]).RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"), timeout=120)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # LoadRefused, as one server answers
        assert "config.json is invalid" in exc.value.details() and "still serving version(s) [2]" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            _stub(w[0][0]).RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), timeout=60)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "not in the repository" in exc.value.details()
    finally:
        s.close()


def test_poll_mode_every_worker_polls_and_picks_up_a_new_version(one_model, tmp_path):
    spec = small_spec()
    s = Served(one_model, tmp_path, "--workers", "2", "--model-control-mode", "poll", "--poll-seconds", "0.2")
    try:
        w = s.workers()
        request = build_request("ctr", contract_feeds(spec, 1, seed=0))
        save(ctr_model(spec, seed=2), one_model / "ctr" / "2" / "model.onnx")
        for index in (0, 1):
            stub = _stub(w[index][0])
            end = time.monotonic() + WAIT_S
            while stub.ModelInfer(request, timeout=30).model_version != "2":  # every answer meanwhile is OK
                assert time.monotonic() < end, f"worker {index} never served v2"
                time.sleep(0.05)
        assert _code(lambda: _stub(w[0][0]).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="ctr"), timeout=30)) == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ counting
def test_statistics_and_metrics_count_each_request_once_across_workers(one_model, tmp_path):
    spec = small_spec()
    s = Served(one_model, tmp_path, "--workers", "2", "--metrics-port", "0")
    try:
        w = s.workers()
        request = build_request("ctr", contract_feeds(spec, 1, seed=0))
        for index, n in ((0, 7), (1, 5)):
            for _ in range(n):
                decode_response(_stub(w[index][0]).ModelInfer(request, timeout=30))
        for index in (0, 1):  # unknown model: counted by Prometheus under model=""
            assert _code(lambda: _stub(w[index][0]).ModelInfer(build_request("nope", contract_feeds(spec, 1)),
                                                                timeout=30)) == grpc.StatusCode.NOT_FOUND
        for index in (0, 1):  # the sum, whichever worker answers
            stats = _stub(w[index][0]).ModelStatistics(pb.ModelStatisticsRequest(name="ctr"), timeout=30)
            (m,) = stats.model_stats
            assert (m.inference_stats.success.count, m.inference_count, m.execution_count) == (12, 12, 12)
            assert m.inference_stats.fail.count == 0
            assert {b.batch_size: b.compute_infer.count for b in m.batch_stats} == {1: 12}
        text = urllib.request.urlopen(s.metrics_url, timeout=30).read().decode()

        def value(name: str, **labels: str) -> float:
            want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            for line in text.splitlines():
                if line.startswith(name + "{"):
                    got = ",".join(sorted(line[len(name) + 1:line.index("}")].split(",")))
                    if got == want:
                        return float(line.rsplit(" ", 1)[1])
            raise AssertionError(f"no {name}{{{want}}} in\n{text}")

        assert value("ctredge_requests_total", model="ctr", version="1", code="OK") == 12
        assert value("ctredge_requests_total", model="", version="", code="NOT_FOUND") == 2
        assert value("ctredge_inferences_total", model="ctr", version="1") == 12
        assert value("ctredge_request_duration_seconds_count", model="ctr") == 12
        assert value("ctredge_model_state", model="ctr", version="1", state="READY") == 1
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ drain
def test_sigterm_drains_every_worker_and_loses_no_accepted_request(tmp_path):
    spec = small_spec()
    repo = tmp_path / "repo"
    save(mlp_model(spec), repo / "slow" / "1" / "model.onnx")
    # requests wait up to 1.5 s in each worker's batching queue: they are in flight when SIGTERM comes
    (repo / "slow" / "config.json").write_text(json.dumps(
        {"instances": 1, "dynamic_batching": {"max_queue_delay_us": 1_500_000}}))
    s = Served(repo, tmp_path, "--workers", "2", "--grace-seconds", "30")
    try:
        w = s.workers()
        stubs = [_stub(w[k % 2][0]) for k in range(4)]
        request = build_request("slow", contract_feeds(spec, 8))
        before = [stubs[k % 4].ModelInfer.future(request, timeout=120) for k in range(48)]
        time.sleep(0.3)  # let the calls reach their workers' queues (not a measurement)
        s.proc.send_signal(signal.SIGTERM)
        during = []
        for k in range(16):
            during.append(stubs[k % 4].ModelInfer.future(request, timeout=120))
            time.sleep(0.01)
        assert [_code(f.result) for f in before] == [grpc.StatusCode.OK] * 48
        assert {_code(f.result) for f in during} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        for ch in s.channels:
            ch.close()
        assert s.proc.wait(timeout=120) == 0
        err = s.stderr()
        assert "worker 0: draining" in err and "worker 1: draining" in err, err[-3000:]
        assert "all workers stopped" in err
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ restart, health
def test_a_killed_worker_is_restarted_and_health_waits_for_every_worker(one_model, tmp_path):
    spec = small_spec()
    s = Served(one_model, tmp_path, "--workers", "2", "--model-control-mode", "explicit")
    try:
        w = s.workers()
        (ch0, _), (_, pid1) = w[0], w[1]
        request = build_request("ctr", contract_feeds(spec, 2, seed=0))
        assert _health(ch0) == SERVING
        # the restarted worker will find no model, so it cannot be ready until the model is back and loaded
        shutil.move(one_model / "ctr" / "1", tmp_path / "away")
        os.kill(pid1, signal.SIGKILL)
        s.wait_log(rf"worker 1 \(pid {pid1}\) exited with signal SIGKILL .*restarting")
        _wait_health(ch0, NOT_SERVING)
        s.wait_log(r"worker 1: ready: no model is ready")
        assert _health(ch0) == NOT_SERVING
        assert not _stub(ch0).ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        assert decode_response(_stub(ch0).ModelInfer(request, timeout=30))["ctr"].shape == (2, 1)  # still serving

        shutil.move(tmp_path / "away", one_model / "ctr" / "1")
        _stub(ch0).RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"), timeout=120)
        _wait_health(ch0, SERVING)
        w2 = s.workers()
        assert w2[1][1] != pid1
        for index in (0, 1):
            assert decode_response(_stub(w2[index][0]).ModelInfer(request, timeout=30))["ctr"].shape == (2, 1)
            assert _health(w2[index][0]) == SERVING
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ security, limits
def test_tokens_and_limits_hold_in_every_worker(one_model, tmp_path):
    spec = small_spec()
    infer, admin = "infer-token-0123456789abcdef", "admin-token-0123456789abcdef"
    (tmp_path / "infer").write_text(infer + "\n")
    (tmp_path / "admin").write_text(admin + "\n")
    (one_model / "ctr" / "config.json").write_text(json.dumps({"max_batch_size": 20000}))
    s = Served(one_model, tmp_path, "--workers", "2", "--infer-token-file", str(tmp_path / "infer"),
               "--admin-token-file", str(tmp_path / "admin"), "--max-message-mb", "1")
    try:
        as_infer = (("authorization", f"Bearer {infer}"),)
        as_admin = (("authorization", f"Bearer {admin}"),)
        w = s.workers(metadata=as_infer)
        small = build_request("ctr", contract_feeds(spec, 2))
        big = build_request("ctr", contract_feeds(spec, 12000))  # over --max-message-mb 1
        for index in (0, 1):
            stub = _stub(w[index][0])
            assert _code(lambda: stub.ModelInfer(small, timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: stub.ModelInfer(small, timeout=30, metadata=as_infer)) == grpc.StatusCode.OK
            assert _code(lambda: stub.ModelInfer(big, timeout=30, metadata=as_infer)) == \
                grpc.StatusCode.RESOURCE_EXHAUSTED
            request = pb.ModelStatisticsRequest(name="ctr")
            assert _code(lambda: stub.ModelStatistics(request, timeout=30, metadata=as_infer)) == \
                grpc.StatusCode.PERMISSION_DENIED
            stats = stub.ModelStatistics(request, timeout=30, metadata=as_admin)
            assert stats.model_stats[0].inference_stats.success.count == index + 1  # one OK request per worker so far
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------ units
def test_merged_statistics_are_the_sum_of_the_workers_snapshots():
    from ctredge.serve.stats import ModelStats

    a, b = ModelStats("m", 3), ModelStats("m", 3)
    a.request(True, 100, 1, 2, 3, 4)
    a.execution(1, 2, 3, 4)
    b.request(True, 200, 10, 20, 30, 40)
    b.request(False, 50)
    b.execution(1, 20, 30, 40)
    b.execution(4, 1, 1, 1)
    m = ModelStats.merged("m", 3, [a.snapshot(), b.snapshot()]).to_proto()
    assert (m.name, m.version, m.inference_count, m.execution_count) == ("m", "3", 6, 3)
    s = m.inference_stats
    assert (s.success.count, s.success.ns, s.fail.count, s.fail.ns) == (2, 300, 1, 50)
    assert (s.queue.ns, s.compute_input.ns, s.compute_infer.ns, s.compute_output.ns) == (11, 22, 33, 44)
    assert {x.batch_size: (x.compute_infer.count, x.compute_infer.ns) for x in m.batch_stats} == {1: (2, 33), 4: (1, 1)}
    assert m.last_inference == max(a.last_inference_ms, b.last_inference_ms)


def test_rest_is_served_by_every_worker_on_one_port(one_model, tmp_path):
    import http.client

    s = Served(one_model, tmp_path, "--workers", "2", "--http-port", "0")
    try:
        s.wait_log(r"2 workers serving")
        ports = {int(p) for p in re.findall(r"KServe v2 REST on http://\S+:(\d+)/v2", s.stderr())}
        assert len(ports) == 1, s.stderr()[-3000:]   # both workers listen on the one REST port
        port = ports.pop()
        for _ in range(40):                            # each connection lands on one worker
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/v2/models/ctr/ready")
            assert conn.getresponse().status == 200
            conn.close()
        assert len(re.findall(r"KServe v2 REST on", s.stderr())) == 2
    finally:
        s.close()
