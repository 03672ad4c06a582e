"""KServe v2 REST beside gRPC: unmodified ``tritonclient.http`` and raw HTTP against the same server as
``tritonclient.grpc``; same answers, same errors (HTTP status + the gRPC message), same counting."""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from servekit import contract_feeds, ctr_model, raw_values, save, small_spec
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ctredge.serve import codec
from ctredge.serve.client import ranking_inputs
from ctredge.serve.rest import http_status
from ctredge.serve.server import ServerOptions, ServerThread

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- servers and clients
@pytest.fixture(scope="module")
def rest(repo):
    """The session repository (ctr v1+v2, plain, broken) on gRPC + REST + metrics, 1 MiB messages."""
    with ServerThread(repo, port=0, http_port=0, max_message_bytes=1 << 20, metrics_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def hc(rest):
    with th.InferenceServerClient(f"127.0.0.1:{rest.server.http_port}", network_timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def gc(rest):
    with tg.InferenceServerClient(rest.url) as c:
        yield c


@pytest.fixture(scope="module")
def stub(rest):
    with grpc.insecure_channel(rest.url) as ch:
        yield service_pb2_grpc.GRPCInferenceServiceStub(ch)


def _dt(arr: np.ndarray) -> str:
    return "BYTES" if arr.dtype == object else codec.datatype_of(arr)


def _inputs(mod, feeds, binary=True):
    out = []
    for name, arr in feeds.items():
        i = mod.InferInput(name, list(arr.shape), _dt(arr))
        if mod is th:
            i.set_data_from_numpy(arr, binary_data=binary)
        else:
            i.set_data_from_numpy(arr)
        out.append(i)
    return out


def _both(hc, gc, model, feeds, binary, outputs=None, **kw):
    """The answers of tritonclient.http (JSON or binary) and tritonclient.grpc for the same tensors."""
    ho = [th.InferRequestedOutput(n, binary_data=binary) for n in outputs] if outputs else None
    go = [tg.InferRequestedOutput(n) for n in outputs] if outputs else None
    h = hc.infer(model, _inputs(th, feeds, binary), outputs=ho, **kw)
    g = gc.infer(model, _inputs(tg, feeds), outputs=go, **kw)
    return h, g


def _request(rest, method, path, body=b"", headers=None, port=None, conn=None):
    """(status, parsed JSON or raw bytes, headers) of one raw HTTP call."""
    c = conn or http.client.HTTPConnection("127.0.0.1", port or rest.server.http_port, timeout=20)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        ctype = r.getheader("Content-Type", "")
        parsed = json.loads(data) if data and ctype.startswith("application/json") else data
        return r.status, parsed, dict(r.getheaders())
    finally:
        if conn is None:
            c.close()


def _post_json(rest, path, doc, headers=None):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return _request(rest, "POST", path, body, headers)


def _grpc_error(stub, request) -> tuple[str, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    return info.value.code().name, info.value.details()


def _scrape(rest) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{rest.server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, metric: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _stats(gc, model="ctr", version="2"):
    s = gc.get_inference_statistics(model, version, as_json=True)["model_stats"][0]["inference_stats"]
    return int(s["success"].get("count", 0)), int(s["fail"].get("count", 0))


# ----------------------------------------------------------------------------- same answers
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("version", ["", "1"])
def test_rest_and_grpc_give_identical_answers(hc, gc, spec, binary, version):
    feeds = contract_feeds(spec, 7, seed=3)  # NaN (missing) dense values and id 0 included
    h, g = _both(hc, gc, "ctr", feeds, binary, outputs=["ctr"], model_version=version)
    assert h.get_response()["model_version"] == g.get_response().model_version == (version or "2")
    assert h.as_numpy("ctr").dtype == np.float32
    np.testing.assert_array_equal(h.as_numpy("ctr"), g.as_numpy("ctr"))
    out = h.get_response()["outputs"][0]
    assert ("parameters" in out) == binary and ("data" in out) == (not binary)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_raw_values_and_ranking_requests(hc, gc, spec, binary):
    n = 9
    feeds = contract_feeds(spec, n, seed=4)
    raw = raw_values(spec, n, seed=4)
    for side in ("user", "context"):
        for kind, arr in (("dense", feeds["dense"]), ("cat", raw)):
            cols = spec.columns(kind, side)
            arr[:, cols] = arr[:1, cols]
    expanded = {"dense": feeds["dense"], "cat_raw": raw, "hist_raw": np.array([[b"7,a,42"]] * n, dtype=object)}
    ranking = ranking_inputs(spec, expanded)
    assert ranking["cat_raw_user"].shape[0] == 1 and ranking["cat_raw_item"].shape[0] == n
    h, g = _both(hc, gc, "ctr", ranking, binary)
    np.testing.assert_array_equal(h.as_numpy("ctr"), g.as_numpy("ctr"))
    full, _ = _both(hc, gc, "ctr", expanded, binary)
    np.testing.assert_array_equal(h.as_numpy("ctr"), full.as_numpy("ctr"))


def test_requested_outputs_bytes_and_mixed_json_binary(hc, gc):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    k = np.array([[1, -2], [3, 4], [0, 2**31 - 1], [-(2**31), 5]], dtype=np.int32)
    s = np.array([b"ab", "\u00e9t\u00e9".encode(), b"", b"z"], dtype=object)
    feeds = {"x": x, "k": k, "s": s}
    for binary in (True, False):
        h, g = _both(hc, gc, "plain", feeds, binary, outputs=["name"])
        assert [o["name"] for o in h.get_response()["outputs"]] == ["name"]
        got = [v.encode() if isinstance(v, str) else v for v in h.as_numpy("name")]  # JSON BYTES are strings
        assert got == list(g.as_numpy("name")) == list(s)
    # no outputs named: tritonclient asks for binary_data_output, every output comes back
    h, g = _both(hc, gc, "plain", feeds, True)
    np.testing.assert_array_equal(h.as_numpy("y"), g.as_numpy("y"))
    # some inputs in JSON, some as binary data, outputs as the request says per output
    ins = [th.InferInput("x", [4, 3], "FP32").set_data_from_numpy(x, binary_data=False),
           th.InferInput("k", [4, 2], "INT32").set_data_from_numpy(k, binary_data=True),
           th.InferInput("s", [4], "BYTES").set_data_from_numpy(s, binary_data=True)]
    r = hc.infer("plain", ins, outputs=[th.InferRequestedOutput("y", binary_data=False),
                                        th.InferRequestedOutput("name", binary_data=True)])
    np.testing.assert_array_equal(r.as_numpy("y"), g.as_numpy("y"))
    assert list(r.as_numpy("name")) == list(s)


def test_large_json_request_is_converted_off_the_loop(hc, gc):
    n = 4000  # 24,000 elements: parsed and converted on the decoder thread
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(n, 3)).astype(np.float32), "k": rng.integers(-9, 9, (n, 2)).astype(np.int32),
             "s": np.array([f"r{i}".encode() for i in range(n)], dtype=object)}
    h, g = _both(hc, gc, "plain", feeds, False, outputs=["y"])
    np.testing.assert_array_equal(h.as_numpy("y"), g.as_numpy("y"))


def test_nested_json_data_gzip_and_request_id(rest, hc, spec):
    feeds = contract_feeds(spec, 2, seed=5)
    feeds["dense"][:] = np.nan_to_num(feeds["dense"], nan=1.5)
    doc = {"id": "req-7", "inputs": [{"name": n, "datatype": _dt(a), "shape": list(a.shape), "data": a.tolist()}
                                     for n, a in feeds.items()]}
    status, body, _ = _post_json(rest, "/v2/models/ctr/infer", doc)
    assert status == 200 and body["id"] == "req-7" and body["model_version"] == "2"
    flat = hc.infer("ctr", _inputs(th, feeds, False), request_id="req-7")
    np.testing.assert_array_equal(np.array(body["outputs"][0]["data"], np.float32), flat.as_numpy("ctr").ravel())
    zipped = hc.infer("ctr", _inputs(th, feeds, True), request_compression_algorithm="gzip")
    np.testing.assert_array_equal(zipped.as_numpy("ctr"), flat.as_numpy("ctr"))
    status, body, _ = _request(rest, "POST", "/v2/models/ctr/infer", gzip.compress(json.dumps(doc).encode()),
                               {"Content-Encoding": "gzip"})
    assert status == 200, body


# ----------------------------------------------------------------------------- metadata, health, stats
def test_health_metadata_config_index_and_stats(rest, hc, gc):
    assert hc.is_server_live() and hc.is_server_ready()
    assert hc.is_model_ready("ctr") and hc.is_model_ready("ctr", "1")
    assert not hc.is_model_ready("broken") and not hc.is_model_ready("nope") and not hc.is_model_ready("ctr", "9")
    assert hc.get_server_metadata() == gc.get_server_metadata(as_json=True)
    meta = hc.get_model_metadata("ctr")
    gmeta = gc.get_model_metadata("ctr", as_json=True)
    assert meta["inputs"][0] == {"name": "dense", "datatype": "FP32", "shape": [-1, 4]}
    assert [t["name"] for t in meta["inputs"]] == [t["name"] for t in gmeta["inputs"]]
    assert meta["versions"] == gmeta["versions"] == ["1", "2"]
    status, _, headers = _request(rest, "GET", "/v2/models/ctr/versions/1")
    assert status == 200 and headers["ctredge-execution-provider"] == "CPUExecutionProvider"
    config = hc.get_model_config("ctr")
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [4]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["parameters"]["execution_provider"] == {"string_value": "CPUExecutionProvider"}
    index = hc.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {("ctr", "1", "READY"), ("ctr", "2", "READY"),
                                                                       ("plain", "1", "READY")}
    broken = [m for m in index if m["name"] == "broken"][0]
    assert broken["state"] == "UNAVAILABLE" and broken["reason"]
    status, body, _ = _post_json(rest, "/v2/repository/index", {"ready": True})
    assert status == 200 and all(m["state"] == "READY" for m in body)
    stats = hc.get_inference_statistics("ctr")
    assert {s["version"] for s in stats["model_stats"]} == {"1", "2"}
    assert isinstance(stats["model_stats"][0]["inference_stats"]["success"]["count"], int)
    assert len(hc.get_inference_statistics()["model_stats"]) >= 3


def test_each_rest_request_is_counted_once(rest, hc, gc, spec):
    feeds = contract_feeds(spec, 3, seed=6)
    before, text0 = _stats(gc), _scrape(rest)
    hc.infer("ctr", _inputs(th, feeds, True))
    hc.infer("ctr", _inputs(th, feeds, False))
    bad = dict(feeds, cat=feeds["cat"].astype(np.int32))  # refused by the header check (datatype)
    with pytest.raises(InferenceServerException):
        hc.infer("ctr", _inputs(th, bad, False))
    doc = {"inputs": [{"name": "dense", "datatype": "FP32", "shape": [1, 4], "data": ["a", 1, 2, 3]}]}
    assert _post_json(rest, "/v2/models/ctr/infer", doc)[0] == 400  # refused while its JSON data is converted
    assert _post_json(rest, "/v2/models/ctr/infer", b"{not json")[0] == 400  # no request at all: model ""
    after, text1 = _stats(gc), _scrape(rest)
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)

    def moved(**labels):
        return _metric(text1, "ctredge_requests_total", **labels) - _metric(text0, "ctredge_requests_total", **labels)

    assert moved(model="ctr", code="OK") == 2
    assert moved(model="ctr", code="INVALID_ARGUMENT") == 2
    assert moved(model="", code="INVALID_ARGUMENT") == 1


# ----------------------------------------------------------------------------- errors: same as gRPC
def _rest_error(hc, model, feeds, binary=True, **kw) -> tuple[int, str]:
    with pytest.raises(InferenceServerException) as info:
        hc.infer(model, _inputs(th, feeds, binary), **kw)
    return int(info.value.status()), info.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_errors_carry_the_grpc_message_and_its_http_status(hc, stub, spec, binary):
    feeds = contract_feeds(spec, 2)
    cases = {
        "unknown model": ("nope", feeds, {}),
        "unknown version": ("ctr", feeds, {"model_version": "9"}),
        "not an integer version": ("ctr", feeds, {"model_version": "x"}),
        "model failed to load": ("broken", feeds, {}),
        "wrong datatype": ("ctr", dict(feeds, dense=feeds["dense"].astype(np.float64)), {}),
        "wrong rank": ("ctr", dict(feeds, cat=feeds["cat"].reshape(-1)), {}),
        "wrong width": ("ctr", dict(feeds, cat=feeds["cat"][:, :3]), {}),
        "too many rows": ("ctr", contract_feeds(spec, 65), {}),
        "id out of range": ("ctr", dict(feeds, cat=feeds["cat"] + 10_000), {}),
        "unknown input": ("ctr", dict(feeds, extra=np.zeros((2, 1), np.float32)), {}),
        "missing input": ("ctr", {"dense": feeds["dense"]}, {}),
        "infinite dense": ("ctr", dict(feeds, dense=np.full((2, 4), np.inf, np.float32)), {}),
        "parameters": ("ctr", feeds, {"priority": 3}),
    }
    for case, (model, f, kw) in cases.items():
        if case == "infinite dense" and not binary:
            continue  # JSON refuses Infinity itself (below)
        status, message = _rest_error(hc, model, f, binary, **kw)
        grpc_req = codec.build_request(model, f, model_version=kw.get("model_version", ""))
        if "priority" in kw:
            grpc_req.parameters["priority"].int64_param = 3
        code, details = _grpc_error(stub, grpc_req)
        assert (status, message) == (http_status(code), details), case
        assert status in (400, 404, 501, 503), case
    assert _rest_error(hc, "ctr", feeds, binary, outputs=[th.InferRequestedOutput("nope")])[1] == \
        "unknown output(s) ['nope']; the model has ['ctr']"


def test_statuses_map_from_grpc():
    assert [http_status(c) for c in ("INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
                                     "UNAUTHENTICATED", "PERMISSION_DENIED", "DEADLINE_EXCEEDED",
                                     "UNIMPLEMENTED", "FAILED_PRECONDITION", "INTERNAL")] == \
        [400, 404, 503, 429, 401, 403, 504, 501, 400, 500]


def _tensor(name, datatype, shape, data=None, **params):
    t = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        t["data"] = data
    if params:
        t["parameters"] = params
    return t


def _good(spec, rows=1):
    f = contract_feeds(spec, rows)
    f["dense"] = np.nan_to_num(f["dense"], nan=0.5)
    return [_tensor(n, _dt(a), list(a.shape), a.tolist()) for n, a in f.items()]


BAD_JSON = [
    (b"", "not valid JSON"),
    (b"{\"inputs\": [", "not valid JSON"),
    (b"[1, 2]", "an inference request is a JSON object, got an array"),
    (b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
    (b"\xff\xfe{}", "not valid JSON"),
    (json.dumps({"inputs": [], "extra": 1}).encode(), "unknown key(s) ['extra']"),
    (json.dumps({"inputs": {}}).encode(), "'inputs': expected a JSON array of tensors, got an object"),
    (json.dumps({"inputs": [7]}).encode(), "inputs[0]: expected a JSON object, got an integer"),
    (json.dumps({"inputs": [{"name": 3, "datatype": "FP32", "shape": [1]}]}).encode(),
     "inputs[0].name: expected a string, got an integer"),
    (json.dumps({"inputs": [_tensor("dense", "FP32", [1, "4"], [1])]}).encode(),
     "shape [1, \"4\"]: expected integers, got a string"),
    (json.dumps({"inputs": [_tensor("dense", "FP32", [1] * 9, [1])]}).encode(), "9 dimensions, expected at most 8"),
    (json.dumps({"inputs": [_tensor("dense", "FP32", [1, 4])]}).encode(),
     "input 'dense' has no data: expected 'data' or parameters.binary_data_size"),
    (json.dumps({"inputs": [_tensor("dense", "FP32", [1, 4], {"a": 1})]}).encode(),
     "input 'dense' data: expected a JSON array, got an object"),
    (json.dumps({"inputs": [_tensor("dense", "FP32", [1, 4], [1], binary_data_size=4)]}).encode(),
     "has both 'data' and parameters.binary_data_size"),
    (json.dumps({"inputs": [_tensor("dense", "FP32", [1, 4], binary_data_size=16)]}).encode(),
     "binary_data_size is 16 bytes, but only 0 bytes of binary data remain"),
    (json.dumps({"inputs": [_tensor("dense", "FP32", [1, 4], binary_data_size=-1)]}).encode(),
     "binary_data_size: expected a byte count >= 0, got an integer -1"),
    (json.dumps({"inputs": [], "parameters": {"binary_data_output": "yes"}}).encode(),
     "parameters.binary_data_output: expected true or false, got a string"),
    (json.dumps({"inputs": [], "outputs": [{"name": "ctr", "x": 1}]}).encode(), "outputs[0]: unknown key(s) ['x']"),
    (b'{"inputs": [{"name": "dense", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, Infinity]}]}',
     "the JSON holds Infinity: expected finite numbers (NaN stands for a missing value)"),
    (json.dumps({"inputs": [_tensor("\ud800", "FP32", [1], [1])]}).encode(), "not valid Unicode"),
    (b'{"inputs": [], "parameters": {"\\ud800": 1}}', "request parameter name: the string is not valid Unicode"),
    (b'{"id": 5, "inputs": []}', "id: expected a string, got an integer"),
]


@pytest.mark.parametrize("body,needle", BAD_JSON, ids=range(len(BAD_JSON)))
def test_malformed_requests_are_400_and_the_server_keeps_serving(rest, hc, spec, body, needle):
    status, answer, _ = _post_json(rest, "/v2/models/ctr/infer", body)
    assert status == 400 and needle in answer["error"], answer
    assert hc.is_server_ready()


@pytest.mark.parametrize("inputs,needle", [
    (lambda g: [dict(g[0], data=g[0]["data"][0][:3])] + g[1:], "input 'dense': shape [1, 4] needs 4 FP32 element(s) "
                                                               "in 'data', got 3"),
    (lambda g: [dict(g[0], data=g[0]["data"] * 2)] + g[1:], "input 'dense': shape needs 4 element(s), got more"),
    (lambda g: g[:1] + [dict(g[1], data=[[1.5] * 5])] + g[2:], "input 'cat': INT64 data must be integers, got a "
                                                               "number at element 0 (1.5)"),
    (lambda g: g[:1] + [dict(g[1], data=[[True] * 5])] + g[2:], "INT64 data must be integers, got a boolean"),
    (lambda g: g[:1] + [dict(g[1], data=[[2**64] * 5])] + g[2:], "INT64 values must lie in"),
    (lambda g: [dict(g[0], data=[[1, 2, 3, 1e39]])] + g[1:], "element 3 is 1e+39, expected a finite FP32 number"),
    (lambda g: [dict(g[0], data=[[1, 2, 3, "4"]])] + g[1:], "FP32 data must be numbers, got a string at element 3"),
    (lambda g: [_tensor("cat_raw", "BYTES", [1, 5], [["a", "b", "c", "d", 5]])] + g[:1] + g[2:],
     "input 'cat_raw': BYTES data must be strings, got an integer at element 4 (5)"),
], ids=["few", "many", "float-as-int", "bool-as-int", "int-range", "fp32-range", "string-as-float", "int-as-bytes"])
def test_json_data_of_the_wrong_type_or_count(rest, spec, inputs, needle):
    status, answer, _ = _post_json(rest, "/v2/models/ctr/infer", {"inputs": inputs(_good(spec))})
    assert status == 400 and needle in answer["error"], answer


def test_binary_sizes_must_add_up(rest, spec, stub):
    dense = np.ones((1, 4), np.float32).tobytes()
    cat = np.zeros((1, 5), np.int64).tobytes()
    hist = np.zeros((1, 5), np.int64).tobytes()

    def send(sizes, blob, header=None):
        doc = json.dumps({"inputs": [_tensor(n, dt, [1, w], binary_data_size=s) for n, dt, w, s in
                                     zip(("dense", "cat", "hist"), ("FP32", "INT64", "INT64"), (4, 5, 5), sizes)]})
        hdr = {"Inference-Header-Content-Length": str(len(doc)) if header is None else header}
        return _request(rest, "POST", "/v2/models/ctr/infer", doc.encode() + blob, hdr)

    assert send((16, 40, 40), dense + cat + hist)[0] == 200
    status, answer, _ = send((16, 40, 40), dense + cat + hist + b"xx")
    assert status == 400 and "carries 98 bytes of binary data after the JSON header, but the inputs' " \
                                 "parameters.binary_data_size add up to 96" in answer["error"]
    status, answer, _ = send((12, 40, 44), dense + cat + hist)  # adds up, but dense's bytes do not fit its shape
    grpc_req = pb.ModelInferRequest(model_name="ctr")
    for n, dt, w in (("dense", "FP32", 4), ("cat", "INT64", 5), ("hist", "INT64", 5)):
        grpc_req.inputs.add(name=n, datatype=dt, shape=[1, w])
    grpc_req.raw_input_contents.extend([dense[:12], cat, dense[12:] + hist])
    assert (status, answer["error"]) == (400, _grpc_error(stub, grpc_req)[1])
    assert "needs 16 bytes, got 12 bytes" in answer["error"]
    for header, needle in (("x12", "expected the JSON header's length in bytes, got 'x12'"),
                           ("99999", "is 99999 bytes, but the body has only"),
                           ("-1", "got '-1'"), ("\u00b2", "expected the JSON header's length in bytes")):
        status, answer, _ = send((16, 40, 40), dense + cat + hist, header)
        assert status == 400 and needle in answer["error"], header


def test_body_limit_is_enforced_before_reading(rest, hc):
    big = b"x" * ((1 << 20) + 1)
    status, answer, _ = _request(rest, "POST", "/v2/models/ctr/infer", big)
    assert status == 413 and answer["error"] == f"the request body has {len(big)} bytes, expected at most " \
                                                f"{1 << 20} bytes (--max-message-mb)"
    # no Content-Length (chunked): refused as soon as it grows past the limit
    c = http.client.HTTPConnection("127.0.0.1", rest.server.http_port, timeout=20)
    c.request("POST", "/v2/models/ctr/infer", body=iter([big[:600_000], big[600_000:]]),
              encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    r = c.getresponse()
    assert r.status == 413 and "expected at most 1048576 bytes" in json.loads(r.read())["error"]
    c.close()
    assert hc.is_server_ready()


@pytest.mark.parametrize("name", ["..", "../ctr", "%2e%2e", "ctr%00", "a" * 300, "%C3%A9t%C3%A9", "ctr%2F1"])
def test_odd_model_names_are_not_found(rest, name):
    status, answer, _ = _request(rest, "GET", f"/v2/models/{name}")
    assert status == 404, (name, answer)
    status, answer, _ = _post_json(rest, f"/v2/models/{name}/infer", {"inputs": []})
    assert status == 404, (name, answer)


def test_unknown_endpoints_methods_and_unimplemented_extensions(rest):
    status, answer, _ = _request(rest, "GET", "/v2/nope")
    assert status == 404 and "this server speaks KServe v2 REST under /v2" in answer["error"]
    status, answer, headers = _request(rest, "GET", "/v2/models/ctr/infer")
    assert status == 405 and headers["Allow"] == "POST"
    assert "GET is not allowed on '/v2/models/ctr/infer'; expected POST" in answer["error"]
    status, answer, _ = _request(rest, "GET", "/v2/systemsharedmemory/status")
    assert status == 501 and answer["error"] == "SystemSharedMemoryStatus is not implemented by this server"
    status, answer, _ = _request(rest, "POST", "/v2/cudasharedmemory/region/r/register", b"{}")
    assert status == 501 and answer["error"] == "CudaSharedMemoryRegister is not implemented by this server"
    assert _request(rest, "GET", "/v2/logging")[0] == 501
    status, answer, _ = _post_json(rest, "/v2/repository/models/ctr/load", {})
    assert status == 400 and "model control mode is 'none'" in answer["error"]


# ----------------------------------------------------------------------------- model control
@pytest.fixture(scope="module")
def control(tmp_path_factory):
    spec = small_spec()
    root = tmp_path_factory.mktemp("restctl")
    save(ctr_model(spec, seed=1), root / "repo" / "ctr" / "1" / "model.onnx")
    save(ctr_model(spec, seed=9), root / "outside" / "1" / "model.onnx")
    with ServerThread(root / "repo", port=0, http_port=0, model_control_mode="explicit") as s:
        yield s, root


def test_model_control_over_rest_follows_the_grpc_rules(control):
    s, root = control
    spec = small_spec()
    feeds = contract_feeds(spec, 2)
    with th.InferenceServerClient(f"127.0.0.1:{s.server.http_port}") as hc, \
            tg.InferenceServerClient(s.url) as gc:
        hc.unload_model("ctr")  # tritonclient sends unload_dependents; ctredge has no dependents
        assert not hc.is_model_ready("ctr")
        status, message = _rest_error(hc, "ctr", feeds)
        with pytest.raises(InferenceServerException) as info:
            gc.infer("ctr", _inputs(tg, feeds))
        assert status == 503 and message == info.value.message()
        hc.load_model("ctr")
        assert hc.is_model_ready("ctr")
        assert hc.infer("ctr", _inputs(th, feeds)).as_numpy("ctr").shape == (2, 1)
        with pytest.raises(InferenceServerException) as info:
            hc.load_model("ctr", config=json.dumps({"max_batch_size": 2}))
        with pytest.raises(InferenceServerException) as ginfo:
            gc.load_model("ctr", config=json.dumps({"max_batch_size": 2}))
        assert info.value.status() == "400" and "RepositoryModelLoad parameters" in info.value.message()
        assert info.value.message() == ginfo.value.message()
        status, answer, _ = _request(s, "POST", "/v2/repository/models/ctr/load", b'{"parameters": []}')
        assert status == 400 and "parameters: expected a JSON object" in answer["error"]
        for name in ("nope", "../outside", ".."):
            with pytest.raises(InferenceServerException) as info:
                hc.load_model(name)
            assert info.value.status() == "404", name
        assert [m["name"] for m in hc.get_model_repository_index()] == ["ctr"]
    shutil.rmtree(root / "outside")


def test_health_during_drain_and_refusals(repo, spec):
    s = ServerThread(repo, port=0, http_port=0).start()
    port = s.server.http_port
    feeds = _good(spec)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    assert _request(None, "GET", "/v2/health/ready", conn=conn)[0] == 200
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # every call is an arrival, which keeps the drain open while we ask
        status = _request(None, "GET", "/v2/health/ready", conn=conn)[0]
        seen.append(status)
        if status == 400:
            break
    assert seen[-1] == 400
    assert _request(None, "GET", "/v2/health/live", conn=conn)[0] == 200
    status, answer, _ = _request(None, "POST", "/v2/models/ctr/infer", json.dumps({"inputs": feeds}).encode(),
                                 conn=conn)
    assert status == 503 and "shutting down" in answer["error"]
    conn.close()
    stopper.join(30)
    assert not stopper.is_alive()
    with pytest.raises(OSError):
        _request(None, "GET", "/v2/health/live", port=port)


def test_options_validate_the_http_port():
    from ctredge.serve.errors import ServeError

    with pytest.raises(ServeError, match="http port must be in"):
        ServerOptions(http_port=70000)


def test_a_taken_http_port_fails_the_start(repo, rest):
    from ctredge.serve.errors import ServeError

    with pytest.raises(ServeError, match="for REST"):
        ServerThread(repo, port=0, http_port=rest.server.http_port).start()


# ----------------------------------------------------------------------------- tokens and TLS
from test_security import pki, tokens  # noqa: E402,F401  (the security tests' certificates and token files)


@pytest.fixture(scope="module")
def token_rest(repo, tokens):  # noqa: F811
    with ServerThread(repo, options=ServerOptions(port=0, http_port=0, infer_token_file=tokens["infer_file"],
                                                  admin_token_file=tokens["admin_file"], metrics_port=0,
                                                  max_message_bytes=1 << 20)) as s:
        yield s


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_tokens_guard_rest_with_the_grpc_roles_and_messages(token_rest, tokens, spec):  # noqa: F811
    s = token_rest
    doc = json.dumps({"inputs": _good(spec)}).encode()
    infer = ("POST", "/v2/models/ctr/infer", doc)
    status, answer, headers = _request(s, *infer)
    with grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        code, details = _grpc_error(stub, codec.build_request("ctr", contract_feeds(spec, 1)))
    assert (status, answer["error"]) == (401, details) and code == "UNAUTHENTICATED"
    assert headers["WWW-Authenticate"] == "Bearer"
    assert _request(s, *infer, _auth("x" * 20))[1]["error"] == "the bearer token is not valid"
    assert _request(s, *infer, {"Authorization": "Basic abc"})[0] == 401
    for who in ("infer", "infer2"):
        assert _request(s, *infer, _auth(tokens[who]))[0] == 200
        assert _request(s, "GET", "/v2/models/ctr", headers=_auth(tokens[who]))[0] == 200
    status, answer, _ = _request(s, *infer, _auth(tokens["admin"]))
    assert status == 403 and answer["error"] == "this token may not call ModelInfer (it needs an infer token)"
    admin_calls = [("GET", "/v2/models/stats", b""), ("POST", "/v2/repository/index", b""),
                   ("POST", "/v2/repository/models/ctr/load", b"{}"), ("GET", "/v2/systemsharedmemory/status", b"")]
    for call in admin_calls:
        assert _request(s, *call, _auth(tokens["infer"]))[0] == 403, call
        assert _request(s, *call)[0] == 401, call
    assert _request(s, *admin_calls[0], _auth(tokens["admin"]))[0] == 200
    assert _request(s, *admin_calls[1], _auth(tokens["admin"]))[0] == 200
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/ctr/ready"):  # open, as gRPC's health group
        assert _request(s, "GET", path)[0] == 200, path
    assert _request(s, "GET", "/v2")[0] == 401
    # the token is checked before the body is read: a body over the limit is still a 401
    assert _request(s, "POST", "/v2/models/ctr/infer", b"x" * (2 << 20))[0] == 401
    text = _scrape(s)
    assert _metric(text, "ctredge_refused_calls_total", method="ModelInfer", code="UNAUTHENTICATED") >= 4
    assert _metric(text, "ctredge_refused_calls_total", method="ModelInfer", code="PERMISSION_DENIED") == 1
    with th.InferenceServerClient(f"127.0.0.1:{s.server.http_port}") as hc:  # unmodified tritonclient.http
        r = hc.infer("ctr", _inputs(th, contract_feeds(spec, 2)), headers=_auth(tokens["infer"]))
        assert r.as_numpy("ctr").shape == (2, 1)
        with pytest.raises(InferenceServerException) as info:
            hc.get_inference_statistics("ctr", headers=_auth(tokens["infer"]))
        assert info.value.status() == "403"


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_rest_over_tls_with_the_grpc_port_files(repo, pki, spec, mutual):  # noqa: F811
    import ssl

    extra = {"tls_client_ca": pki["ca"]["cert"]} if mutual else {}
    with ServerThread(repo, options=ServerOptions(port=0, http_port=0, tls_cert=pki["server"]["cert"],
                                                  tls_key=pki["server"]["key"], **extra)) as s:
        port = s.server.http_port
        ctx = ssl.create_default_context(cafile=pki["ca"]["cert"])
        if mutual:
            ctx.load_cert_chain(pki["client"]["cert"], pki["client"]["key"])
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        assert _request(s, "GET", "/v2/health/ready", conn=conn)[0] == 200
        doc = json.dumps({"inputs": _good(spec)}).encode()
        assert _request(s, "POST", "/v2/models/ctr/infer", doc, conn=conn)[0] == 200
        conn.close()
        with pytest.raises((ssl.SSLError, ConnectionError)):  # a client that does not trust the server's CA
            _request(s, "GET", "/v2/health/live", conn=http.client.HTTPSConnection(
                "127.0.0.1", port, context=ssl.create_default_context(), timeout=10))
        with pytest.raises((http.client.HTTPException, ConnectionError)):  # plaintext on the TLS port
            _request(s, "GET", "/v2/health/live", port=port)
        if mutual:  # trusts the server, but brings no client certificate, or one of another CA
            for who in (None, "rogue"):
                bare = ssl.create_default_context(cafile=pki["ca"]["cert"])
                if who:
                    bare.load_cert_chain(pki[who]["cert"], pki[who]["key"])
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    _request(s, "GET", "/v2/health/live",
                             conn=http.client.HTTPSConnection("127.0.0.1", port, context=bare, timeout=10))
        else:
            with th.InferenceServerClient(f"127.0.0.1:{port}", ssl=True,
                                          ssl_options={"ca_certs": pki["ca"]["cert"]}) as hc:
                assert hc.infer("ctr", _inputs(th, contract_feeds(spec, 2))).as_numpy("ctr").shape == (2, 1)


def test_answers_do_not_name_the_http_library(rest):
    _, _, headers = _request(rest, "GET", "/v2/health/live")
    assert "Server" not in headers


def test_ctredge_serve_http_port_and_sigterm(repo):
    import os
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctredge.cli", "serve", "--repository", str(repo), "--port", "0",
                             "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2], env=env)
    try:
        assert " on 127.0.0.1:" in proc.stdout.readline()  # printed once ready
        port = None
        while port is None:
            line = proc.stderr.readline()
            assert line, "the server exited"
            found = re.search(r"KServe v2 REST on http://127\.0\.0\.1:(\d+)/v2", line)
            port = int(found.group(1)) if found else None
        assert _request(None, "GET", "/v2/health/ready", port=port)[0] == 200
        status, body, _ = _request(None, "GET", "/v2/models/plain", port=port)
        assert status == 200 and body["name"] == "plain"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err


# ----------------------------------------------------------------------------- fuzzing the REST body
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) |
                     st.text(max_size=6), lambda inner: st.lists(inner, max_size=5) |
                     st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=20)
_TENSOR = st.fixed_dictionaries(
    {"name": st.sampled_from(["dense", "cat", "hist", "cat_raw", "hist_raw", "x", "k", "s", ""]),
     "datatype": st.sampled_from(["FP32", "INT64", "INT32", "BYTES", "BOOL", "FP16", "UINT64", "NOPE"]),
     "shape": st.lists(st.integers(-2, 6), max_size=3)},
    optional={"data": st.lists(_JSON, max_size=12) | _JSON,
              "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "shared_memory_region", "x"]),
                                            st.integers(-2, 40) | _JSON, max_size=2)})
