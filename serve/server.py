"""The gRPC server: Open Inference Protocol v2 (KServe/Triton) on ``grpc.aio``, health and reflection.

The servicer implements tritonclient's generated
``service_pb2_grpc.GRPCInferenceServiceServicer`` (package ``inference``,
service ``GRPCInferenceService``), so Triton's own clients work unchanged.  It
stays thin: ``ModelInfer`` is decode (:mod:`.codec`) -> check and assemble
against the model's signature (:mod:`.signature`) -> ``predictor.predict``
(:mod:`.runtime`; a batcher can stand in) -> encode.  Every handler's errors go
through :func:`ctredge.serve.errors.grpc_status`, the one mapping to status codes.

Readiness: the server is ready once the repository has loaded and at least one
model version is ready; ``grpc.health.v1`` answers SERVING for ``""`` then, and
for each model name whose default version is ready.  ModelStatistics,
RepositoryModelLoad/Unload, ModelStreamInfer, shared memory, tracing and
logging answer UNIMPLEMENTED.

Use :class:`InferenceServer` in an event loop, :class:`ServerThread` to run one
in a background thread (tests, benchmarks), or :func:`run` (``ctredge serve``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.serve import codec, metadata
from ctredge.serve.errors import ServeError, Unimplemented, grpc_status
from ctredge.serve.repository import Repository

log = logging.getLogger("ctredge.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    """Process-wide settings of ``ctredge serve`` (per-model settings are in ``config.json``).

    ``port`` 0 picks a free port.  ``intra_op_threads`` overrides every model's
    config when set.  ``workers``: threads that run ONNX Runtime sessions
    (None: the CPU count).  ``max_message_bytes``: gRPC receive/send limit; a
    larger request is refused with RESOURCE_EXHAUSTED.
    """

    host: str = "127.0.0.1"
    port: int = 8001
    require_gpu: bool = False
    intra_op_threads: int | None = None
    workers: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServeError(f"port must be in [0, 65535], got {self.port}")
        if self.intra_op_threads is not None and self.intra_op_threads < 0:
            raise ServeError(f"threads must be >= 0, got {self.intra_op_threads}")
        if self.workers is not None and self.workers < 1:
            raise ServeError(f"workers must be >= 1, got {self.workers}")
        if self.max_message_bytes < 1024:
            raise ServeError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a handler; map any exception to its gRPC status (and log unexpected ones)."""

    @functools.wraps(method)
    async def handler(self: "InferenceServicer", request: Any, context: Any) -> Any:
        try:
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
        code, message = grpc_status(Unimplemented(f"{name} is not implemented by this server yet"))
        await context.abort(code, message)

    handler.__name__ = name
    return handler


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`Repository`."""

    def __init__(self, repository: Repository):
        self.repo = repository
        self.accepting = False  # set once loaded; cleared when stopping

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

    @_rpc
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        mv = self.repo.get(request.model_name, request.model_version)
        tensors = codec.decode_inputs(request)
        feeds = mv.signature.prepare(tensors)
        names = codec.requested_outputs(request, mv.signature.output_names)
        outputs = await mv.predictor.predict(feeds)
        return codec.encode_response(request, mv.name, str(mv.version), {n: outputs[n] for n in names})

    ModelStatistics = _unimplemented("ModelStatistics")
    RepositoryModelLoad = _unimplemented("RepositoryModelLoad")
    RepositoryModelUnload = _unimplemented("RepositoryModelUnload")
    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        code, message = grpc_status(Unimplemented("ModelStreamInfer is not implemented by this server yet"))
        await context.abort(code, message)


class InferenceServer:
    """A ``grpc.aio`` server over one repository folder; create and use it inside an event loop."""

    def __init__(self, repository: str | os.PathLike[str], options: ServerOptions | None = None):
        self.options = options or ServerOptions()
        workers = self.options.workers or os.cpu_count() or 1
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctredge-ort")
        self.repository = Repository(repository, require_gpu=self.options.require_gpu,
                                     intra_op_threads=self.options.intra_op_threads, executor=self.executor)
        self.servicer = InferenceServicer(self.repository)
        self.port: int | None = None
        self._server: Any = None
        self._health: Any = None

    async def start(self) -> int:
        """Bind, start answering (live, not ready), load the repository, then turn ready.

        Returns the bound port.

        Raises:
            ServeError: the address cannot be bound.
            GpuRequired: ``require_gpu`` and a model would not run on the GPU.
            LoadError: the repository folder does not exist.
        """
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        o = self.options
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self._server)
        self._health = health.aio.HealthServicer()
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        address = f"{o.host}:{o.port}" if ":" not in o.host else f"[{o.host}]:{o.port}"
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServeError(f"cannot listen on {address}: {exc}") from exc
        if not port:
            raise ServeError(f"cannot listen on {address} (address in use?)")
        self.port = port
        await self._server.start()
        log.info("listening on %s:%d (live; loading models from %s)", o.host, port, self.repository.root)
        try:
            await self.repository.load()
        except BaseException:
            await self._server.stop(None)
            self.executor.shutdown(wait=False)
            raise
        self.servicer.accepting = True
        await self._update_health()
        log.info("ready: %s", ", ".join(f"{mv.name} v{mv.version} on {mv.provider}"
                                        for mv in self.repository.all() if mv.ready) or "no model is ready")
        return port

    async def _update_health(self) -> None:
        from grpc_health.v1 import health_pb2

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        await self._health.set("", serving if self.servicer.ready else not_serving)
        for name in self.repository.names():
            await self._health.set(name, serving if self.repository.is_ready(name) else not_serving)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, report NOT_SERVING, let in-flight calls finish for ``grace`` seconds."""
        if self._server is None:
            return
        self.servicer.accepting = False
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self._server.stop(self.options.grace_seconds if grace is None else grace)
        self.executor.shutdown(wait=True)
        self._server = None
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signal(repository: str | os.PathLike[str], options: ServerOptions,
                             on_ready: Callable[[int], None] | None = None) -> None:
    """Start a server, call ``on_ready(port)``, and serve until SIGINT/SIGTERM (then stop gracefully)."""
    server = InferenceServer(repository, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    try:
        port = await server.start()
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
        log.info("signal received: stopping (grace %.1fs)", options.grace_seconds)
    finally:
        await server.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run(repository: str | os.PathLike[str], options: ServerOptions,
        on_ready: Callable[[int], None] | None = None) -> None:
    """Blocking entry point of ``ctredge serve``."""
    asyncio.run(serve_until_signal(repository, options, on_ready))


class ServerThread:
    """An :class:`InferenceServer` on its own event loop in a background thread.

    ``with ServerThread(repo, port=0) as s: s.url`` -> ``"127.0.0.1:PORT"``, loaded and
    ready; leaving the block stops it.  Start-up errors are raised by ``__enter__``.
    """

    def __init__(self, repository: str | os.PathLike[str], options: ServerOptions | None = None, **kwargs: Any):
        self.options = options or ServerOptions(**{"port": 0, **kwargs})
        self.repository_path = repository
        self.server: InferenceServer | None = None
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="ctredge-server", daemon=True)

    @property
    def url(self) -> str:
        return f"{self.options.host}:{self.port}"

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = InferenceServer(self.repository_path, self.options)
            self.port = await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.stop(grace=1.0)

    def start(self) -> "ServerThread":
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
