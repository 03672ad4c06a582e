"""A server you can expose: model control locked down, names that stay in the repository, bounded requests,
honest statuses, files checked against their manifest."""

from __future__ import annotations

import json
import logging
import os
import threading

import grpc
import numpy as np
import pytest
from servekit import contract_feeds, ctr_model, mlp_model, raw_values, save, small_spec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.artifacts import write_manifest
from ctredge.serve.codec import build_request, decode_response, serialize_bytes
from ctredge.serve.repository import Repository, is_model_name
from ctredge.serve.server import ServerOptions, ServerThread
from ctredge.serve.errors import ServeError


@pytest.fixture()
def model_repo(tmp_path):
    spec = small_spec()
    root = tmp_path / "repo"
    save(ctr_model(spec, seed=1), root / "ctr" / "1" / "model.onnx")
    (root / "ctr" / "config.json").write_text(json.dumps({"max_batch_size": 64}))
    outside = tmp_path / "outside"
    save(ctr_model(spec, seed=9), outside / "1" / "model.onnx")
    return root, spec


def _code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details()


def _stub(channel):
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _outcomes(futures) -> list[tuple[str, str]]:
    """(status code name, details) of each call future, in order."""
    out = []
    for fut in futures:
        try:
            fut.result()
            out.append(("OK", ""))
        except grpc.RpcError as exc:
            out.append((exc.code().name, exc.details() or ""))
    return out


# ------------------------------------------------------------------------------ model control
@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_are_refused_unless_explicit(model_repo, mode):
    root, _ = model_repo
    with ServerThread(root, port=0, model_control_mode=mode) as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        for call, req in ((stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="ctr")),
                          (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="ctr"))):
            code, msg = _code(call, req)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert f"model control mode is {mode!r}" in msg and "--model-control-mode explicit" in msg
        assert stub.ServerReady(pb.ServerReadyRequest()).ready


def test_poll_seconds_belong_to_poll_mode():
    assert ServerOptions(poll_seconds=2).model_control_mode == "poll"
    assert ServerOptions(model_control_mode="poll").poll_seconds == 5.0
    assert ServerOptions().model_control_mode == "none"
    with pytest.raises(ServeError, match="poll_seconds is only used with model control mode 'poll'"):
        ServerOptions(model_control_mode="explicit", poll_seconds=1)
    with pytest.raises(ServeError, match="model control mode must be one of"):
        ServerOptions(model_control_mode="open")


@pytest.mark.parametrize("name", ["/tmp", "../outside", "ctr/../../outside", "ctr/1", ".", "..", ".hidden",
                                  "a" * 300, "c\x00tr", "ctr\\..\\x"])
def test_names_that_leave_the_repository_are_not_found(model_repo, name):
    root, spec = model_repo
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        code, msg = _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name))
        assert code == grpc.StatusCode.NOT_FOUND
        assert str(root) not in msg and str(root.parent) not in msg and len(msg) < 200
        code, _ = _code(stub.ModelInfer, build_request(name, contract_feeds(spec, 1)))
        assert code == grpc.StatusCode.NOT_FOUND
        assert [m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models] == ["ctr"]


def test_a_bad_name_never_touches_the_filesystem(model_repo, monkeypatch):
    import asyncio

    root, _ = model_repo
    repo = Repository(root)
    monkeypatch.setattr(repo, "_scan", lambda name: pytest.fail(f"scanned {name!r}"))
    for name in ("/etc", "../x", "a/b", ""):
        assert not is_model_name(name)
        with pytest.raises(ServeError, match="is not in the repository"):
            asyncio.run(repo.load_model(name))


def test_a_link_the_operator_placed_is_a_model_but_names_never_follow_paths(model_repo, tmp_path):
    root, spec = model_repo
    os.symlink(tmp_path / "outside", root / "linked")
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        assert stub.ModelInfer(build_request("linked", contract_feeds(spec, 1))).model_name == "linked"
        for name in ("linked/../linked", "linked/1", str(tmp_path / "outside")):
            code, _ = _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name))
            assert code == grpc.StatusCode.NOT_FOUND


