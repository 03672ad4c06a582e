"""Property-based malformed requests: the server always answers with a status, never crashes, keeps serving."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servekit import contract_feeds
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve.codec import build_request, decode_response

NAMES = ["dense", "cat", "hist", "cat_raw", "hist_raw", "cat_raw_user", "cat_item", "dense_item", "x", "k", "s", ""]
TYPES = ["FP32", "FP16", "FP64", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "BF16", "NOPE", ""]
# what a malformed request may get; INTERNAL or UNKNOWN would be a server bug
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}



@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


tensor = st.fixed_dictionaries({
    "name": st.sampled_from(NAMES),
    "datatype": st.sampled_from(TYPES),
    "shape": st.lists(st.integers(-3, 70), min_size=0, max_size=4),
    "raw": st.one_of(st.none(), st.binary(max_size=600)),
    "ints": st.lists(st.integers(-2**40, 2**40), max_size=20),
    "strings": st.lists(st.binary(max_size=12), max_size=8),
})
request = st.fixed_dictionaries({
    "model": st.sampled_from(["ctr", "plain", "broken", "nope", ""]),
    "version": st.sampled_from(["", "1", "2", "9", "x"]),
    "inputs": st.lists(tensor, max_size=5),
    "outputs": st.lists(st.sampled_from(["ctr", "y", "name", "zzz"]), max_size=2),
    "raw_mode": st.booleans(),
})


def _build(r: dict) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=r["model"], model_version=r["version"])
    for t in r["inputs"]:
        inp = req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        if r["raw_mode"]:
            req.raw_input_contents.append(t["raw"] or b"")
        elif t["datatype"] == "BYTES":
            inp.contents.bytes_contents.extend(t["strings"])
        elif t["datatype"] in ("FP32", "FP16", "BF16"):
            inp.contents.fp32_contents.extend(float(v) for v in t["ints"])
        else:
            inp.contents.int64_contents.extend(t["ints"])
    for name in r["outputs"]:
        req.outputs.add(name=name)
    return req


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=request)
def test_malformed_requests_always_get_a_status(stub, r):
    try:
        stub.ModelInfer(_build(r), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in EXPECTED, (exc.code(), exc.details())
        assert exc.details()


@pytest.fixture(scope="module")
def raw_call(server):
    with grpc.insecure_channel(server.url) as channel:
        yield channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), request.map(lambda r: _build(r).SerializeToString()).flatmap(
    lambda b: st.tuples(st.just(b), st.integers(0, max(0, len(b) - 1)), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):]))))
def test_arbitrary_bytes_always_get_a_status(raw_call, stub, data):
    """Random bytes and well-formed requests with a few bytes flipped: never INTERNAL/UNKNOWN, and still live."""
    try:
        raw_call(data, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in EXPECTED, (exc.code(), exc.details())
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


hostile_dims = st.lists(st.sampled_from([0, 1, 2, 5, 2**31, 2**62, 2**63 - 1]), min_size=0, max_size=12)
hostile_floats = st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e38, 3.4e38, float("inf"), float("-inf"), float("nan")])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dims=st.dictionaries(st.sampled_from(["dense", "cat", "hist", "cat_raw", "hist_raw"]), hostile_dims),
       values=st.lists(hostile_floats, min_size=4, max_size=4), ids=st.lists(
           st.sampled_from([0, 1, -1, 999, 10**6, 2**63 - 1, -2**63]), min_size=5, max_size=5))
def test_well_formed_requests_with_hostile_values(stub, spec, dims, values, ids):
    """Hostile shapes, ids and floats in otherwise valid requests: a status from the list, or a finite answer."""
    f = contract_feeds(spec, 1)
    f["dense"] = np.array([values], dtype=np.float32)
    f["cat"] = np.array([ids], dtype=np.int64)
    req = build_request("ctr", f)
    for t in req.inputs:
        if t.name in dims:
            del t.shape[:]
            t.shape.extend(dims[t.name])
    try:
        out = decode_response(stub.ModelInfer(req, timeout=10))["ctr"]
        assert np.isfinite(out).all()
    except grpc.RpcError as exc:
        assert exc.code() in EXPECTED, (exc.code(), exc.details())


def test_still_serving_after_the_fuzzing(stub, spec, ort_session):
    feeds = contract_feeds(spec, 3, seed=11)
    got = decode_response(stub.ModelInfer(build_request("ctr", feeds)))["ctr"]
    np.testing.assert_allclose(got, ort_session.run(["ctr"], feeds)[0], rtol=1e-6)
