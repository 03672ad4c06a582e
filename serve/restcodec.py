"""KServe v2 REST bodies <-> the protobuf messages the gRPC servicer handles.

A REST inference request is a JSON object (``id``, ``parameters``, ``inputs``,
``outputs``), optionally followed by binary tensor data (Triton's binary-data
extension): the ``Inference-Header-Content-Length`` header gives the JSON's
length, each binary input says how many of the following bytes are its own in
``parameters.binary_data_size``, in input order.  :func:`parse_infer` turns the
JSON into a :class:`RestInfer`: a ``ModelInferRequest`` that carries every
input's name, datatype and shape but no data yet (what
:func:`ctredge.serve.codec.check_request` needs), plus where each input's data
is.  :meth:`RestInfer.request` then fills ``raw_input_contents``: binary data as
sent, JSON data converted to Triton's raw encoding.  Every request therefore
reaches the servicer in one form, raw, and is checked, decoded, counted and
answered exactly as a gRPC request with the same tensors.

What the REST layer consumes itself: ``binary_data_size`` (inputs),
``binary_data`` (outputs) and ``binary_data_output`` (request).  Every other
parameter is passed on and refused by the servicer, as over gRPC.

JSON data: a flat or nested list in row-major order; BOOL takes ``true``/``false``,
integer types JSON integers, FP16/32/64 JSON numbers or ``NaN`` (a missing value
in the ctredge contract, as a NaN over gRPC), BYTES strings (sent as their UTF-8
bytes).  ``Infinity`` and numbers beyond the datatype's range are refused.

Answers: every output in JSON (``data``) or, when asked for, as binary data after
the JSON header (:func:`encode_infer`).  Other answers are the protobuf
messages as JSON with the field names of the protocol (:func:`message_json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import service_pb2 as pb

from ctredge.serve import codec
from ctredge.serve.codec import DATATYPES, MAX_DIMS, shown
from ctredge.serve.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_TENSORS = 64  # inputs or outputs of one request; a ctredge model has at most a dozen
MAX_PARAMETERS = 64
_INFER_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_INT64 = (-(1 << 63), (1 << 63) - 1)
_FLOATS = {"FP16", "FP32", "FP64"}


def _kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _no_infinity(literal: str) -> float:
    if literal == "NaN":
        return math.nan
    raise InvalidInput(f"the JSON holds {literal}: expected finite numbers (NaN stands for a missing value)")


def loads(text: bytes, what: str = "request body") -> Any:
    """Parse JSON text, refusing ``Infinity``; any failure is :class:`InvalidInput` naming ``what``."""
    try:
        return json.loads(text, parse_constant=_no_infinity)
    except InvalidInput:
        raise
    except RecursionError:
        raise InvalidInput(f"the {what} nests JSON too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidInput(f"the {what} is not valid JSON: {exc}") from None


def _parameters(where: str, value: Any, target: Any, consumed: Sequence[str] = ()) -> dict[str, Any]:
    """Copy a JSON ``parameters`` object into a protobuf parameter map, except the ``consumed`` keys.

    Returns the consumed keys' values.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} parameters: expected a JSON object, got {_kind(value)}")
    if len(value) > MAX_PARAMETERS:
        raise InvalidInput(f"{where} parameters: {len(value)} of them, expected at most {MAX_PARAMETERS}")
    kept = {}
    for key, v in value.items():
        check_text(f"{where} parameter name", key)
        if key in consumed:
            kept[key] = v
            continue
        p = target[key]
        if isinstance(v, bool):
            p.bool_param = v
        elif isinstance(v, int) and _INT64[0] <= v <= _INT64[1]:
            p.int64_param = v
        elif isinstance(v, float):
            p.double_param = v
        else:
            p.string_param = check_text(f"{where} parameter {shown(key)}", v) if isinstance(v, str) else \
                json.dumps(v)[:256]
    return kept


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: expected true or false, got {_kind(value)}")
    return value


def check_text(where: str, value: Any) -> str:
    """``value`` if it is a string that UTF-8 can carry (what protobuf strings need), else :class:`InvalidInput`."""
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: expected a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{where}: the string is not valid Unicode (a lone surrogate)") from None
    return value


