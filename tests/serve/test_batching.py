"""Dynamic batching: batched answers equal unbatched ones, bounded queue, deadlines, the scheduler itself."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from servekit import contract_feeds, mlp_model, save, small_spec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve.batcher import Scheduler, pad_rows
from ctredge.serve.codec import build_request, decode_response
from ctredge.serve.errors import DeadlineExceeded, ResourceExhausted
from ctredge.serving_config import DynamicBatching
from ctredge.serve.runtime import Runner, create_session
from ctredge.serve.server import ServerThread

CLIENTS = 32


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """fp32, fp16 and static int8 of one MLP model, each served with a 2 ms batching window."""
    from ctredge.compress.quantize import quantize

    spec = small_spec()
    fp32 = mlp_model(spec, seed=3)
    calib = [contract_feeds(spec, 64, seed=i) for i in range(4)]
    root = tmp_path_factory.mktemp("batching")
    for name, model in (("fp32", fp32), ("fp16", quantize(fp32, "fp16")),
                        ("int8", quantize(fp32, "int8-static", calib))):
        save(model, root / name / "1" / "model.onnx")
        (root / name / "config.json").write_text(json.dumps({"dynamic_batching": {"max_queue_delay_us": 2000}}))
    return root, spec


def _hammer(url: str, model: str, requests: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Send every request from CLIENTS threads at once (each thread its own channel); answers in order."""
    out: list[np.ndarray | None] = [None] * len(requests)
    barrier = threading.Barrier(CLIENTS)

    def client(k: int) -> None:
        with grpc.insecure_channel(url) as ch:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            barrier.wait()
            for i in range(k, len(requests), CLIENTS):
                out[i] = decode_response(stub.ModelInfer(build_request(model, requests[i]), timeout=30))["ctr"]

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return out


def _stats(url: str, model: str) -> pb.ModelStatistics:
    with grpc.insecure_channel(url) as ch:
        return service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name=model)).model_stats[0]


@pytest.mark.parametrize("model", ["fp32", "fp16", "int8"])
def test_batched_answers_equal_unbatched_under_32_clients(variants, model):
    root, spec = variants
    rng = np.random.default_rng(7)
    requests = []
    for i in range(4 * CLIENTS):
        feeds = contract_feeds(spec, int(rng.integers(1, 10)), seed=100 + i)
        requests.append(feeds)
    with ServerThread(root, port=0, dynamic_batching=False) as off:
        unbatched = _hammer(off.url, model, requests)
        assert _stats(off.url, model).execution_count >= len(requests)  # one run per request (+0 warm-up)
    with ServerThread(root, port=0, dynamic_batching=True) as on:
        batched = _hammer(on.url, model, requests)
        stats = _stats(on.url, model)
    assert stats.execution_count < len(requests), "no two requests were ever batched together"
    assert stats.inference_count == sum(len(r["dense"]) for r in requests)
    assert max(b.batch_size for b in stats.batch_stats) > 9  # batches larger than any request
    for want, got, req in zip(unbatched, batched, requests):
        assert got.shape == (len(req["dense"]), 1)
        np.testing.assert_array_equal(got, want)


@pytest.fixture()
def slow_repo(tmp_path):
    """One model whose batcher waits 300 ms for batch-mates, with room for 2 waiting requests."""
    spec = small_spec()
    save(mlp_model(spec), tmp_path / "slow" / "1" / "model.onnx")
    (tmp_path / "slow" / "config.json").write_text(json.dumps(
        {"instances": 1, "dynamic_batching": {"max_queue_delay_us": 300_000, "max_queue_size": 2}}))
    return tmp_path, spec


def test_full_queue_answers_resource_exhausted_and_recovers(slow_repo):
    root, spec = slow_repo
    feeds = contract_feeds(spec, 1)
    with ServerThread(root, port=0) as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        futures = [stub.ModelInfer.future(build_request("slow", feeds), timeout=10) for _ in range(12)]
        codes = []
        for f in futures:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "queue is full (2 requests waiting" in exc.details()
        assert codes.count(grpc.StatusCode.OK) >= 2
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # recovered: the queue drained and a new request is served
        out = decode_response(stub.ModelInfer(build_request("slow", feeds), timeout=10))["ctr"]
        assert out.shape == (1, 1)


