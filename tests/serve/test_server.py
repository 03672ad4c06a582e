"""End to end over gRPC: tritonclient 2.73 (unmodified) and hand-built requests against an in-process server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from servekit import contract_feeds, raw_values
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ctredge.features import FeatureSpec
from ctredge.serve import codec
from ctredge.serve.client import Client, RemoteError, ranking_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def triton(server):
    client = tc.InferenceServerClient(server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def triton_inputs(feeds):
    inputs = []
    for name, arr in feeds.items():
        dt = "BYTES" if arr.dtype == object else codec.datatype_of(arr)
        i = tc.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    return inputs


def call_error(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    return info.value


# ----------------------------------------------------------------------- health of the protocol
def test_live_ready_and_server_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta.name == "ctredge"
    assert "execution_provider/ctr/2=CPUExecutionProvider" in meta.extensions
    assert "execution_provider/plain/1=CPUExecutionProvider" in meta.extensions


def test_model_ready(triton):
    assert triton.is_model_ready("ctr") and triton.is_model_ready("ctr", "1") and triton.is_model_ready("plain")
    assert not triton.is_model_ready("broken")
    assert not triton.is_model_ready("nope")
    assert not triton.is_model_ready("ctr", "9")


def test_model_metadata_advertises_contract_and_alternatives(triton, spec):
    meta = triton.get_model_metadata("ctr")
    assert meta.name == "ctr" and list(meta.versions) == ["1", "2"] and meta.platform == "onnxruntime_onnx"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs["dense"] == ("FP32", [-1, 4]) and inputs["cat"] == ("INT64", [-1, 5])
    assert inputs["hist"] == ("INT64", [-1, 5]) and inputs["cat_raw"] == ("BYTES", [-1, 5])
    assert inputs["hist_raw"] == ("BYTES", [-1, 1])
    assert inputs["dense_user"] == ("FP32", [-1, 1]) and inputs["dense_item"] == ("FP32", [-1, 2])
    assert inputs["cat_user"] == ("INT64", [-1, 2]) and inputs["cat_raw_item"] == ("BYTES", [-1, 2])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("ctr", "FP32", [-1, 1])]


def test_model_metadata_sends_the_provider_in_initial_metadata(stub):
    _, call = stub.ModelMetadata.with_call(pb.ModelMetadataRequest(name="ctr"))
    assert dict(call.initial_metadata())["ctredge-execution-provider"] == "CPUExecutionProvider"


def test_model_config(triton, spec):
    cfg = triton.get_model_config("ctr").config
    assert cfg.name == "ctr" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    by_name = {i.name: i for i in cfg.input}
    assert list(by_name["dense"].dims) == [4] and not by_name["dense"].optional
    assert by_name["cat_raw"].optional and by_name["cat_item"].optional
    assert cfg.parameters["execution_provider"].string_value == "CPUExecutionProvider"
    assert cfg.parameters["notes"].string_value == "test model"
    assert FeatureSpec.from_json(cfg.parameters["ctredge.feature_spec"].string_value) == spec
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    assert cfg.version_policy.HasField("all")
    plain = triton.get_model_config("plain").config
    assert plain.max_batch_size == 4096 and [list(i.dims) for i in plain.input] == [[3], [2], []]


def test_repository_index_reports_the_corrupt_model(triton):
    index = {(m.name, m.version): m for m in triton.get_model_repository_index().models}
    assert index["ctr", "1"].state == index["ctr", "2"].state == index["plain", "1"].state == "READY"
    broken = index["broken", "1"]
    assert broken.state == "UNAVAILABLE" and "ONNX Runtime cannot load" in broken.reason


def test_repository_index_ready_only(client):
    assert {(m.name, m.version) for m in client.repository_index(ready=True)} == {
        ("ctr", "1"), ("ctr", "2"), ("plain", "1")}


def test_corrupt_model_answers_unavailable(client):
    with pytest.raises(RemoteError) as info:
        client.infer("broken", {"x": np.zeros((1, 1), np.float32)})
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "cannot load" in info.value.details


def test_unimplemented_calls(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ----------------------------------------------------------------------- inference
def test_infer_raw_with_tritonclient_equals_in_process_ort(triton, spec, ort_session):
    feeds = contract_feeds(spec, 17, seed=3)
    result = triton.infer("ctr", triton_inputs(feeds), outputs=[tc.InferRequestedOutput("ctr")])
    want = ort_session.run(["ctr"], feeds)[0]
    got = result.as_numpy("ctr")
    assert got.shape == (17, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert result.get_response().model_version == "2"


def test_infer_typed_contents(client, spec, ort_session):
    feeds = contract_feeds(spec, 5, seed=4)
    got = client.infer("ctr", feeds, typed=True)["ctr"]
    np.testing.assert_array_equal(got, ort_session.run(["ctr"], feeds)[0])


def test_infer_named_version(triton, spec, repo):
    import onnxruntime as ort

    feeds = contract_feeds(spec, 3, seed=5)
    v1 = ort.InferenceSession(str(repo / "ctr" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    result = triton.infer("ctr", triton_inputs(feeds), model_version="1")
    np.testing.assert_array_equal(result.as_numpy("ctr"), v1.run(["ctr"], feeds)[0])
    assert result.get_response().model_version == "1"


def test_cat_raw_bytes_hashed_like_training(triton, spec, ort_session):
    feeds = contract_feeds(spec, 9, seed=6)
    raw = raw_values(spec, 9, seed=6)
    sent = {"dense": feeds["dense"], "cat_raw": raw, "hist": feeds["hist"]}
    got = triton.infer("ctr", triton_inputs(sent)).as_numpy("ctr")
    hashed = {**feeds, "cat": spec.hash_cat(raw)}
    np.testing.assert_array_equal(got, ort_session.run(["ctr"], hashed)[0])


def test_hist_raw_hashed_like_training(client, spec, ort_session):
    feeds = contract_feeds(spec, 3, seed=7)
    lists = [[b"i1", b"i2"], [], [b"i%d" % k for k in range(9)]]  # the last is cut to the 5 most recent
    hist_raw = np.array([[b",".join(h)] for h in lists], dtype=object)
    got = client.predict("ctr", {"dense": feeds["dense"], "cat": feeds["cat"], "hist_raw": hist_raw})
    want = ort_session.run(["ctr"], {**feeds, "hist": spec.hash_history(lists)})[0].reshape(-1)
    np.testing.assert_array_equal(got, want)


def test_ranking_request_equals_the_expanded_rows(triton, client, spec, ort_session):
    n = 12
    feeds = contract_feeds(spec, n, seed=8)
    raw = raw_values(spec, n, seed=8)
    for kind, arr in (("dense", feeds["dense"]), ("cat_raw", raw)):
        for side in ("user", "context"):
            cols = spec.columns("dense" if kind == "dense" else "cat", side)
            arr[:, cols] = arr[:1, cols]  # one user, one context
    hist_raw = np.array([[b"a,b,c"]] * n, dtype=object)
    expanded = {"dense": feeds["dense"], "cat_raw": raw, "hist_raw": hist_raw}
    ranking = ranking_inputs(spec, expanded)
    assert {k: v.shape[0] for k, v in ranking.items()} == {
        "dense_user": 1, "dense_item": n, "dense_context": 1, "cat_raw_user": 1, "cat_raw_item": n,
        "cat_raw_context": 1, "hist_raw": 1}
    ranked = triton.infer("ctr", triton_inputs(ranking)).as_numpy("ctr")
    full = triton.infer("ctr", triton_inputs(expanded)).as_numpy("ctr")
    np.testing.assert_array_equal(ranked, full)
    reference = ort_session.run(["ctr"], {"dense": feeds["dense"], "cat": spec.hash_cat(raw),
                                          "hist": spec.hash_history([[b"a", b"b", b"c"]] * n)})[0]
    np.testing.assert_array_equal(ranked, reference)
    # ids instead of raw values, and a batch-1 hist beside batch-n dense/cat
    ids = {"dense": feeds["dense"], "cat": spec.hash_cat(raw), "hist": spec.hash_history([[b"a", b"b", b"c"]])}
    np.testing.assert_array_equal(client.predict("ctr", ids), reference.reshape(-1))
    mixed = ranking_inputs(spec, ids)
    np.testing.assert_array_equal(client.predict("ctr", mixed), reference.reshape(-1))


def test_plain_model_with_its_own_names_and_bytes_output(triton):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    k = np.array([[1, 2], [3, 4]], dtype=np.int32)
    s = np.array([b"ab", "\u00e9t\u00e9".encode()], dtype=object)
    result = triton.infer("plain", triton_inputs({"x": x, "k": k, "s": s}))
    w = np.arange(6, dtype=np.float32).reshape(3, 2) / 10
    np.testing.assert_allclose(result.as_numpy("y"), x @ w + k.astype(np.float32), rtol=1e-6)
    assert list(result.as_numpy("name")) == [b"ab", "\u00e9t\u00e9".encode()]


def test_requested_output_subset_and_unknown_output(client, stub):
    x = {"x": np.ones((1, 3), np.float32), "k": np.ones((1, 2), np.int32), "s": np.array([b"z"], dtype=object)}
    assert list(client.infer("plain", x, outputs=["name"])) == ["name"]
    err = call_error(stub, codec.build_request("plain", x, outputs=["nope"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown output(s) ['nope']" in err.details()


# ----------------------------------------------------------------------- errors
def test_unknown_model_and_version_not_found(triton, stub, spec):
    for name, version in (("nope", ""), ("ctr", "7"), ("ctr", "latest")):
        err = call_error(stub, codec.build_request(name, contract_feeds(spec, 1), model_version=version))
        assert err.code() == grpc.StatusCode.NOT_FOUND, (name, version)
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("nope")
    assert "NOT_FOUND" in info.value.status()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_config("ctr", "9")
    assert "NOT_FOUND" in info.value.status()


@pytest.mark.parametrize("mutate, expected", [
    (lambda f: {**f, "dnse": f["dense"]}, "unknown input(s) ['dnse']"),
    (lambda f: {k: v for k, v in f.items() if k != "hist"}, "missing input: the behaviour history"),
    (lambda f: {**f, "dense": f["dense"].astype(np.float64)}, "input 'dense': got datatype FP64, expected FP32"),
    (lambda f: {**f, "cat": f["cat"][:, :3]}, "input 'cat': got unexpected shape [4, 3], expected [-1, 5]"),
    (lambda f: {**f, "cat": f["cat"][:, :, None]}, "got unexpected shape [4, 5, 1], expected [-1, 5]"),
    (lambda f: {**f, "dense": f["dense"][:3]}, "mismatched batch sizes"),
    (lambda f: {**f, "cat": f["cat"][:1]}, "mismatched batch sizes"),
    (lambda f: {**f, "cat_raw": f["cat"].astype(bytes).astype(object)}, "either 'cat' or 'cat_raw'"),
    (lambda f: {**f, "cat": np.where(np.arange(5) == 4, 64, f["cat"])}, "feature 'brand'): id 64 is out of range"),
    (lambda f: {**f, "cat": -f["cat"] - 1}, "out of range, expected 0 <= id < 1000"),
    (lambda f: {**f, "hist": f["hist"] + 500}, "input 'hist': row 0, position 0"),
])
def test_bad_inputs_invalid_argument(stub, spec, mutate, expected):
    err = call_error(stub, codec.build_request("ctr", mutate(contract_feeds(spec, 4, seed=9))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.details()


def test_mismatched_batch_message_names_expected_and_got(stub, spec):
    f = contract_feeds(spec, 4)
    err = call_error(stub, codec.build_request("ctr", {**f, "dense": f["dense"][:3]}))
    assert "{'dense': 3, 'cat': 4, 'hist': 4}" in err.details() and "(4 here)" in err.details()
    ranking = ranking_inputs(spec, f, broadcast=())  # per side, every row
    ranking["cat_user"] = ranking["cat_user"][:1]  # fine: sent once
    ranking["dense_item"] = ranking["dense_item"][:3]
    err = call_error(stub, codec.build_request("ctr", ranking))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'dense_item': 3" in err.details()
    assert "may have 1 row" in err.details()


def test_wrong_byte_length_invalid_argument(stub, spec):
    req = codec.build_request("ctr", contract_feeds(spec, 2))
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    err = call_error(stub, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'dense': FP32 shape [2, 4] needs 32 bytes, got 28 bytes" in err.details()


def test_malformed_bytes_tensor_invalid_argument(stub, spec):
    f = contract_feeds(spec, 2)
    req = codec.build_request("ctr", {"dense": f["dense"], "cat_raw": raw_values(spec, 2), "hist": f["hist"]})
    req.raw_input_contents[1] = b"\xff\xff\x00\x00abc" + b"\x00" * 40  # element 0 claims 65535 bytes
    err = call_error(stub, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input 'cat_raw': BYTES element 0" in err.details()


def test_typed_contents_count_and_raw_count(stub, spec):
    req = codec.build_request("ctr", contract_feeds(spec, 2), typed=True)
    del req.inputs[0].contents.fp32_contents[-1]
    err = call_error(stub, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 8 FP32 element(s)" in err.details()
    req = codec.build_request("ctr", contract_feeds(spec, 2))
    del req.raw_input_contents[-1]
    err = call_error(stub, req)
    assert "one buffer per input: 3 input(s), got 2" in err.details()


def test_plain_model_errors(stub):
    good = {"x": np.ones((2, 3), np.float32), "k": np.ones((2, 2), np.int32), "s": np.array([b"a", b"b"], dtype=object)}
    for bad, expected in (
        ({**good, "x": np.ones((2, 4), np.float32)}, "input 'x': got unexpected shape [2, 4], expected [-1, 3]"),
        ({**good, "k": np.ones((2, 2), np.int64)}, "input 'k': got datatype INT64, expected INT32"),
        ({k: v for k, v in good.items() if k != "s"}, "missing input(s) ['s']"),
    ):
        err = call_error(stub, codec.build_request("plain", bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in err.details()


def test_too_many_rows_and_too_big_message(stub, spec):
    err = call_error(stub, codec.build_request("ctr", contract_feeds(spec, 65)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "65 rows exceed max_batch_size 64" in err.details()
    big = {"x": np.ones((100_000, 3), np.float32), "k": np.ones((100_000, 2), np.int32),
           "s": np.array([b""] * 100_000, dtype=object)}  # ~2.4 MB, over the test server's 1 MiB
    err = call_error(stub, codec.build_request("plain", big))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_survives_bad_requests(triton, spec, ort_session):
    feeds = contract_feeds(spec, 2, seed=10)
    np.testing.assert_array_equal(triton.infer("ctr", triton_inputs(feeds)).as_numpy("ctr"),
                                  ort_session.run(["ctr"], feeds)[0])


# ----------------------------------------------------------------------- health and reflection
def test_health_follows_readiness(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="ctr")).status == serving
        assert health.Check(health_pb2.HealthCheckRequest(service="broken")).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {"inference.GRPCInferenceService", "grpc.health.v1.Health",
                     "grpc.reflection.v1alpha.ServerReflection"}


def test_async_client(server, spec, ort_session):
    import asyncio

    from ctredge.serve.client import AsyncClient

    feeds = contract_feeds(spec, 6, seed=12)

    async def go():
        async with AsyncClient(server.url) as c:
            assert await c.live() and await c.ready() and await c.model_ready("ctr", "2")
            assert (await c.feature_spec("ctr")) == spec and (await c.feature_spec("plain")) is None
            many = await asyncio.gather(*(c.predict("ctr", feeds) for _ in range(8)))
            with pytest.raises(RemoteError) as info:
                await c.predict("nope", feeds)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            return many

    want = ort_session.run(["ctr"], feeds)[0].reshape(-1)
    for got in asyncio.run(go()):
        np.testing.assert_array_equal(got, want)


def test_missing_repository_fails_start(tmp_path):
    from ctredge.serve.errors import LoadError
    from ctredge.serve.server import ServerThread

    with pytest.raises(LoadError, match="is not a folder"):
        ServerThread(tmp_path / "nope").start()