_BODY = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(_TENSOR, max_size=4) | _JSON, "outputs": st.lists(
        st.fixed_dictionaries({"name": st.sampled_from(["ctr", "y", "name", "nope"])},
                              optional={"parameters": st.dictionaries(st.just("binary_data"), _JSON, max_size=1)}),
        max_size=2),
    "parameters": st.dictionaries(st.sampled_from(["binary_data_output", "priority"]), _JSON, max_size=2),
    "id": _JSON})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_BODY, model=st.sampled_from(["ctr", "plain"]), tail=st.binary(max_size=64))
def test_fuzzed_bodies_get_a_client_status_never_a_500(rest, doc, model, tail):
    body = json.dumps(doc).encode()
    headers = {"Inference-Header-Content-Length": str(len(body))} if tail else {}
    status, answer, _ = _request(rest, "POST", f"/v2/models/{model}/infer", body + tail, headers)
    assert status in (200, 400, 404, 501, 503), answer
    if status != 200:
        assert isinstance(answer, dict) and answer["error"], answer


# ----------------------------------------------------------------------------- a request in flight
def _slow(s, model="ctr", seconds=0.6):
    """Make ``model``'s runs take ``seconds`` longer (in this process), so a request stays in flight."""
    import asyncio

    mv = s.server.repository.get(model)
    original = mv.scheduler.predict

    async def predict(feeds, deadline=None):
        await asyncio.sleep(seconds)
        return await original(feeds, deadline)

    mv.scheduler.predict = predict


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    return t, out


