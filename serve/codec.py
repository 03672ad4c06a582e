"""Open Inference Protocol v2 tensors <-> numpy (``dict[str, np.ndarray]``, DESIGN convention 5).

The protocol messages are tritonclient's generated stubs
(``tritonclient.grpc.service_pb2``): this module never defines ``inference.*``
messages of its own, so the server and tritonclient live in one process.

Datatypes (Triton names) and numpy dtypes:

=======  ============  ================================================
Triton   numpy         typed ``contents`` field
=======  ============  ================================================
BOOL     bool          ``bool_contents``
INT8/16  int8/16       ``int_contents``
INT32    int32         ``int_contents``
INT64    int64         ``int64_contents``
UINT8-32 uint8-32      ``uint_contents``
UINT64   uint64        ``uint64_contents``
FP16     float16       raw only
FP32     float32       ``fp32_contents``
FP64     float64       ``fp64_contents``
BYTES    object(bytes) ``bytes_contents``
=======  ============  ================================================

Raw contents are little-endian, row-major.  A BYTES tensor in raw form is, for
each element, a 4-byte little-endian length followed by that many bytes
(Triton's encoding).  A request carries either ``raw_input_contents`` for every
input or typed ``contents`` for every input; responses are always raw.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from ctredge.serve.errors import InvalidInput, Unimplemented

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_BY_DTYPE = {v: k for k, v in DATATYPES.items()}
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_LEN = struct.Struct("<I")


def datatype_of(arr: np.ndarray) -> str:
    """The Triton datatype name of a numpy array (``S``/``U``/object arrays are BYTES).

    Raises:
        InvalidInput: a dtype the protocol cannot carry.
    """
    if arr.dtype.kind in "SUO":
        return "BYTES"
    try:
        return _BY_DTYPE[arr.dtype.newbyteorder("=") if arr.dtype.byteorder == ">" else arr.dtype]
    except KeyError:
        raise InvalidInput(f"numpy dtype {arr.dtype} has no Open Inference Protocol datatype; "
                           f"expected one of {sorted(DATATYPES)}") from None


def ort_datatype(ort_type: str) -> str:
    """Triton datatype of an ONNX Runtime type string such as ``tensor(float)``.

    Raises:
        InvalidInput: a type the protocol cannot carry (bfloat16, sequences, maps...).
    """
    try:
        return ORT_TYPES[ort_type]
    except KeyError:
        raise InvalidInput(f"ONNX type {ort_type} cannot be carried by the protocol") from None


# --------------------------------------------------------------------------- BYTES
def serialize_bytes(values: np.ndarray | Iterable[Any]) -> bytes:
    """Triton's raw BYTES encoding of ``values`` (row-major): per element ``<u4 length`` + bytes.

    ``str`` elements are UTF-8 encoded, ``bytes`` kept, integers written in decimal.
    """
    arr = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=object)
    parts = []
    for v in arr.reshape(-1).tolist():
        if isinstance(v, str):
            v = v.encode("utf-8")
        elif not isinstance(v, (bytes, bytearray)):
            v = str(v).encode("ascii")
        parts.append(_LEN.pack(len(v)))
        parts.append(v)
    return b"".join(parts)


def deserialize_bytes(buf: bytes, count: int, name: str = "", max_value_bytes: int | None = None) -> np.ndarray:
    """Parse ``count`` length-prefixed elements from ``buf`` into a 1-D object array of bytes.

    ``max_value_bytes``: refuse an element longer than this (checked on its
    length prefix, before it is copied).

    Raises:
        InvalidInput: a length prefix points past the buffer, bytes are left over,
            or an element is longer than ``max_value_bytes``.
    """
    n = len(buf)
    if count * 4 > n:  # every element takes at least its 4-byte length: refuse before allocating
        raise InvalidInput(f"input {name!r}: {count} BYTES elements need at least {count * 4} bytes "
                           f"(a 4-byte length each), got {n} bytes")
    out = np.empty(count, dtype=object)
    if count == 0:
        if n:
            raise InvalidInput(f"input {name!r}: BYTES tensor with 0 elements carries {n} bytes")
        return out
    # fast path: every element has the same length k and none ends in NUL (numpy S would trim it)
    if n % count == 0 and n // count >= 4:
        k = n // count - 4
        mat = np.frombuffer(buf, dtype=np.uint8).reshape(count, k + 4)
        lens = np.ascontiguousarray(mat[:, :4]).view("<u4").reshape(-1)
        if (lens == k).all() and (k == 0 or not (mat[:, -1] == 0).any()):
            if max_value_bytes is not None and k > max_value_bytes:
                raise InvalidInput(f"input {name!r}: BYTES values of {k} bytes, expected at most {max_value_bytes}")
            if k == 0:
                out[:] = b""
                return out
            return np.ascontiguousarray(mat[:, 4:]).view(f"S{k}").reshape(-1).astype(object)
    values: list[bytes] = []
    append, unpack, off = values.append, _LEN.unpack_from, 0
    try:
        cap = n if max_value_bytes is None else max_value_bytes
        for i in range(count):  # a bad buffer is diagnosed below
            (size,) = unpack(buf, off)
            if size > cap and off + 4 + size <= n:
                raise InvalidInput(f"input {name!r}: BYTES element {i} has {size} bytes, expected at most {cap}")
            append(buf[off + 4:off + 4 + size])
            off += 4 + size
    except struct.error:
        off = -1
    if off == n:
        out[:] = values
        return out
    _diagnose_bytes(buf, count, name)
    raise InvalidInput(f"input {name!r}: malformed BYTES tensor")  # not reached: _diagnose_bytes raises


def _diagnose_bytes(buf: bytes, count: int, name: str) -> None:
    """Raise the :class:`InvalidInput` that says where a BYTES buffer goes wrong."""
    n = len(buf)
    off = 0
    for i in range(count):
        if off + 4 > n:
            raise InvalidInput(f"input {name!r}: BYTES element {i} of {count}: expected a 4-byte length at byte "
                               f"{off}, but the tensor has only {n} bytes (Triton's encoding: <u4 length + bytes)")
        (size,) = _LEN.unpack_from(buf, off)
        off += 4
        if off + size > n:
            raise InvalidInput(f"input {name!r}: BYTES element {i} of {count} claims {size} bytes at byte {off}, "
                               f"but only {n - off} remain")
        off += size
    if off != n:
        raise InvalidInput(f"input {name!r}: {count} BYTES elements take {off} bytes, got {n} bytes "
                           f"({n - off} left over)")


# --------------------------------------------------------------------------- requests (server side)
MAX_DIMS = 8  # more dimensions than any model here has; refused before anything is allocated
MAX_NAME_SHOWN = 64


def shown(name: str) -> str:
    """``repr`` of a client-given name, truncated for messages."""
    return repr(name if len(name) <= MAX_NAME_SHOWN else name[:MAX_NAME_SHOWN] + "...")


def _shape(name: str, dims: Sequence[int], max_elements: int | None = None) -> tuple[tuple[int, ...], int]:
    if len(dims) > MAX_DIMS:
        raise InvalidInput(f"input {shown(name)}: {len(dims)} dimensions, expected at most {MAX_DIMS}")
    shape = tuple(int(d) for d in dims)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {shown(name)}: shape {list(shape)} has a negative dimension")
    count = 1
    for d in shape:
        count *= d
    if max_elements is not None and (count > max_elements or any(d > max_elements for d in shape)):
        raise InvalidInput(f"input {shown(name)}: shape {list(shape)} is larger than this model takes "
                           f"(at most {max_elements} elements per request, limits.max_elements)")
    return shape, count


#: request parameters accepted and ignored: Triton's clients send them on every request, and on a unary
#: ModelInfer they change nothing (perf_analyzer 2.41 sets this one, meant for decoupled streaming models)
IGNORED_REQUEST_PARAMETERS = {"triton_enable_empty_final_response"}


def check_parameters(request: Any) -> None:
    """Refuse request, input and output ``parameters``: none is implemented (shared memory included).

    The boolean request parameters of :data:`IGNORED_REQUEST_PARAMETERS` are accepted and ignored.

    Raises:
        Unimplemented: naming the parameters.
    """
    found = [f"request parameter {shown(k)}" for k, v in request.parameters.items()
             if not (k in IGNORED_REQUEST_PARAMETERS and v.WhichOneof("parameter_choice") == "bool_param")]
    for t in request.inputs:
        found += [f"input {shown(t.name)} parameter {shown(k)}" for k in t.parameters]
    for o in request.outputs:
        found += [f"output {shown(o.name)} parameter {shown(k)}" for k in o.parameters]
    if found:
        shm = any("shared_memory" in f for f in found)
        raise Unimplemented(f"this server implements no inference parameters{' (no shared memory)' if shm else ''}; "
                            f"got {', '.join(found[:8])}" + (f" and {len(found) - 8} more" if len(found) > 8 else ""))


def check_request(request: Any, signature: Any, limits: Any) -> tuple[int, int]:
    """Check a request's header against the model before any per-element work.

    Returns ``(elements, bytes_payload)``: its element count and the bytes of its
    BYTES inputs (what decoding and hashing will cost).

    ``signature``: the model's (``check_header(name, datatype, shape)`` and
    ``value_limit(name)``); ``limits``: its :class:`~ctredge.serving_config.RequestLimits`.

    Raises:
        Unimplemented: parameters (shared memory and the like).
        InvalidInput: unknown or repeated names, wrong datatypes, ranks or fixed
            dimensions, or more elements or BYTES payload than ``limits`` allow.
    """
    check_parameters(request)
    inputs, raws = request.inputs, request.raw_input_contents
    if raws and len(raws) != len(inputs):
        raise InvalidInput(f"raw_input_contents must hold one buffer per input: {len(inputs)} input(s), "
                           f"got {len(raws)} buffer(s)")
    total = bytes_elements = payload = 0
    seen: set[str] = set()
    for i, t in enumerate(inputs):
        if t.name in seen:
            raise InvalidInput(f"input {shown(t.name)} appears more than once in the request")
        seen.add(t.name)
        signature.check_header(t.name, t.datatype, t.shape)
        _, count = _shape(t.name, t.shape, limits.max_elements)
        total += count
        if t.datatype == "BYTES":
            bytes_elements += count
            payload += len(raws[i]) if raws else 0
    if total > limits.max_elements:
        raise InvalidInput(f"the request carries {total} elements, expected at most {limits.max_elements} "
                           f"(limits.max_elements)")
    if bytes_elements > limits.max_bytes_elements:
        raise InvalidInput(f"the request carries {bytes_elements} BYTES elements, expected at most "
                           f"{limits.max_bytes_elements} (limits.max_bytes_elements)")
    if not raws:
        for t in inputs:
            if t.datatype == "BYTES":
                payload += sum(map(len, t.contents.bytes_contents))
    if payload > limits.max_bytes_payload:
        raise InvalidInput(f"the request's BYTES inputs carry {payload} bytes, expected at most "
                           f"{limits.max_bytes_payload} (limits.max_bytes_payload)")
    return total, payload


def decode_inputs(request: Any, value_limit: Any = None) -> dict[str, np.ndarray]:
    """The input tensors of a ``ModelInferRequest`` as ``{name: array}``.

    BYTES become object arrays of ``bytes``; numeric raw buffers become
    read-only views (no copy).  Takes raw or typed contents.  ``value_limit(name)``:
    the longest BYTES element input ``name`` may carry (None: no limit); call
    :func:`check_request` first to bound the rest.

    Raises:
        InvalidInput: an unknown datatype, a repeated name, a negative dimension,
            raw contents for some inputs but not all, typed contents with the
            wrong element count, or raw bytes that do not match shape x itemsize.
    """
    inputs = request.inputs
    raws = request.raw_input_contents
    if raws and len(raws) != len(inputs):
        raise InvalidInput(f"raw_input_contents must hold one buffer per input: {len(inputs)} input(s), "
                           f"got {len(raws)} buffer(s)")
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        name = tensor.name
        if name in out:
            raise InvalidInput(f"input {name!r} appears more than once in the request")
        dt = tensor.datatype
        if dt not in DATATYPES:
            raise InvalidInput(f"input {name!r}: unknown datatype {dt!r}; expected one of {sorted(DATATYPES)}")
        shape, count = _shape(name, tensor.shape)
        if raws:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input {name!r} has both raw_input_contents and typed contents; send one")
            out[name] = _from_raw(name, dt, shape, count, raws[i], value_limit(name) if value_limit else None)
        else:
            out[name] = _from_contents(name, dt, shape, count, tensor.contents)
            if dt == "BYTES" and value_limit is not None and count:
                cap = value_limit(name)
                longest = max(map(len, tensor.contents.bytes_contents))
                if longest > cap:
                    raise InvalidInput(f"input {shown(name)}: a BYTES element has {longest} bytes, expected at "
                                       f"most {cap}")
    return out


def _from_raw(name: str, dt: str, shape: tuple[int, ...], count: int, raw: bytes,
              max_value_bytes: int | None = None) -> np.ndarray:
    if dt == "BYTES":
        return deserialize_bytes(raw, count, name, max_value_bytes).reshape(shape)
    dtype = DATATYPES[dt]
    want = count * dtype.itemsize
    if len(raw) != want:
        raise InvalidInput(f"input {name!r}: {dt} shape {list(shape)} needs {want} bytes, got {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)


def _from_contents(name: str, dt: str, shape: tuple[int, ...], count: int, contents: Any) -> np.ndarray:
    field = _CONTENTS_FIELD.get(dt)
    if field is None:
        raise InvalidInput(f"input {name!r}: {dt} tensors must be sent as raw_input_contents")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} {dt} element(s) in "
                           f"contents.{field}, got {len(values)}")
    if dt == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    dtype = DATATYPES[dt]
    if field in ("int_contents", "uint_contents") and dtype.itemsize < 4 and count:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"input {name!r}: {dt} values must lie in [{info.min}, {info.max}], "
                               f"got [{wide.min()}, {wide.max()}]")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def requested_outputs(request: Any, available: Sequence[str], optional: Sequence[str] = ()) -> list[str]:
    """Output names the request asks for (all of ``available`` when it names none).

    ``optional``: outputs given only when named (``attributions``, :mod:`.explain`).

    Raises:
        InvalidInput: an output name the model does not have.
    """
    names = [o.name for o in request.outputs]
    if not names:
        return list(available)
    unknown = [n for n in names if n not in available and n not in optional]
    if unknown:
        raise InvalidInput(f"unknown output(s) {unknown}; the model has {list(available)}")
    return names


def encode_response(request: Any, model_name: str, model_version: str,
                    outputs: Mapping[str, np.ndarray]) -> Any:
    """A ``ModelInferResponse`` carrying ``outputs`` as raw contents (in the given order)."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id)
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        dt = datatype_of(arr)
        resp.outputs.add(name=name, datatype=dt, shape=arr.shape)
        resp.raw_output_contents.append(_to_raw(arr, dt))
    return resp