def test_load_overrides_are_refused_not_ignored(model_repo):
    root, _ = model_repo
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        for params in ({"config": pb.ModelRepositoryParameter(string_param='{"max_batch_size": 1}')},
                       {"file:1/model.onnx": pb.ModelRepositoryParameter(bytes_param=b"\x08\x07")}):
            code, msg = _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="ctr",
                                                                                      parameters=params))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "are not supported" in msg


def test_config_secrets_never_reach_the_client(model_repo, caplog):
    root, _ = model_repo
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        (root / "ctr" / "config.json").write_text('{"db_password": "s3cr3t-value", "max_batch_size": "s3cr3t"}')
        code, msg = _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="ctr"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "s3cr3t" not in msg and "db_password" not in msg and str(root) not in msg
        assert "config.json is invalid" in msg and "still serving version(s) [1]" in msg
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
        assert all("s3cr3t" not in m.reason for m in index)
    assert "db_password" in caplog.text  # the operator sees the details


def test_a_changed_config_takes_effect_on_reload(model_repo):
    root, spec = model_repo
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        stub.ModelInfer(build_request("ctr", contract_feeds(spec, 3)))
        (root / "ctr" / "config.json").write_text(json.dumps({"max_batch_size": 2}))
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="ctr"))
        code, msg = _code(stub.ModelInfer, build_request("ctr", contract_feeds(spec, 3)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "3 rows exceed max_batch_size 2" in msg
        assert stub.ModelConfig(pb.ModelConfigRequest(name="ctr")).config.max_batch_size == 2


def test_files_that_do_not_match_their_manifest_are_refused(model_repo):
    root, spec = model_repo
    write_manifest(root / "ctr" / "1", stage="quantize", config={})
    save(ctr_model(spec, seed=2), root / "ctr" / "2" / "model.onnx")
    write_manifest(root / "ctr" / "2", stage="quantize", config={})
    with ServerThread(root, port=0, model_control_mode="explicit") as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        assert stub.ModelInfer(build_request("ctr", contract_feeds(spec, 1))).model_version == "2"
        with open(root / "ctr" / "2" / "model.onnx", "r+b") as fh:  # tampered after the manifest was written
            fh.seek(-4, 2)
            fh.write(b"\x00\x00\x00\x00")
        code, msg = _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="ctr"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "v2: its files do not match its manifest.json" in msg and "still serving version(s) [2]" in msg
        assert stub.ModelInfer(build_request("ctr", contract_feeds(spec, 1))).model_version == "2"


# ------------------------------------------------------------------------------ bounded requests
@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    spec = small_spec()
    root = tmp_path_factory.mktemp("guarded")
    save(ctr_model(spec, seed=1), root / "ctr" / "1" / "model.onnx")
    (root / "ctr" / "config.json").write_text(json.dumps({"limits": {"max_bytes_elements": 5000}}))
    with ServerThread(root, port=0, metrics_port=0) as s, grpc.insecure_channel(s.url) as ch:
        yield s, _stub(ch), spec


def _raw_request(name: str, tensors: list[tuple[str, str, list[int], bytes]]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name)
    for tname, dt, shape, raw in tensors:
        req.inputs.add(name=tname, datatype=dt, shape=shape)
        req.raw_input_contents.append(raw)
    return req


def test_hostile_requests_are_invalid_arguments_without_tracebacks(guarded, caplog):
    s, stub, spec = guarded
    f = contract_feeds(spec, 1)
    dense = f["dense"].copy()
    dense[0, 0] = -np.inf
    long_history = serialize_bytes([b"," * 20_000])
    cases = [
        (_raw_request("ctr", [("dense", "FP32", [2**63 - 1, 0], b"")]), "larger than this model takes"),
        (_raw_request("ctr", [("dense", "FP32", [1] * 1000, b"")]), "shape of 1000 dimensions, expected [-1, 4]"),
        (_raw_request("ctr", [("zzz", "BYTES", [9_000_000], b"")]), "unknown input(s) ['zzz']"),
        (_raw_request("ctr", [("cat_raw", "BYTES", [100, 5], b"\x00" * 1000)]),
         "500 BYTES elements need at least 2000 bytes"),
        (_raw_request("ctr", [("cat_raw", "BYTES", [1001, 5], b"")]), "5005 BYTES elements, expected at most 5000"),
        (_raw_request("ctr", [("dense", "FP32", [1, 4], f["dense"].tobytes()), ("cat", "INT64", [1, 5],
                      f["cat"].tobytes()), ("hist_raw", "BYTES", [1, 1], long_history)]),
         "expected at most 16384"),
        (build_request("ctr", {**f, "dense": dense}), "row 0, feature 'price': -inf is not a number"),
    ]
    with caplog.at_level(logging.DEBUG, logger="ctredge.serve"):
        for request, expected in cases:
            code, msg = _code(stub.ModelInfer, request, timeout=10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (expected, msg)
            assert expected in msg, msg
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_undecodable_bytes_are_invalid_argument(guarded):
    s, stub, spec = guarded
    with grpc.insecure_channel(s.url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # no serializers: raw bytes
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x12" * 7):
            code, msg = _code(call, garbage, timeout=10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid ModelInfer message" in msg
        raw_meta = ch.unary_unary("/inference.GRPCInferenceService/ModelMetadata")
        code, _ = _code(raw_meta, b"\xff\xff", timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_shared_memory_and_other_parameters_are_unimplemented(guarded):
    s, stub, spec = guarded
    req = build_request("ctr", contract_feeds(spec, 1))
    req.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    code, msg = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.UNIMPLEMENTED and "no shared memory" in msg and "'shared_memory_region'" in msg
    req = build_request("ctr", contract_feeds(spec, 1))
    req.parameters["priority"].int64_param = 3
    assert _code(stub.ModelInfer, req)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_perf_analyzers_empty_final_response_flag_is_accepted_and_ignored(guarded):
    s, stub, spec = guarded
    req = build_request("ctr", contract_feeds(spec, 1))
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    assert stub.ModelInfer(req).outputs[0].name == "ctr"
    req.parameters["triton_enable_empty_final_response"].string_param = "yes"   # only the boolean is known
    assert _code(stub.ModelInfer, req)[0] == grpc.StatusCode.UNIMPLEMENTED


def test_unknown_models_do_not_make_metric_labels(guarded):
    import urllib.request

    s, stub, spec = guarded
    for k in range(20):
        _code(stub.ModelInfer, build_request(f"random-{k}", contract_feeds(spec, 1)))
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.server.metrics_port}/metrics", timeout=10).read().decode()
    assert "random-" not in text
    assert 'ctredge_requests_total{code="NOT_FOUND",model="",version=""} 20.0' in text


def test_the_hash_memo_stays_within_its_bytes(guarded):
    s, stub, spec = guarded
    sig = s.server.repository.get("ctr").signature
    f = contract_feeds(spec, 64)
    for k in range(40):
        raw = np.array([[b"%d-%d-%s" % (k, r, b"x" * 900) for _ in spec.cat] for r in range(64)], dtype=object)
        stub.ModelInfer(build_request("ctr", {"dense": f["dense"], "cat_raw": raw, "hist": f["hist"]}))
    assert 0 < sig.memo.bytes <= sig.memo.max_bytes == 16 << 20


# ------------------------------------------------------------------------------ honest statuses
@pytest.fixture()
def slow_repo(tmp_path):
    spec = small_spec()
    save(mlp_model(spec, hidden=(256, 256)), tmp_path / "slow" / "1" / "model.onnx")
    (tmp_path / "slow" / "config.json").write_text(json.dumps(
        {"instances": 1, "inline_max_rows": 0, "dynamic_batching": {"max_queue_delay_us": 50_000}}))
    return tmp_path, spec


def test_overload_is_resource_exhausted_counted_and_recovers(slow_repo):
    root, spec = slow_repo
    request = build_request("slow", contract_feeds(spec, 8))
    with ServerThread(root, port=0, max_concurrent_rpcs=3) as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        codes = [code for code, _ in _outcomes([stub.ModelInfer.future(request, timeout=20) for _ in range(24)])]
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0].inference_stats
        assert stats.success.count == codes.count("OK")
        assert stats.fail.count == codes.count("RESOURCE_EXHAUSTED")
        assert stub.ModelInfer(request, timeout=20).model_name == "slow"  # recovered


def test_late_answers_are_deadline_exceeded_never_successes(slow_repo):
    root, spec = slow_repo
    request = build_request("slow", contract_feeds(spec, 16))
    with ServerThread(root, port=0) as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        ok = 0
        for _ in range(30):
            try:
                stub.ModelInfer(request, timeout=0.002)
                ok += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stub.ModelInfer(request, timeout=20)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0].inference_stats
        assert stats.success.count == ok + 1  # what the clients got, not what ran after they left


def test_non_finite_answers_are_never_ok(tmp_path):
    """An fp16-style overflow inside the graph: the answer is NaN, so the request is refused, naming the value."""
    from onnx import TensorProto, helper

    from ctredge.features import METADATA_KEY

    spec = small_spec()
    model = ctr_model(spec, seed=1)
    g = model.graph
    out = g.output[0].name
    producer = next(n for n in g.node if out in n.output)
    producer.output[:] = [o if o != out else "ctr_pre" for o in producer.output]
    g.node.extend([helper.make_node("ReduceMax", ["dense"], ["dmax"], axes=[1], keepdims=1),
                   helper.make_node("Constant", [], ["big_c"], value=helper.make_tensor("big_c", TensorProto.FLOAT, [],
                                                                                      [1e30])),
                   helper.make_node("Greater", ["dmax", "big_c"], ["over"]),
                   helper.make_node("Constant", [], ["nan_c"], value=helper.make_tensor("nan_c", TensorProto.FLOAT, [],
                                                                                      [float("nan")])),
                   helper.make_node("Where", ["over", "nan_c", "ctr_pre"], [out])])
    assert any(p.key == METADATA_KEY for p in model.metadata_props)
    save(model, tmp_path / "m" / "1" / "model.onnx")
    with ServerThread(tmp_path, port=0) as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        f = contract_feeds(spec, 3)
        assert np.isfinite(decode_response(stub.ModelInfer(build_request("m", f)))["ctr"]).all()
        f["dense"][1, 2] = 3e30
        code, msg = _code(stub.ModelInfer, build_request("m", f))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "row 1: the model's answer is not finite" in msg and "'position' = 3e+30" in msg


def test_raw_requests_of_many_values_run_off_the_event_loop(guarded):
    """A large raw request (decoded on a worker thread) answers exactly what the same ids answer."""
    s, stub, spec = guarded
    f = contract_feeds(spec, 900)
    raw = raw_values(spec, 900)
    ids = spec.hash_cat(raw)
    got_raw = decode_response(stub.ModelInfer(build_request("ctr", {"dense": f["dense"], "cat_raw": raw,
                                                                    "hist": f["hist"]})))["ctr"]
    got_ids = decode_response(stub.ModelInfer(build_request("ctr", {"dense": f["dense"], "cat": ids,
                                                                    "hist": f["hist"]})))["ctr"]
    np.testing.assert_array_equal(got_raw, got_ids)


def test_traffic_keeps_flowing_while_hostile_requests_are_refused(guarded):
    s, stub, spec = guarded
    good = build_request("ctr", contract_feeds(spec, 1))
    errors: list[str] = []

    def hostile() -> None:
        with grpc.insecure_channel(s.url) as ch:
            h = _stub(ch)
            for _ in range(20):
                try:
                    h.ModelInfer(_raw_request("ctr", [("zzz", "BYTES", [9_000_000], b"")]), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        errors.append(exc.code().name)

    t = threading.Thread(target=hostile)
    t.start()
    for _ in range(20):
        assert stub.ModelInfer(good, timeout=10).model_name == "ctr"
    t.join()
    assert errors == []


def test_a_flood_of_calls_is_answered_never_cancelled(guarded):
    """More calls at once than gRPC core keeps pending by default (1000): each gets an answer, and is counted."""
    import asyncio
    import collections

    s, stub, spec = guarded
    request = build_request("ctr", contract_feeds(spec, 1))
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="ctr")).model_stats[0].inference_stats

    async def flood() -> collections.Counter:
        channels = [grpc.aio.insecure_channel(s.url) for _ in range(2)]
        stubs = [service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]

        async def one(k: int) -> str:
            try:
                await stubs[k % 2].ModelInfer(request, timeout=60)
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

        try:
            return collections.Counter(await asyncio.gather(*[one(k) for k in range(1500)]))
        finally:
            for c in channels:
                await c.close()

    codes = asyncio.run(flood())
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="ctr")).model_stats[0].inference_stats
    assert after.success.count - before.success.count == codes["OK"]
    assert after.fail.count - before.fail.count == codes["RESOURCE_EXHAUSTED"]


