"""The gRPC server: Open Inference Protocol v2 (KServe/Triton) on ``grpc.aio``, health and reflection.

The servicer implements tritonclient's generated
``service_pb2_grpc.GRPCInferenceServiceServicer`` (package ``inference``,
service ``GRPCInferenceService``), so Triton's own clients work unchanged.  It
stays thin: ``ModelInfer`` is decode (:mod:`.codec`) -> check and assemble
against the model's signature (:mod:`.signature`) -> the version's scheduler
(:mod:`.batcher`: dynamic batching, queue, deadline) -> encode.  Every
handler's errors go through :func:`ctredge.serve.errors.grpc_status`, the one
mapping to status codes.

Readiness: the server is ready once the repository has loaded and at least one
model version is ready; ``grpc.health.v1`` answers SERVING for ``""`` then, and
for each model name whose default version is ready.

Model control (Triton's ``--model-control-mode``): ``none`` (the default) loads
the repository at start and refuses RepositoryModelLoad/Unload
(FAILED_PRECONDITION); ``poll`` re-reads it every ``poll_seconds`` and refuses
them too; ``explicit`` takes them.  A load re-reads a model's folder (new and
changed versions load and warm up before they take traffic; replaced ones
drain); its parameters (Triton's ``config`` and ``file:`` overrides) are
refused, never ignored.

Trust no client: :mod:`.security` checks TLS and bearer tokens before a
handler runs; every request parser returns :class:`Undecodable` instead of
raising, so bad bytes are INVALID_ARGUMENT; a ModelInfer request's header is
checked against the model and its ``limits`` before any tensor is decoded
(:func:`ctredge.serve.codec.check_request`), large ones are decoded on a worker
thread, and the calls and tensor bytes held at once are capped
(RESOURCE_EXHAUSTED).  Every answer, refusals included, is counted in
ModelStatistics (for a known model) and Prometheus (unknown models under the
label ``model=""``).  A deadline is checked before the run and after it: a late
answer is DEADLINE_EXCEEDED, never a success.

Observability: ModelStatistics answers Triton's counters and durations
(:mod:`.stats`); ``metrics_port`` serves Prometheus text over HTTP on
``metrics_host``.

Lifecycle: :meth:`InferenceServer.stop` (SIGTERM/SIGINT in ``ctredge serve``)
turns health NOT_SERVING, refuses new requests with UNAVAILABLE, lets the
accepted ones finish for up to ``grace_seconds`` and keeps the port open until
calls stop arriving, so none that gRPC received is cancelled; then it closes.

Shared memory, tracing, logging settings and ModelStreamInfer answer
UNIMPLEMENTED.

Use :class:`InferenceServer` in an event loop, :class:`ServerThread` to run one
in a background thread (tests, benchmarks), or :func:`run` (``ctredge serve``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from tritonclient.grpc import service_pb2 as pb

from ctredge.serve.errors import ServeError
from ctredge.serve.repository import LoadSettings, Repository
from ctredge.serve.servicer import InferenceServicer, generic_handler
from ctredge.serve.stats import Metrics

log = logging.getLogger("ctredge.serve")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name  # inference.GRPCInferenceService
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
DRAIN_QUIET_SECONDS = 0.2
GIL_SWITCH_SECONDS = 0.0005
# gRPC core cancels calls beyond its pending-call limit (default 1000) before any handler sees them; raised so
# that every call reaches ModelInfer, whose own cap (max_concurrent_rpcs) answers RESOURCE_EXHAUSTED, counted
MAX_PENDING_CALLS = 1 << 16
_METHOD_NAMES = frozenset(pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name)


@dataclass(frozen=True)
class ServerOptions:
    """Process-wide settings of ``ctredge serve`` (per-model settings are in ``config.json``).

    ``port`` 0 picks a free port.  ``intra_op_threads`` overrides every model's
    config when set.  ``run_threads``: threads that run ONNX Runtime sessions
    (None: the CPU count; worker processes, ``ctredge serve --workers``, are
    :mod:`.workers`).  ``max_message_bytes``: gRPC receive/send limit; a
    larger request is refused with RESOURCE_EXHAUSTED.  ``dynamic_batching``:
    None keeps each model's ``config.json``, True/False forces batching on/off
    for every model (``--batching on|off``); ``providers`` likewise overrides
    every model's execution providers (``--providers cpu``).  ``metrics_port``: Prometheus
    text over HTTP on that port (0 picks one; None: off).  ``poll_seconds``:
    re-read the repository this often (None: only on RepositoryModelLoad).
    ``grace_seconds``: how long a stop waits for accepted requests.
    ``model_control_mode`` (Triton's): ``none`` loads the repository at start and
    refuses RepositoryModelLoad/Unload; ``poll`` also re-reads it every
    ``poll_seconds`` (default 5) and refuses them too; ``explicit`` loads it at start
    and takes load/unload calls.  None: ``poll`` when ``poll_seconds`` is set, else
    ``none``.  ``tls_cert``/``tls_key``/``tls_client_ca`` and
    ``infer_token_file``/``admin_token_file``: :mod:`.security`.  ``metrics_host``:
    the address of the metrics endpoint (None: ``host``).  ``max_concurrent_rpcs``:
    ModelInfer calls held at once, ``max_inflight_bytes``: their raw tensor bytes
    together; beyond either, RESOURCE_EXHAUSTED.
    """

    host: str = "127.0.0.1"
    port: int = 8001
    require_gpu: bool = False
    intra_op_threads: int | None = None
    run_threads: int | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 5.0
    dynamic_batching: bool | None = None
    providers: tuple[str, ...] | None = None
    metrics_port: int | None = None
    poll_seconds: float | None = None
    model_control_mode: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    infer_token_file: str | None = None
    admin_token_file: str | None = None
    metrics_host: str | None = None
    max_concurrent_rpcs: int = 2048
    max_inflight_bytes: int = 512 * 1024 * 1024
    # KServe v2 REST (serve/rest.py): its port (0 picks one; None: off) and address (None: ``host``)
    http_port: int | None = None
    http_host: str | None = None

    def __post_init__(self) -> None:
        mode = self.model_control_mode
        if mode is None:
            mode = "poll" if self.poll_seconds else "none"
        if mode not in MODEL_CONTROL_MODES:
            raise ServeError(f"model control mode must be one of {MODEL_CONTROL_MODES}, got {mode!r}")
        if self.poll_seconds is not None and mode != "poll":
            raise ServeError(f"poll_seconds is only used with model control mode 'poll', got mode {mode!r}")
        object.__setattr__(self, "model_control_mode", mode)
        if mode == "poll" and self.poll_seconds is None:
            object.__setattr__(self, "poll_seconds", 5.0)
        if self.max_concurrent_rpcs < 1:
            raise ServeError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if self.max_inflight_bytes < self.max_message_bytes:
            raise ServeError(f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least max_message_bytes "
                             f"({self.max_message_bytes})")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ServeError(f"http port must be in [0, 65535], got {self.http_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ServeError(f"metrics port must be in [0, 65535], got {self.metrics_port}")
        if self.poll_seconds is not None and self.poll_seconds <= 0:
            raise ServeError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        if self.grace_seconds < 0:
            raise ServeError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"port must be in [0, 65535], got {self.port}")
        if self.intra_op_threads is not None and self.intra_op_threads < 0:
            raise ServeError(f"threads must be >= 0, got {self.intra_op_threads}")
        if self.run_threads is not None and self.run_threads < 1:
            raise ServeError(f"run threads must be >= 1, got {self.run_threads}")
        if self.max_message_bytes < 1024:
            raise ServeError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")

_GIL_LOCK = threading.Lock()
_GIL_USERS = [0, 0.005]  # servers running in this process, the interval to restore when the last stops


def _short_gil_switch(start: bool) -> None:
    """Use :data:`GIL_SWITCH_SECONDS` while any server of this process runs; restore the interval after."""
    with _GIL_LOCK:
        if start:
            if _GIL_USERS[0] == 0:
                _GIL_USERS[1] = sys.getswitchinterval()
                sys.setswitchinterval(GIL_SWITCH_SECONDS)
            _GIL_USERS[0] += 1
        elif _GIL_USERS[0] > 0:
            _GIL_USERS[0] -= 1
            if _GIL_USERS[0] == 0:
                sys.setswitchinterval(_GIL_USERS[1])


def _allocator_returns_memory() -> None:
    """Make glibc serve allocations of 256 KiB and more with mmap, so they go back to the OS when freed.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after
    which big request buffers come from the heap and stay in the process: RSS
    would only grow under large requests.  A fixed threshold ends that.
    No-op where glibc is absent.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 * 1024)
        libc.mallopt(m_trim_threshold, 1024 * 1024)
    except (OSError, AttributeError):
        log.debug("not glibc: the allocator keeps its defaults")