def _to_raw(arr: np.ndarray, dt: str) -> bytes:
    if dt == "BYTES":
        return serialize_bytes(arr)
    return np.ascontiguousarray(arr, dtype=DATATYPES[dt].newbyteorder("<")).tobytes()


# --------------------------------------------------------------------------- client side
def build_request(model_name: str, inputs: Mapping[str, np.ndarray], *, model_version: str = "",
                  outputs: Sequence[str] | None = None, typed: bool = False, request_id: str = "") -> Any:
    """A ``ModelInferRequest`` for ``inputs`` (raw contents, or typed ``contents`` with ``typed``).

    ``S``/``U``/object arrays are sent as BYTES.  Raises :class:`InvalidInput` for a
    dtype the protocol cannot carry (or FP16 with ``typed``).
    """
    req = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    for name, value in inputs.items():
        arr = np.asarray(value)
        dt = datatype_of(arr)
        tensor = req.inputs.add(name=name, datatype=dt, shape=arr.shape)
        if typed:
            field = _CONTENTS_FIELD.get(dt)
            if field is None:
                raise InvalidInput(f"input {name!r}: {dt} cannot be sent as typed contents; send it raw")
            flat = arr.reshape(-1)
            if dt == "BYTES":
                vals = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in flat.tolist()]
            else:
                vals = flat.tolist()
            getattr(tensor.contents, field).extend(vals)
        else:
            req.raw_input_contents.append(_to_raw(arr, dt))
    for name in outputs or ():
        req.outputs.add(name=name)
    return req


def decode_response(response: Any) -> dict[str, np.ndarray]:
    """The output tensors of a ``ModelInferResponse`` (raw or typed) as ``{name: array}``."""
    raws = response.raw_output_contents
    out: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        shape, count = _shape(tensor.name, tensor.shape)
        if raws:
            out[tensor.name] = _from_raw(tensor.name, tensor.datatype, shape, count, raws[i])
        else:
            out[tensor.name] = _from_contents(tensor.name, tensor.datatype, shape, count, tensor.contents)
    return out
