"""The ``inference.GRPCInferenceService`` servicer: thin handlers over the repository.

``ModelInfer`` is check (:func:`ctredge.serve.codec.check_request`: names,
datatypes, ranks, element and byte limits, before any decoding; and
:func:`ctredge.serve.explain.check_request` when ``attributions`` is asked for) -> decode
(:mod:`.codec`) -> prepare against the model's signature (:mod:`.signature`)
-> the version's scheduler (:mod:`.batcher`) -> check the answer -> encode.
Every handler's errors go through :func:`ctredge.serve.errors.grpc_status`, the
one mapping to status codes; a client's mistake is never logged with a
traceback, a bug always is.

Requests are parsed by :func:`generic_handler`'s parsers, which return
:class:`Undecodable` instead of raising, so bytes that are no protobuf message
are INVALID_ARGUMENT rather than gRPC's UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, Callable

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve import codec, explain, metadata
from ctredge.serve.errors import (
    ControlDisabled, DeadlineExceeded, InvalidInput, LoadRefused, ResourceExhausted, ShuttingDown, Unimplemented,
    grpc_status,
)
from ctredge.serve.repository import Repository
from ctredge.serve.stats import Metrics

log = logging.getLogger("ctredge.serve")


class Undecodable:
    """A request whose bytes are not a valid message of its method (what :func:`_safe_parser` returns)."""

    def __init__(self, method: str, size: int):
        self.method, self.size = method, size

    def error(self) -> InvalidInput:
        return InvalidInput(f"the request's {self.size} bytes are not a valid {self.method} message "
                            f"(protobuf inference.{self.method}Request)")


class Unparsed:
    """A large ModelInfer request's bytes, parsed later on a worker thread (:func:`_safe_parser`)."""

    def __init__(self, data: bytes):
        self.data = data


# ModelInfer messages larger than this are parsed off the event loop (a 16 MiB parse holds it for tens of ms)
PARSE_INLINE_BYTES = 1 << 20


def _safe_parser(cls: Any, method: str, defer_over: int | None = None) -> Callable[[bytes], Any]:
    """``cls.FromString`` that returns :class:`Undecodable` instead of raising (gRPC would answer UNKNOWN).

    With ``defer_over``, messages of more bytes are returned as :class:`Unparsed`.
    """

    def parse(data: bytes) -> Any:
        if defer_over is not None and len(data) > defer_over:
            return Unparsed(data)
        try:
            return cls.FromString(data)
        except Exception:  # protobuf's DecodeError and friends: the client's bytes, not our bug
            return Undecodable(method, len(data))

    return parse