def _wait_in_flight(s, n=1):
    deadline = time.monotonic() + 10
    while s.server.servicer.in_flight < n:
        assert time.monotonic() < deadline, "the request never arrived"
        time.sleep(0.005)


def test_a_full_server_is_429_with_the_grpc_message(repo, spec):
    with ServerThread(repo, port=0, http_port=0, max_concurrent_rpcs=1) as s:
        _slow(s)
        doc = json.dumps({"inputs": _good(spec)}).encode()
        t, out = _in_thread(lambda: _request(s, "POST", "/v2/models/ctr/infer", doc))
        _wait_in_flight(s)
        status, answer, _ = _request(s, "POST", "/v2/models/ctr/infer", doc)
        with grpc.insecure_channel(s.url) as ch:
            code, details = _grpc_error(service_pb2_grpc.GRPCInferenceServiceStub(ch),
                                        codec.build_request("ctr", contract_feeds(spec, 1)))
        assert (status, answer["error"]) == (429, details) and code == "RESOURCE_EXHAUSTED"
        t.join(30)
        assert out["r"][0] == 200


def test_a_rest_request_in_flight_is_answered_through_the_drain(repo, spec):
    s = ServerThread(repo, port=0, http_port=0).start()
    _slow(s)
    doc = json.dumps({"inputs": _good(spec)}).encode()
    t, out = _in_thread(lambda: _request(s, "POST", "/v2/models/ctr/infer", doc))
    _wait_in_flight(s)
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    while s.server.servicer.accepting:
        time.sleep(0.005)
    status, answer, _ = _request(s, "POST", "/v2/models/ctr/infer", doc)  # a new one during the drain
    assert status == 503 and "shutting down" in answer["error"]
    t.join(30)
    stopper.join(30)
    assert out["r"][0] == 200 and out["r"][1]["outputs"][0]["shape"] == [1, 1]