class InferenceServer:
    """A ``grpc.aio`` server over one repository folder; create and use it inside an event loop.

    ``worker``: set when this server is one worker process of ``ctredge serve
    --workers N`` (a :class:`ctredge.serve.worker.WorkerLink`): it then shares
    its port with the other workers (SO_REUSEPORT), loads before it listens,
    leaves ``/metrics`` to the supervisor and answers model control, statistics
    and readiness for all workers together.
    """

    def __init__(self, repository: str | os.PathLike[str], options: ServerOptions | None = None, *,
                 worker: Any = None):
        self.options = options or ServerOptions()
        self.worker = worker
        workers = self.options.run_threads or os.cpu_count() or 1
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctredge-ort")
        # large requests are decoded and hashed here, apart from the ONNX Runtime threads, so that they queue
        # behind each other and never in front of other requests' runs
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctredge-decode")
        self.metrics = Metrics() if self.options.metrics_port is not None else None
        settings = LoadSettings(require_gpu=self.options.require_gpu, intra_op_threads=self.options.intra_op_threads,
                                dynamic_batching=self.options.dynamic_batching, max_concurrency=workers,
                                providers=self.options.providers)
        self.repository = Repository(repository, settings=settings, executor=self.executor, metrics=self.metrics,
                                     drain_seconds=max(self.options.grace_seconds, 1.0))
        servicer_class = InferenceServicer if worker is None else worker.make_servicer
        self.servicer = servicer_class(self.repository, self.metrics, on_change=self._update_health,
                                       control_mode=self.options.model_control_mode,
                                       max_in_flight=self.options.max_concurrent_rpcs,
                                       max_inflight_bytes=self.options.max_inflight_bytes, executor=self.decoder)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: Any = None  # serve/rest.py RestServer when options.http_port is set
        self._server: Any = None
        self._health: Any = None
        self._poller: asyncio.Task | None = None
        self._gil_switch = False

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

        from ctredge.serve import security

        _allocator_returns_memory()
        o = self.options
        credentials = security.server_credentials(o.tls_cert, o.tls_key, o.tls_client_ca)
        interceptors = security.interceptors(o.infer_token_file, o.admin_token_file, tls=credentials is not None,
                                             on_refused=self._refused)
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0 if self.worker is None else 1),
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ])
        self._server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        self._health = health.aio.HealthServicer()
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        address = f"{o.host}:{o.port}" if ":" not in o.host else f"[{o.host}]:{o.port}"
        try:
            if credentials is not None:
                port = self._server.add_secure_port(address, credentials)
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServeError(f"cannot listen on {address}: {exc}") from exc
        if not port:
            raise ServeError(f"cannot listen on {address} (address in use?)")
        self.port = port
        if self.worker is not None:
            # a worker loads before it listens: the kernel hands new connections to every listening worker
            await self._load()
        await self._server.start()
        if o.http_port is not None:
            from ctredge.serve.rest import RestServer

            self._http = RestServer(self.servicer, self.repository, o, executor=self.decoder, on_refused=self._refused,
                                    reuse_port=self.worker is not None)
            try:
                self.http_port = await self._http.start()
            except BaseException:
                self._http = None
                await self._server.stop(None)
                self.executor.shutdown(wait=False)
                self.decoder.shutdown(wait=False)
                raise
        log.info("listening on %s:%d (%s; live; loading models from %s; model control %s)", o.host, port,
                 "TLS" + (" with client certificates" if o.tls_client_ca else "") if credentials else "plaintext",
                 self.repository.root, o.model_control_mode)
        if self.worker is None:
            await self._load()
        if self.metrics is not None and self.worker is None:
            try:
                self.metrics_port = self.metrics.serve(o.metrics_port, o.metrics_host or o.host)
            except BaseException:
                await self._stop_http()
                await self._server.stop(None)
                self.executor.shutdown(wait=False)
                self.decoder.shutdown(wait=False)
                raise
        # a worker thread decoding or hashing a large request holds the GIL for up to this long before the
        # event loop gets it back (Python's default is 5 ms, which small requests behind it would pay per turn)
        _short_gil_switch(True)
        self._gil_switch = True
        self.servicer.accepting = True
        await self._update_health()
        if o.poll_seconds:
            self._poller = asyncio.get_running_loop().create_task(self._poll(o.poll_seconds))
        log.info("ready: %s", ", ".join(f"{mv.name} v{mv.version} on {mv.provider}"
                                        for mv in self.repository.all() if mv.ready) or "no model is ready")
        return port

    async def _stop_http(self, grace: float = 0.0) -> None:
        if self._http is not None:
            await self._http.stop(grace)
            self._http = None

    async def _load(self) -> None:
        try:
            await self.repository.load()
            if self.worker is not None:
                await self.worker.loaded(self)  # model control that happened while this worker was away
        except BaseException:
            await self._stop_http()
            await self._server.stop(None)
            self.executor.shutdown(wait=False)
            self.decoder.shutdown(wait=False)
            raise

    def _refused(self, method: str, code: Any) -> None:
        if self.metrics is not None:
            short = method.rsplit("/", 1)[-1]
            self.metrics.refused(short if short in _METHOD_NAMES else "other", code.name)

    async def _update_health(self) -> None:
        from grpc_health.v1 import health_pb2

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        everyone = True
        if self.worker is not None:  # SERVING only while every worker is ready
            everyone = self.worker.report_ready(self)
        await self._health.set("", serving if self.servicer.ready else not_serving)
        for name in self.repository.names():
            await self._health.set(name, serving if everyone and self.repository.is_ready(name) else not_serving)

    async def _poll(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                if await self.repository.poll_once():
                    await self._update_health()
            except Exception:  # polling must never stop the server
                log.exception("polling the repository failed")

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new requests (UNAVAILABLE), finish accepted ones for ``grace`` s."""
        if self._server is None:
            return
        grace = self.options.grace_seconds if grace is None else grace
        self.servicer.accepting = False
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        end = time.monotonic() + grace
        pending = self.servicer.in_flight
        if pending:
            log.info("draining: %d request(s) in flight (grace %.1fs)", pending, grace)
        # Keep the port open until nothing is in flight and no call has arrived for DRAIN_QUIET_SECONDS: calls
        # that gRPC received but had not handed over yet then get an answer (UNAVAILABLE for new ones) instead
        # of being cancelled by the stop.
        seen, quiet_since = self.servicer.arrivals, time.monotonic()
        while time.monotonic() < end:
            now = time.monotonic()
            if self.servicer.arrivals != seen:
                seen, quiet_since = self.servicer.arrivals, now
            if not self.servicer.in_flight and now - quiet_since >= DRAIN_QUIET_SECONDS:
                break
            await asyncio.sleep(0.005)
        if self.servicer.in_flight:
            log.warning("grace period over with %d request(s) still in flight; they are cancelled",
                        self.servicer.in_flight)
        await self._stop_http(max(0.0, end - time.monotonic()))
        await self._server.stop(max(0.0, end - time.monotonic()))
        self.executor.shutdown(wait=True)
        self.decoder.shutdown(wait=True)
        if self._gil_switch:
            _short_gil_switch(False)
            self._gil_switch = False
        if self.metrics is not None:
            self.metrics.close()
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
            if server.metrics_port is not None:
                on_ready(port, server.metrics_port)
            else:
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