@dataclass
class RestInfer:
    """A parsed REST inference request: the protobuf header and where each input's data is.

    ``header``: a ``ModelInferRequest`` with names, datatypes, shapes and
    parameters but no tensor data; ``sources``: per input, a JSON list or the
    ``(offset, size)`` of its binary data in ``body``; ``binary``: per output
    named with ``parameters.binary_data``, whether it is answered as binary data;
    ``binary_default``: the request's ``binary_data_output``, for the others.
    """

    header: Any
    sources: list[Any]
    body: bytes | memoryview
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False

    def elements(self) -> int:
        """The request's element count (for choosing where to convert it)."""
        total = 0
        for t in self.header.inputs:
            n = 1
            for d in t.shape:
                n *= max(int(d), 0)
            total += n
        return total

    def request(self) -> Any:
        """The ``ModelInferRequest`` with every input's data as ``raw_input_contents``.

        Call after :func:`ctredge.serve.codec.check_request` accepted :attr:`header`
        (shapes and element counts are bounded then).

        Raises:
            InvalidInput: JSON data of the wrong type, count or range.
        """
        req = pb.ModelInferRequest()
        req.CopyFrom(self.header)
        raws = req.raw_input_contents
        for t, source in zip(req.inputs, self.sources):
            if isinstance(source, tuple):
                off, size = source
                raws.append(bytes(self.body[off:off + size]))
            else:
                raws.append(json_tensor(t.name, t.datatype, list(t.shape), source))
        return req

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def parse_infer(body: bytes, header_length: str | None, model_name: str, model_version: str) -> RestInfer:
    """Parse a REST inference body (JSON, or JSON + binary data) into a :class:`RestInfer`.

    ``header_length``: the ``Inference-Header-Content-Length`` header as sent
    (None: the whole body is JSON).

    Raises:
        InvalidInput: a bad header length, invalid JSON, a request that is not a
            KServe v2 inference request, or binary sizes that do not add up.
    """
    size = len(body)
    if header_length is None:
        json_end = size
    else:
        text = header_length.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            raise InvalidInput(f"{HEADER_LENGTH}: expected the JSON header's length in bytes, got "
                               f"{shown(header_length)}")
        json_end = int(text)
        if json_end > size:
            raise InvalidInput(f"{HEADER_LENGTH} is {json_end} bytes, but the body has only {size} bytes")
    view = memoryview(body)
    doc = loads(body if json_end == size else bytes(view[:json_end]), "inference request")
    if not isinstance(doc, dict):
        raise InvalidInput(f"an inference request is a JSON object, got {_kind(doc)}")
    unknown = sorted(set(doc) - _INFER_KEYS)
    if unknown:
        raise InvalidInput(f"unknown key(s) [{', '.join(map(shown, unknown[:8]))}] in the inference request; expected "
                           f"{sorted(_INFER_KEYS)}")
    req = pb.ModelInferRequest(model_name=model_name, model_version=model_version)
    if "id" in doc:
        req.id = check_text("id", doc["id"])
    consumed = _parameters("request", doc.get("parameters"), req.parameters, ("binary_data_output",))
    binary_default = _bool("parameters.binary_data_output", consumed["binary_data_output"]) \
        if "binary_data_output" in consumed else False
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput(f"'inputs': expected a JSON array of tensors, got {_kind(inputs)}")
    if len(inputs) > MAX_TENSORS:
        raise InvalidInput(f"the request has {len(inputs)} inputs, expected at most {MAX_TENSORS}")
    sources: list[Any] = []
    offset = json_end
    for i, t in enumerate(inputs):
        sources.append(_input(i, t, req, offset, size))
        if isinstance(sources[-1], tuple):
            offset += sources[-1][1]
    if offset != size:
        claimed = offset - json_end
        raise InvalidInput(f"the body carries {size - json_end} bytes of binary data after the JSON header, but "
                           f"the inputs' parameters.binary_data_size add up to {claimed}"
                           + ("" if header_length is not None or not claimed else
                              f" (binary data needs the {HEADER_LENGTH} header)"))
    binary: dict[str, bool] = {}
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidInput(f"'outputs': expected a JSON array, got {_kind(outputs)}")
        if len(outputs) > MAX_TENSORS:
            raise InvalidInput(f"the request asks for {len(outputs)} outputs, expected at most {MAX_TENSORS}")
        for j, o in enumerate(outputs):
            where = f"outputs[{j}]"
            if not isinstance(o, dict):
                raise InvalidInput(f"{where}: expected a JSON object, got {_kind(o)}")
            extra = sorted(set(o) - _OUTPUT_KEYS)
            if extra:
                raise InvalidInput(f"{where}: unknown key(s) [{', '.join(map(shown, extra[:8]))}]; expected "
                                   f"{sorted(_OUTPUT_KEYS)}")
            name = check_text(f"{where}.name", o.get("name"))
            out = req.outputs.add(name=name)
            kept = _parameters(f"output {shown(name)}", o.get("parameters"), out.parameters, ("binary_data",))
            if "binary_data" in kept:
                binary[name] = _bool(f"output {shown(name)} parameters.binary_data", kept["binary_data"])
    return RestInfer(req, sources, view, binary, binary_default)


