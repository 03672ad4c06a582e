"""Protocol tensors <-> numpy: Triton's BYTES encoding, raw and typed contents, their errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from ctredge.serve import codec
from ctredge.serve.errors import InvalidInput


def test_bytes_encoding_by_hand():
    assert codec.serialize_bytes(np.array([b"ab", b"", "\u00e9"], dtype=object)) == \
        b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"
    out = codec.deserialize_bytes(b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x01\x00\x00\x00c", 3)
    assert out.dtype == object and list(out) == [b"ab", b"", b"c"]


@given(st.lists(st.binary(max_size=12), max_size=20))
def test_bytes_round_trip_and_agreement_with_tritonclient(values):
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    raw = codec.serialize_bytes(arr)
    if values:
        assert raw == serialize_byte_tensor(arr).item()  # tritonclient's own encoder
        assert list(deserialize_bytes_tensor(raw)) == values
    assert list(codec.deserialize_bytes(raw, len(values))) == values


def test_uniform_width_fast_path_keeps_trailing_nuls():
    values = [b"ab\x00", b"cd\x00"]  # numpy S would trim the NULs: the loop handles these
    assert list(codec.deserialize_bytes(codec.serialize_bytes(values), 2)) == values
    values = [b"abcd", b"efgh", b"ijkl"]
    assert list(codec.deserialize_bytes(codec.serialize_bytes(values), 3)) == values


@pytest.mark.parametrize("buf, count, message", [
    (b"\x05\x00\x00\x00ab", 1, "claims 5 bytes"),
    (b"\x01\x00\x00\x00ab", 1, "1 left over"),
    (b"\x03\x00\x00\x00abc\x01\x00", 2, "expected a 4-byte length"),
    (b"x", 0, "0 elements carries 1 bytes"),
    (b"\x00" * 8, 1 << 40, "need at least 4398046511104 bytes"),  # refused before allocating
])
def test_bytes_errors(buf, count, message):
    with pytest.raises(InvalidInput, match=message):
        codec.deserialize_bytes(buf, count, "t")


@pytest.mark.parametrize("arr", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64).reshape(4, 1),
    np.array([[True, False]]), np.arange(3, dtype=np.int8), np.arange(3, dtype=np.uint16),
    np.arange(3, dtype=np.float16), np.arange(2, dtype=np.float64), np.arange(2, dtype=np.uint64),
    np.array([[b"a", b"bc"]], dtype=object), np.array([[b"x"], [b""]], dtype="S2"),
])
@pytest.mark.parametrize("typed", [False, True])
def test_request_round_trip(arr, typed):
    if typed and arr.dtype == np.float16:
        with pytest.raises(InvalidInput, match="FP16 cannot be sent as typed contents"):
            codec.build_request("m", {"t": arr}, typed=True)
        return
    req = codec.build_request("m", {"t": arr}, typed=typed)
    assert bool(req.raw_input_contents) is not typed
    got = codec.decode_inputs(pb.ModelInferRequest.FromString(req.SerializeToString()))["t"]
    assert got.shape == arr.shape
    if arr.dtype.kind == "S":
        assert got.dtype == object and got.tolist() == arr.astype(object).tolist()
    else:
        assert got.dtype == arr.dtype and np.array_equal(got, arr)


def test_datatypes():
    assert codec.datatype_of(np.zeros(1, np.float32)) == "FP32"
    assert codec.datatype_of(np.zeros(1, "S3")) == codec.datatype_of(np.zeros(1, object)) == "BYTES"
    assert codec.ort_datatype("tensor(int64)") == "INT64" and codec.ort_datatype("tensor(string)") == "BYTES"
    with pytest.raises(InvalidInput, match="no Open Inference Protocol datatype"):
        codec.datatype_of(np.zeros(1, np.complex64))


def test_decode_errors():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="FP32", shape=[2])
    req.inputs.add(name="a", datatype="FP32", shape=[2])
    req.raw_input_contents.extend([b"\0" * 8, b"\0" * 8])
    with pytest.raises(InvalidInput, match="'a' appears more than once"):
        codec.decode_inputs(req)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="FP8", shape=[1])
    with pytest.raises(InvalidInput, match="unknown datatype 'FP8'"):
        codec.decode_inputs(req)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="FP32", shape=[-1, 2])
    req.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput, match="negative dimension"):
        codec.decode_inputs(req)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    with pytest.raises(InvalidInput, match=r"INT8 values must lie in \[-128, 127\]"):
        codec.decode_inputs(req)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="FP32", shape=[1 << 40, 1 << 40])  # no allocation before the size check
    req.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidInput, match="needs 4835703278458516698824704 bytes, got 4 bytes"):
        codec.decode_inputs(req)


def test_response_is_raw_and_decodes():
    req = pb.ModelInferRequest(model_name="m", id="r1")
    resp = codec.encode_response(req, "m", "3", {"ctr": np.array([[0.25], [0.5]], np.float32),
                                                 "s": np.array(["x", "yz"], dtype=object)})
    assert resp.id == "r1" and resp.model_version == "3" and len(resp.raw_output_contents) == 2
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("ctr", "FP32", [2, 1]), ("s", "BYTES", [2])]
    out = codec.decode_response(resp)
    assert out["ctr"].tolist() == [[0.25], [0.5]] and out["s"].tolist() == [b"x", b"yz"]


def test_requested_outputs():
    req = pb.ModelInferRequest(model_name="m")
    assert codec.requested_outputs(req, ["a", "b"]) == ["a", "b"]
    req.outputs.add(name="b")
    assert codec.requested_outputs(req, ["a", "b"]) == ["b"]
    req.outputs.add(name="c")
    with pytest.raises(InvalidInput, match=r"unknown output\(s\) \['c'\]"):
        codec.requested_outputs(req, ["a", "b"])