def generic_handler(servicer: Any) -> Any:
    """The ``inference.GRPCInferenceService`` handlers of ``servicer`` with request parsers that never raise."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for m in service.methods:
        parse = _safe_parser(getattr(pb, m.input_type.name), m.name,
                             PARSE_INLINE_BYTES if m.name == "ModelInfer" else None)
        ser = getattr(pb, m.output_type.name).SerializeToString
        fn = getattr(servicer, m.name)
        if m.client_streaming and m.server_streaming:
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(fn, request_deserializer=parse,
                                                                     response_serializer=ser)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(fn, request_deserializer=parse,
                                                                   response_serializer=ser)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler; map any exception to its gRPC status (and log unexpected ones with their traceback)."""

    @functools.wraps(method)
    async def handler(self: "InferenceServicer", request: Any, context: Any) -> Any:
        self.arrivals += 1
        try:
            if isinstance(request, Undecodable):
                raise request.error()
            return await method(self, request, context)
        except Exception as exc:
            code, message = grpc_status(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed", method.__name__, exc_info=exc)
            else:
                log.debug("%s: %s: %s", method.__name__, code.name, message)
            await context.abort(code, message)

    return handler


def _unimplemented(name: str) -> Callable[..., Any]:
    async def handler(self: "InferenceServicer", request: Any, context: Any) -> Any:
        code, message = grpc_status(Unimplemented(f"{name} is not implemented by this server"))
        await context.abort(code, message)

    handler.__name__ = name
    return handler


# requests with more elements, or more bytes of raw values (hashing), than this are decoded and checked on a
# worker thread, off the event loop, so they do not hold up the small requests behind them
INLINE_ELEMENTS = 1 << 14
INLINE_BYTES = 1 << 15


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`Repository`.

    ``control_mode``: ``explicit`` takes RepositoryModelLoad/Unload, ``none`` and
    ``poll`` refuse them (FAILED_PRECONDITION).  ``max_in_flight``: ModelInfer
    calls held at once; beyond, RESOURCE_EXHAUSTED (counted like every answer).
    """

    def __init__(self, repository: Repository, metrics: Metrics | None = None,
                 on_change: Callable[[], Any] | None = None, *, control_mode: str = "explicit",
                 max_in_flight: int = 1 << 30, max_inflight_bytes: int = 1 << 62, executor: Any = None):
        self.repo = repository
        self.metrics = metrics
        self.on_change = on_change  # awaited after a load/unload (health update)
        self.control_mode = control_mode
        self.max_in_flight = max_in_flight
        self.max_inflight_bytes = max_inflight_bytes
        self.inflight_bytes = 0
        self.executor = executor
        self.accepting = False  # set once loaded; cleared when stopping
        self.in_flight = 0
        self.arrivals = 0  # calls that reached a handler (a drain waits until they stop coming)

    @property
    def ready(self) -> bool:
        return self.accepting and self.repo.loaded and any(mv.ready for mv in self.repo.all())

    @_rpc
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    @_rpc
    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.ready)

    @_rpc
    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.repo.is_ready(request.name, request.version))

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return metadata.server_metadata(self.repo)

    @_rpc
    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        mv = self.repo.get(request.name, request.version)
        await context.send_initial_metadata((("ctredge-execution-provider", mv.provider),))
        return metadata.model_metadata(self.repo, mv)

    @_rpc
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        return metadata.model_config(self.repo.get(request.name, request.version))

    @_rpc
    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return metadata.repository_index(self.repo, ready_only=request.ready)

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        """check -> decode -> prepare -> scheduler -> check -> encode; every outcome is counted."""
        t0 = time.perf_counter_ns()
        mv = None
        self.arrivals += 1
        self.in_flight += 1
        size = 0
        try:
            if isinstance(request, Unparsed):
                request = await asyncio.get_running_loop().run_in_executor(
                    self.executor, _safe_parser(pb.ModelInferRequest, "ModelInfer"), request.data)
            if isinstance(request, Undecodable):
                raise request.error()
            size = sum(map(len, request.raw_input_contents))
            self.inflight_bytes += size
            if not self.accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests; retry on another "
                                   "replica" if self.repo.loaded else "the server is still loading its models")
            mv = self.repo.get(request.model_name, request.model_version)
            if self.in_flight > self.max_in_flight:
                raise ResourceExhausted(f"the server holds {self.max_in_flight} requests already "
                                        f"(--max-concurrent-rpcs); retry later")
            if self.inflight_bytes > self.max_inflight_bytes:
                raise ResourceExhausted(f"the requests in flight hold {self.inflight_bytes - size} bytes already "
                                        f"(--max-inflight-mb {self.max_inflight_bytes >> 20}); retry later")
            signature = mv.signature
            elements, payload = codec.check_request(request, signature, signature.limits)
            explained = explain.check_request(request, signature)  # 0 unless 'attributions' is asked for
            if elements > INLINE_ELEMENTS or payload > INLINE_BYTES or _encodes_text(request, signature):
                feeds = await asyncio.get_running_loop().run_in_executor(self.executor, _decode, request, signature)
            else:
                feeds = _decode(request, signature)
            names = codec.requested_outputs(request, signature.output_names, explain.optional_outputs(signature))
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the request's deadline passed while it was decoded; it was not run")
            t1 = time.perf_counter_ns()
            if explained:
                outputs, timing = await explain.predict(mv.scheduler, feeds, signature.spec, deadline)
            else:
                outputs, timing = await mv.scheduler.predict(feeds, deadline)
            t2 = time.perf_counter_ns()
            signature.check_outputs(feeds, outputs)
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the answer came after the request's deadline; the client has gone")
            response = codec.encode_response(request, mv.name, str(mv.version), {n: outputs[n] for n in names})
        except Exception as exc:
            code, message = grpc_status(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("ModelInfer failed", exc_info=exc)
            self._count(mv, code.name, time.perf_counter_ns() - t0, None)
            await context.abort(code, message)
        else:
            t3 = time.perf_counter_ns()
            timing.input_ns += t1 - t0
            timing.output_ns += t3 - t2
            self._count(mv, "OK", t3 - t0, timing)
            return response
        finally:
            self.in_flight -= 1
            self.inflight_bytes -= size

    def _count(self, mv: Any, code: str, total_ns: int, timing: Any) -> None:
        """Count one ModelInfer answer in the version's statistics and in Prometheus (unknown models: label "")."""
        ok = timing is not None
        if mv is not None and mv.stats is not None:
            if ok:
                mv.stats.request(True, total_ns, timing.queue_ns, timing.input_ns, timing.infer_ns, timing.output_ns)
            else:
                mv.stats.request(False, total_ns)
        if self.metrics is not None:
            name, version = (mv.name, str(mv.version)) if mv is not None else ("", "")
            if ok:
                self.metrics.request(name, version, code, total_ns / 1e9, timing.queue_ns / 1e9,
                                     (timing.input_ns + timing.infer_ns + timing.output_ns) / 1e9)
            else:
                self.metrics.request(name, version, code, total_ns / 1e9, ok=False)

    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """Triton's statistics of every loaded version, or of one model (and version) when named."""
        if request.name:
            if request.version:
                mvs = [self.repo.get(request.name, request.version)]
            else:
                self.repo.get(request.name)  # NOT_FOUND / UNAVAILABLE as for inference
                mvs = [mv for mv in self.repo.all() if mv.name == request.name and mv.stats is not None]
        else:
            mvs = [mv for mv in self.repo.all() if mv.stats is not None]
        return pb.ModelStatisticsResponse(model_stats=[mv.stats.to_proto() for mv in mvs if mv.stats is not None])

    def _check_control(self, call: str, request: Any) -> None:
        if self.control_mode != "explicit":
            raise ControlDisabled(f"{call} is refused: this server's model control mode is {self.control_mode!r} "
                                  f"(start it with --model-control-mode explicit to load and unload models)")
        if not request.model_name:
            raise InvalidInput(f"{call} needs a model_name")
        # tritonclient's unload_model always sends unload_dependents; ctredge models have no dependents
        keys = [k for k in list(request.parameters)[:9] if not (call == "RepositoryModelUnload"
                                                                and k == "unload_dependents")]
        if keys:
            keys = [codec.shown(k) for k in keys[:8]]
            raise InvalidInput(f"{call} parameters {keys} are not supported: models load only from their "
                               f"repository folder (no 'config' or 'file:' overrides)")

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        """Re-read ``REPO/<model_name>``: load new and changed versions, then retire the replaced ones."""
        self._check_control("RepositoryModelLoad", request)
        problems = await self.repo.load_model(request.model_name)
        if self.on_change is not None:
            await self.on_change()
        if problems:
            name = request.model_name
            serving = self.repo.ready_versions(name)
            raise LoadRefused(f"model {codec.shown(name)}: {'; '.join(problems)}; "
                              + (f"still serving version(s) {serving}" if serving else "no version is serving"))
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        """Stop serving every version of ``model_name``; requests already accepted finish."""
        self._check_control("RepositoryModelUnload", request)
        await self.repo.unload_model(request.model_name)
        if self.on_change is not None:
            await self.on_change()
        return pb.RepositoryModelUnloadResponse()

    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        code, message = grpc_status(Unimplemented("ModelStreamInfer is not implemented by this server"))
        await context.abort(code, message)


def _encodes_text(request: Any, signature: Any) -> bool:
    """Whether preparing the request runs the text encoder (then it is prepared on a worker thread)."""
    check = getattr(signature, "encodes_text", None)
    return check is not None and check([t.name for t in request.inputs])


def _decode(request: Any, signature: Any) -> dict[str, Any]:
    """The model feeds of a checked request: decode the tensors, then the signature's prepare."""
    return signature.prepare(codec.decode_inputs(request, signature.value_limit))