def test_an_expired_deadline_is_never_run(slow_repo):
    root, spec = slow_repo
    with ServerThread(root, port=0) as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        before = _stats(s.url, "slow").inference_count
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(build_request("slow", contract_feeds(spec, 3)), timeout=0.05)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)  # past the batching window: the dispatcher has looked at the queue
        after = _stats(s.url, "slow")
        assert after.inference_count == before, "an expired request was run"
        assert after.execution_count == 0


# ----------------------------------------------------------------------- the scheduler alone
@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    spec = small_spec()
    path = save(mlp_model(spec), tmp_path_factory.mktemp("sched") / "m.onnx")
    session, provider = create_session(str(path), providers=("cpu",))
    return Runner(session, name="m", provider=provider), spec


def test_pad_rows():
    feeds = {"a": np.arange(3)[:, None], "b": np.arange(6).reshape(3, 2)}
    padded, rows = pad_rows(feeds, 3, 8)
    assert rows == 8 and padded["a"].shape == (8, 1) and padded["b"].shape == (8, 2)
    np.testing.assert_array_equal(padded["a"][3:], 0)
    assert pad_rows(feeds, 3, 1)[1] == 3 and pad_rows(feeds, 3, 3)[1] == 3


def test_scheduler_splits_in_order_pads_and_reports(runner):
    r, spec = runner
    seen = []
    sched = Scheduler(r, DynamicBatching(max_queue_delay_us=20_000), alignment=8, max_concurrency=1,
                      on_execution=seen.append)
    reqs = [contract_feeds(spec, n, seed=n) for n in (1, 5, 9, 2)]
    want = [r.run(pad_rows(f, len(f["dense"]), 8)[0])["ctr"][:len(f["dense"])] for f in reqs]

    async def go():
        return await asyncio.gather(*(sched.predict(f) for f in reqs))

    got = asyncio.run(go())
    for (out, timing), w, f in zip(got, want, reqs):
        np.testing.assert_array_equal(out["ctr"], w)
        assert timing.batch_requests == 4 and timing.batch_rows == 17
    assert len(seen) == 1 and seen[0].rows == 17 and seen[0].padded_rows == 8 + 8 + 16 + 8 and seen[0].ok


def test_scheduler_queue_limit_deadline_and_drain(runner):
    r, spec = runner
    runs = []
    sched = Scheduler(r, DynamicBatching(max_queue_delay_us=100_000, max_queue_size=2), max_concurrency=1,
                      on_execution=runs.append)
    feeds = contract_feeds(spec, 2)

    async def go():
        ok = asyncio.ensure_future(sched.predict(feeds))
        late = asyncio.ensure_future(sched.predict(feeds, deadline=time.monotonic() + 0.01))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await sched.predict(feeds)
        with pytest.raises(DeadlineExceeded, match="not run"):
            await late
        out, _ = await ok
        assert out["ctr"].shape == (2, 1)
        assert await sched.drain(timeout=5)
        with pytest.raises(Exception, match="unloading"):
            await sched.predict(feeds)

    asyncio.run(go())
    assert [(e.rows, e.ok) for e in runs] == [(2, True)]  # only the request that was not late ran


def test_scheduler_off_runs_each_request_alone(runner):
    r, spec = runner
    seen = []
    sched = Scheduler(r, DynamicBatching(enabled=False), alignment=8, inline_max_rows=4, on_execution=seen.append)

    async def go():
        return await asyncio.gather(*(sched.predict(contract_feeds(spec, n, seed=n)) for n in (1, 3, 20)))

    outs = asyncio.run(go())
    assert [o["ctr"].shape[0] for o, _ in outs] == [1, 3, 20]
    assert sorted(e.rows for e in seen) == [1, 3, 20] and sorted(e.padded_rows for e in seen) == [8, 8, 24]