def _input(i: int, t: Any, req: Any, offset: int, size: int) -> Any:
    """Add input ``i``'s header to ``req``; return its JSON data or the ``(offset, size)`` of its binary data."""
    where = f"inputs[{i}]"
    if not isinstance(t, dict):
        raise InvalidInput(f"{where}: expected a JSON object, got {_kind(t)}")
    extra = sorted(set(t) - _INPUT_KEYS)
    if extra:
        raise InvalidInput(f"{where}: unknown key(s) [{', '.join(map(shown, extra[:8]))}]; expected "
                           f"{sorted(_INPUT_KEYS)}")
    name = check_text(f"{where}.name", t.get("name"))
    datatype = check_text(f"input {shown(name)} datatype", t.get("datatype"))
    shape = t.get("shape")
    if not isinstance(shape, list):
        raise InvalidInput(f"input {shown(name)} shape: expected a JSON array of integers, got {_kind(shape)}")
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"input {shown(name)}: {len(shape)} dimensions, expected at most {MAX_DIMS}")
    for d in shape:
        if type(d) is not int or not _INT64[0] <= d <= _INT64[1]:
            raise InvalidInput(f"input {shown(name)} shape {json.dumps(shape)[:80]}: expected integers, got "
                               f"{_kind(d)}")
    tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
    kept = _parameters(f"input {shown(name)}", t.get("parameters"), tensor.parameters, ("binary_data_size",))
    has_data = "data" in t
    if "binary_data_size" in kept:
        n = kept["binary_data_size"]
        if type(n) is not int or n < 0:
            raise InvalidInput(f"input {shown(name)} parameters.binary_data_size: expected a byte count >= 0, got "
                               f"{_kind(n)} {json.dumps(n)[:40]}")
        if has_data:
            raise InvalidInput(f"input {shown(name)} has both 'data' and parameters.binary_data_size; send one")
        if offset + n > size:
            raise InvalidInput(f"input {shown(name)} parameters.binary_data_size is {n} bytes, but only "
                               f"{size - offset} bytes of binary data remain")
        return offset, n
    if not has_data:
        if len(tensor.parameters):
            return []  # shared memory and the like: the servicer refuses the parameter
        raise InvalidInput(f"input {shown(name)} has no data: expected 'data' or parameters.binary_data_size")
    data = t["data"]
    if not isinstance(data, list):
        raise InvalidInput(f"input {shown(name)} data: expected a JSON array, got {_kind(data)}")
    return data


def _flatten(name: str, data: list, count: int) -> tuple[list, set]:
    """Row-major elements of flat or nested ``data``, and the set of their types."""
    flat = data
    for _ in range(MAX_DIMS + 1):
        if len(flat) > count:
            raise InvalidInput(f"input {shown(name)}: shape needs {count} element(s), got more in 'data'")
        kinds = set(map(type, flat))
        if list not in kinds:
            return flat, kinds
        flat = [x for v in flat for x in (v if type(v) is list else (v,))]
    raise InvalidInput(f"input {shown(name)} data nests arrays more deeply than {MAX_DIMS} dimensions")


