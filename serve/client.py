"""A thin client of the server (sync :class:`Client`, async :class:`AsyncClient`) on tritonclient's stubs.

Any Open Inference Protocol v2 client works with the server (tritonclient's
``InferenceServerClient`` included); this one speaks ``dict[str, np.ndarray]``
and knows the ctredge input forms::

    with Client("127.0.0.1:8001") as c:
        spec = c.feature_spec("ctr")                       # from ModelConfig parameters
        p = c.predict("ctr", raw_inputs(spec, chunk))      # cat_raw / hist_raw hashed by the server
        p = c.predict("ctr", ranking_inputs(spec, feeds))  # user side sent once for N items

Failed calls raise :class:`RemoteError` carrying the gRPC status code.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.features import INPUT_CAT, INPUT_CAT_RAW, INPUT_DENSE, INPUT_HIST, METADATA_KEY, OUTPUT_CTR, SIDES, FeatureSpec
from ctredge.serve import codec
from ctredge.serve.errors import ServeError

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
INPUT_HIST_RAW = "hist_raw"


class RemoteError(ServeError):
    """A call the server answered with an error status; ``code`` is the ``grpc.StatusCode``."""

    def __init__(self, code: Any, details: str):
        super().__init__(f"{getattr(code, 'name', code)}: {details}")
        self.code = code
        self.details = details


def _remote(exc: grpc.RpcError) -> RemoteError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return RemoteError(code, details or "")


def _options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _spec_of(config_response: Any) -> FeatureSpec | None:
    params = config_response.config.parameters
    return FeatureSpec.from_json(params[METADATA_KEY].string_value) if METADATA_KEY in params else None


class Client:
    """Blocking client. ``url`` is ``host:port``; ``timeout`` (seconds) applies to every call."""

    def __init__(self, url: str, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.url = url
        self.timeout = timeout
        self.channel = grpc.insecure_channel(url, options=_options(max_message_bytes))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _remote(exc) from None

    def live(self) -> bool:
        return self._call("ServerLive", pb.ServerLiveRequest()).live

    def ready(self) -> bool:
        return self._call("ServerReady", pb.ServerReadyRequest()).ready

    def model_ready(self, model: str, version: str = "") -> bool:
        return self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version)).ready

    def server_metadata(self) -> Any:
        return self._call("ServerMetadata", pb.ServerMetadataRequest())

    def model_metadata(self, model: str, version: str = "") -> Any:
        return self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version))

    def model_config(self, model: str, version: str = "") -> Any:
        return self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=version)).config

    def repository_index(self, ready: bool = False) -> Any:
        return self._call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready)).models

    def feature_spec(self, model: str, version: str = "") -> FeatureSpec | None:
        """The model's FeatureSpec (None for a plain ONNX model)."""
        return _spec_of(self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=version)))

    def infer_request(self, request: Any) -> dict[str, np.ndarray]:
        """Send a prepared ``ModelInferRequest`` (see :func:`codec.build_request`); returns the outputs."""
        return codec.decode_response(self._call("ModelInfer", request))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
              outputs: Sequence[str] | None = None, typed: bool = False) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs``; returns ``{output name: array}``. Raises :class:`RemoteError`."""
        return self.infer_request(codec.build_request(model, inputs, model_version=version, outputs=outputs,
                                                      typed=typed))

    def predict(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str = "") -> np.ndarray:
        """Click probabilities ``[B]`` of a ctredge model."""
        return self.infer(model, inputs, version=version, outputs=[OUTPUT_CTR])[OUTPUT_CTR].reshape(-1)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient:
    """``grpc.aio`` client with the same methods as :class:`Client`, as coroutines."""

    def __init__(self, url: str, *, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.url = url
        self.timeout = timeout
        self.channel = grpc.aio.insecure_channel(url, options=_options(max_message_bytes))
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _remote(exc) from None

    async def live(self) -> bool:
        return (await self._call("ServerLive", pb.ServerLiveRequest())).live

    async def ready(self) -> bool:
        return (await self._call("ServerReady", pb.ServerReadyRequest())).ready

    async def model_ready(self, model: str, version: str = "") -> bool:
        return (await self._call("ModelReady", pb.ModelReadyRequest(name=model, version=version))).ready

    async def model_metadata(self, model: str, version: str = "") -> Any:
        return await self._call("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version))

    async def model_config(self, model: str, version: str = "") -> Any:
        return (await self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=version))).config

    async def feature_spec(self, model: str, version: str = "") -> FeatureSpec | None:
        return _spec_of(await self._call("ModelConfig", pb.ModelConfigRequest(name=model, version=version)))

    async def infer_request(self, request: Any) -> dict[str, np.ndarray]:
        return codec.decode_response(await self._call("ModelInfer", request))

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str = "",
                    outputs: Sequence[str] | None = None, typed: bool = False) -> dict[str, np.ndarray]:
        return await self.infer_request(codec.build_request(model, inputs, model_version=version,
                                                            outputs=outputs, typed=typed))

    async def predict(self, model: str, inputs: Mapping[str, np.ndarray], *, version: str = "") -> np.ndarray:
        out = await self.infer(model, inputs, version=version, outputs=[OUTPUT_CTR])
        return out[OUTPUT_CTR].reshape(-1)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


# --------------------------------------------------------------------------- inputs
def raw_inputs(spec: FeatureSpec, chunk: Any) -> dict[str, np.ndarray]:
    """Request inputs of raw click-log rows (a reader ``RawChunk``): ``dense``, ``cat_raw``, ``hist_raw``.

    The server hashes ``cat_raw``/``hist_raw`` with the hub's function, as training did.
    """
    inputs: dict[str, np.ndarray] = {}
    if spec.n_dense:
        inputs[INPUT_DENSE] = np.ascontiguousarray(chunk.dense, dtype=np.float32)
    if spec.n_cat:
        inputs[INPUT_CAT_RAW] = chunk.cat_raw
    if spec.history is not None:
        hist = chunk.hist_raw or [[] for _ in range(len(chunk))]
        inputs[INPUT_HIST_RAW] = np.array([[b",".join(h)] for h in hist], dtype=object).reshape(-1, 1)
    return inputs


def ranking_inputs(spec: FeatureSpec, inputs: Mapping[str, np.ndarray],
                   broadcast: Sequence[str] = ("user", "context")) -> dict[str, np.ndarray]:
    """Turn full-form inputs of one user's N candidates into a ranking request.

    Takes ``dense``, ``cat`` or ``cat_raw``, and ``hist`` or ``hist_raw`` with N rows
    whose ``broadcast`` sides are the same in every row.  Returns per-side
    inputs: those sides (and the history) with 1 row, the others with N.

    Raises:
        ValueError: a ``broadcast`` side's columns (or the history) differ between rows.
    """
    out: dict[str, np.ndarray] = {}
    for name, arr in inputs.items():
        kind = {INPUT_DENSE: "dense", INPUT_CAT: "cat", INPUT_CAT_RAW: "cat"}.get(name)
        if kind is None:
            if name in (INPUT_HIST, INPUT_HIST_RAW) and spec.history is not None \
                    and spec.history.side in broadcast:
                out[name] = _one_row(name, arr)
            else:
                out[name] = arr
            continue
        for side in SIDES:
            cols = spec.columns(kind, side)
            if not cols:
                continue
            part = np.ascontiguousarray(arr[:, cols])
            out[f"{name}_{side}"] = _one_row(f"{name}_{side}", part) if side in broadcast else part
    return out


def _one_row(name: str, arr: np.ndarray) -> np.ndarray:
    first = arr[:1]
    same = (arr == first) | ((arr != arr) & (first != first)) if arr.dtype.kind == "f" else arr == first
    if not np.all(same):
        raise ValueError(f"{name}: rows differ, so it cannot be sent once for all candidates")
    return first


def predict_file(client: Client, model: str, path: str | os.PathLike[str], *, spec: FeatureSpec | None = None,
                 limit: int | None = None, batch_size: int = 256, version: str = "",
                 skip_bad_rows: bool = False) -> Iterator[tuple[Any, np.ndarray]]:
    """Score a click log through the server: yields ``(RawChunk, probabilities)`` per batch.

    ``spec``: the FeatureSpec that lays out the file (default: the model's, from
    its ModelConfig).  Rows are read with the hub reader and sent raw.

    Raises:
        RemoteError: the server refused a call.
        ServeError: the model has no FeatureSpec and none was given.
        DataError: a malformed row (unless ``skip_bad_rows``).
    """
    from ctredge.reader import iter_raw

    if spec is None:
        spec = client.feature_spec(model, version)
        if spec is None:
            raise ServeError(f"model {model!r} carries no ctredge FeatureSpec: pass --spec to read the click log")
    for chunk in iter_raw(path, spec, chunk_rows=batch_size, limit=limit, skip_bad_rows=skip_bad_rows):
        yield chunk, client.predict(model, raw_inputs(spec, chunk), version=version)