def test_bytes_in_flight_are_bounded(slow_repo):
    root, spec = slow_repo
    request = build_request("slow", contract_feeds(spec, 512))  # ~60 KB of tensors
    with ServerThread(root, port=0, max_message_bytes=1 << 16, max_inflight_bytes=1 << 17) as s, \
            grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        outcomes = _outcomes([stub.ModelInfer.future(request, timeout=30) for _ in range(12)])
        codes = [code for code, _ in outcomes]
        assert all("--max-inflight-mb" in msg for code, msg in outcomes if code != "OK")
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert s.server.servicer.inflight_bytes == 0


def test_a_message_over_a_mebibyte_is_parsed_off_the_loop_with_the_same_answer(model_repo):
    from ctredge.serve.servicer import PARSE_INLINE_BYTES

    root, spec = model_repo
    (root / "ctr" / "config.json").write_text(json.dumps({"max_batch_size": 4096}))
    f = contract_feeds(spec, 2048)
    raw = np.array([[b"%06d" % (r * 7 + j) + b"v" * 94 for j in range(spec.n_cat)] for r in range(2048)],
                   dtype=object)
    request = build_request("ctr", {"dense": f["dense"], "cat_raw": raw, "hist": f["hist"]})
    assert request.ByteSize() > PARSE_INLINE_BYTES
    with ServerThread(root, port=0) as s, grpc.insecure_channel(s.url) as ch:
        stub = _stub(ch)
        got = decode_response(stub.ModelInfer(request, timeout=30))["ctr"]
        want = decode_response(stub.ModelInfer(build_request("ctr", {"dense": f["dense"], "cat": spec.hash_cat(raw),
                                                                     "hist": f["hist"]}), timeout=30))["ctr"]
        np.testing.assert_array_equal(got, want)
        garbage = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        code, msg = _code(garbage, b"\xff" * (PARSE_INLINE_BYTES + 10), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid ModelInfer message" in msg


def test_the_gil_switch_interval_is_short_while_any_server_runs():
    import sys

    from ctredge.serve.server import GIL_SWITCH_SECONDS, _short_gil_switch

    before = sys.getswitchinterval()
    _short_gil_switch(True)
    _short_gil_switch(True)
    _short_gil_switch(False)
    assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_SECONDS)
    _short_gil_switch(False)
    assert sys.getswitchinterval() == pytest.approx(before)