def json_tensor(name: str, datatype: str, shape: list[int], data: list) -> bytes:
    """Triton's raw encoding of JSON ``data`` for an input of ``datatype`` and ``shape`` (checked before).

    Raises:
        InvalidInput: wrong element count, a value of the wrong JSON type, out of
            the datatype's range, or not finite.
    """
    count = 1
    for d in shape:
        count *= d
    flat, kinds = _flatten(name, data, count)
    if len(flat) != count:
        raise InvalidInput(f"input {shown(name)}: shape {shape} needs {count} {datatype} element(s) in 'data', "
                           f"got {len(flat)}")
    dtype = DATATYPES.get(datatype)
    if dtype is None:  # check_request refuses it first; kept for direct callers
        raise InvalidInput(f"input {shown(name)}: unknown datatype {shown(datatype)}")
    if datatype == "BYTES":
        _types(name, datatype, flat, kinds, (str,), "strings")
        try:
            return codec.serialize_bytes(np.asarray(flat, dtype=object) if flat else np.empty(0, dtype=object))
        except UnicodeEncodeError:
            raise InvalidInput(f"input {shown(name)}: a string is not valid Unicode (a lone surrogate)") from None
    if datatype == "BOOL":
        _types(name, datatype, flat, kinds, (bool,), "true or false")
        return np.asarray(flat, dtype=np.bool_).tobytes()
    if datatype in _FLOATS:
        _types(name, datatype, flat, kinds, (int, float), "numbers")
        try:
            wide = np.asarray(flat, dtype=np.float64)
        except OverflowError:
            raise InvalidInput(f"input {shown(name)}: an integer too large for {datatype}") from None
        with np.errstate(over="ignore"):
            arr = wide.astype(dtype.newbyteorder("<"))
        bad = np.isinf(arr)
        if bad.any():
            k = int(np.argmax(bad))
            raise InvalidInput(f"input {shown(name)}: element {k} is {flat[k]!r}, expected a finite {datatype} number "
                               f"(NaN for a missing value)")
        return arr.tobytes()
    _types(name, datatype, flat, kinds, (int,), "integers")
    info = np.iinfo(dtype)
    try:
        wide = np.asarray(flat, dtype=np.uint64 if datatype == "UINT64" else np.int64)
        ok = not flat or (info.min <= wide.min() and wide.max() <= info.max)
    except OverflowError:
        ok = False
    if not ok:
        k = next(i for i, v in enumerate(flat) if not info.min <= v <= info.max)
        raise InvalidInput(f"input {shown(name)}: {datatype} values must lie in [{info.min}, {info.max}], got "
                           f"{flat[k]} at element {k}")
    return wide.astype(dtype.newbyteorder("<")).tobytes()


def _types(name: str, datatype: str, flat: list, kinds: set, allowed: tuple[type, ...], what: str) -> None:
    if kinds.issubset(allowed):
        return
    k = next(i for i, v in enumerate(flat) if type(v) not in allowed)
    raise InvalidInput(f"input {shown(name)}: {datatype} data must be {what}, got {_kind(flat[k])} at element {k} "
                       f"({json.dumps(flat[k])[:40]})")


# --------------------------------------------------------------------------- answers
def encode_infer(response: Any, parsed: RestInfer) -> tuple[bytes, int | None]:
    """The REST body of a ``ModelInferResponse``: ``(body, json_length)``; ``json_length`` None when all JSON.

    Raises:
        InvalidInput: a BYTES output asked for as JSON holds bytes that are not UTF-8.
    """
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    outputs = []
    blobs = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if parsed.wants_binary(tensor.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(tensor, raw)
        outputs.append(entry)
    doc["outputs"] = outputs
    text = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


def _json_data(tensor: Any, raw: bytes) -> list:
    count = 1
    for d in tensor.shape:
        count *= d
    if tensor.datatype == "BYTES":
        values = codec.deserialize_bytes(raw, count, tensor.name)
        try:
            return [v.decode("utf-8") for v in values.tolist()]
        except UnicodeDecodeError:
            raise InvalidInput(f"output {shown(tensor.name)} holds bytes that are not UTF-8; ask for it with "
                               f"parameters.binary_data true") from None
    dtype = DATATYPES[tensor.datatype].newbyteorder("<")
    return np.frombuffer(raw, dtype=dtype).tolist()


def _repeated(f: FieldDescriptor) -> bool:
    is_repeated = getattr(f, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else f.label == FieldDescriptor.LABEL_REPEATED


def _value(f: FieldDescriptor, v: Any, defaults: bool) -> Any:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message_json(v, defaults)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return f.enum_type.values_by_number[v].name if v in f.enum_type.values_by_number else v
    if f.type == FieldDescriptor.TYPE_BYTES:
        return v.decode("latin-1")
    return v


def message_json(msg: Any, defaults: bool = True) -> dict[str, Any]:
    """A protobuf message as a JSON object with the protocol's field names and integers as numbers.

    ``defaults``: also write fields left at their default (Triton's statistics
    show zero counters); otherwise only the fields that are set.
    """
    out: dict[str, Any] = {}
    fields = msg.DESCRIPTOR.fields if defaults else [f for f, _ in msg.ListFields()]
    for f in fields:
        v = getattr(msg, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            vf = f.message_type.fields_by_name["value"]
            out[f.name] = {k: _value(vf, x, defaults) for k, x in v.items()}
        elif _repeated(f):
            out[f.name] = [_value(f, x, defaults) for x in v]
        elif f.message_type is not None:
            if msg.HasField(f.name):
                out[f.name] = _value(f, v, defaults)
            elif defaults and f.containing_oneof is None:
                out[f.name] = message_json(v, defaults)
        elif f.containing_oneof is None or msg.WhichOneof(f.containing_oneof.name) == f.name:
            out[f.name] = _value(f, v, defaults)
    return out
