"""One worker process of ``ctredge serve --workers N``: a full server on the shared port, linked to its supervisor.

The supervisor (:mod:`.workers`) starts ``python -m ctredge.serve.worker --fd FD``
with one end of a socket pair; over it travel length-prefixed pickled messages
(:class:`Channel`, both ways, requests with replies).  The worker runs an
:class:`~ctredge.serve.server.InferenceServer` with a :class:`WorkerLink`,
whose :class:`WorkerServicer` answers for all workers together:

* RepositoryModelLoad/Unload go to the supervisor, which has every worker
  apply them, one operation at a time, and answers with what they found;
* ModelStatistics is the sum of every live worker's counters;
* ServerReady and health are SERVING only while every worker is ready.

Everything else (inference, metadata, TLS, tokens, limits) is the worker's own,
built from the same :class:`~ctredge.serve.server.ServerOptions`.  SIGTERM or
SIGINT drains the worker as it drains a single server; so does the supervisor's
death (``PR_SET_PDEATHSIG``, and the socket closing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from typing import Any, Awaitable, Callable

from tritonclient.grpc import service_pb2 as pb

from ctredge.serve import errors
from ctredge.serve.codec import shown
from ctredge.serve.errors import LoadRefused, ServeError, ShuttingDown
from ctredge.serve.servicer import InferenceServicer, _rpc
from ctredge.serve.stats import QUEUE_SAMPLE_SECONDS, ModelStats

log = logging.getLogger("ctredge.serve")

_HEADER = struct.Struct("<I")
MAX_FRAME = 64 << 20


class ChannelClosed(ServeError):
    """The other end of a worker/supervisor channel has gone."""


class Channel:
    """Length-prefixed pickled messages over a stream: ``await request(msg)`` -> reply, ``notify(msg)``.

    ``handler(msg)`` answers the other side's requests and notifications (its
    return value is the reply; an exception is sent back and raised there as
    the same :mod:`ctredge.serve.errors` class).  Only the supervisor and its
    own workers are at either end: pickle is safe here.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Callable[[Any], Awaitable[Any]]):
        self.reader, self.writer, self.handler = reader, writer, handler
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._tasks: set[asyncio.Task] = set()
        self.closed = asyncio.Event()

    @classmethod
    async def over(cls, sock: socket.socket, handler: Callable[[Any], Awaitable[Any]]) -> "Channel":
        reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, handler)

    def _send(self, frame: tuple) -> None:
        if self.closed.is_set():
            raise ChannelClosed("the channel is closed")
        body = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        self.writer.write(_HEADER.pack(len(body)) + body)

    def notify(self, msg: Any) -> None:
        """Send ``msg`` without waiting for a reply (nothing happens if the channel is closed)."""
        if not self.closed.is_set():
            self._send(("note", 0, msg))

    async def request(self, msg: Any) -> Any:
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        self._send(("req", self._next, msg))
        return await fut

    async def run(self) -> None:
        """Read frames until the other end closes; then fail what waits for a reply."""
        try:
            while True:
                (size,) = _HEADER.unpack(await self.reader.readexactly(_HEADER.size))
                if size > MAX_FRAME:
                    raise ChannelClosed(f"a frame of {size} bytes is over the limit")
                kind, rid, payload = pickle.loads(await self.reader.readexactly(size))
                if kind == "rep":
                    fut = self._pending.pop(rid, None)
                    if fut is not None and not fut.done():
                        ok, value = payload
                        fut.set_result(value) if ok else fut.set_exception(_rebuild(*value))
                else:
                    task = asyncio.get_running_loop().create_task(self._answer(kind, rid, payload))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ChannelClosed("the other process has gone"))
            self._pending.clear()
            self.writer.close()

    async def _answer(self, kind: str, rid: int, msg: Any) -> None:
        try:
            result = (True, await self.handler(msg))
        except Exception as exc:
            if not isinstance(exc, ServeError):
                log.error("worker channel: %r failed", msg.get("op") if isinstance(msg, dict) else msg,
                          exc_info=exc)
            result = (False, (type(exc).__name__, str(exc)))
        if kind == "req" and not self.closed.is_set():
            self._send(("rep", rid, result))


def _rebuild(kind: str, message: str) -> Exception:
    """The exception another process raised: the same :mod:`ctredge.serve.errors` class, else ServeError."""
    cls = getattr(errors, kind, None) if kind != "ChannelClosed" else ChannelClosed
    if isinstance(cls, type) and issubclass(cls, ServeError):
        exc = cls.__new__(cls)
        Exception.__init__(exc, message)
        if not hasattr(exc, "public"):
            exc.public = message  # LoadError's client-facing text
        return exc
    return ServeError(f"{kind}: {message}")


class WorkerServicer(InferenceServicer):
    """The servicer of one worker: model control, statistics and readiness answer for every worker."""

    def __init__(self, *args: Any, link: "WorkerLink", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.link = link

    @property
    def locally_ready(self) -> bool:
        return InferenceServicer.ready.fget(self)  # type: ignore[attr-defined]

    @property
    def ready(self) -> bool:
        return self.locally_ready and self.link.all_ready

    @_rpc
    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        # which worker answered (tests, debugging): one gRPC connection is always the same worker
        await context.send_initial_metadata((("ctredge-worker", f"{self.link.index} {os.getpid()}"),))
        return await InferenceServicer.ServerMetadata.__wrapped__(self, request, context)

    @_rpc
    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """The sum over every live worker of Triton's statistics (of one model and version when named)."""
        if request.name:
            if request.version:
                self.repo.get(request.name, request.version)  # NOT_FOUND / UNAVAILABLE here, as for one server
            else:
                self.repo.get(request.name)
        snaps = await self.link.request({"op": "stats", "name": request.name, "version": request.version})
        keys = sorted({(n, v) for n, v, _ in snaps})
        merged = [ModelStats.merged(n, v, [s for n2, v2, s in snaps if (n2, v2) == (n, v)]) for n, v in keys]
        return pb.ModelStatisticsResponse(model_stats=[m.to_proto() for m in merged])

    @_rpc
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        """Every worker re-reads ``REPO/<model_name>``; refused (as one server would) when any found a problem."""
        self._check_control("RepositoryModelLoad", request)
        problems = await self.link.request({"op": "load", "name": request.model_name})
        if problems:
            name = request.model_name
            serving = self.repo.ready_versions(name)
            raise LoadRefused(f"model {shown(name)}: {'; '.join(problems)}; "
                              + (f"still serving version(s) {serving}" if serving else "no version is serving"))
        return pb.RepositoryModelLoadResponse()

    @_rpc
    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        """Every worker stops serving ``model_name``; requests already accepted finish."""
        self._check_control("RepositoryModelUnload", request)
        await self.link.request({"op": "unload", "name": request.model_name})
        return pb.RepositoryModelUnloadResponse()


class WorkerLink:
    """What an :class:`~ctredge.serve.server.InferenceServer` of a worker process asks its supervisor."""

    def __init__(self, index: int, unloaded: set[str]):
        self.index = index
        self.unloaded = set(unloaded)  # models unloaded by model control before this worker started
        self.all_ready = False
        self.channel: Channel | None = None
        self.server: Any = None
        self._loaded = asyncio.Event()
        self._reported: bool | None = None

    def make_servicer(self, *args: Any, **kwargs: Any) -> WorkerServicer:
        return WorkerServicer(*args, link=self, **kwargs)

    async def request(self, msg: dict[str, Any]) -> Any:
        if self.channel is None or self.channel.closed.is_set():
            raise ShuttingDown("this worker has lost its supervisor and is stopping; retry")
        try:
            return await self.channel.request(msg)
        except ChannelClosed:
            raise ShuttingDown("this worker has lost its supervisor and is stopping; retry") from None

    async def loaded(self, server: Any) -> None:
        """After the initial load: apply the unloads made while this worker was not running."""
        for name in sorted(self.unloaded):
            if name in server.repository.versions:
                await server.repository.unload_model(name)
        self.server = server
        self._loaded.set()

    def report_ready(self, server: Any) -> bool:
        """Tell the supervisor whether this worker is ready (on change); whether every worker is."""
        mine = server.servicer.locally_ready
        if mine != self._reported and self.channel is not None:
            self._reported = mine
            self.channel.notify({"op": "ready", "ready": mine})
        return self.all_ready

    async def handle(self, msg: dict[str, Any]) -> Any:
        """The supervisor's requests: model control, statistics, whether every worker is ready."""
        op = msg["op"]
        if op == "all_ready":
            self.all_ready = msg["ready"]
            if self.server is not None:
                await self.server._update_health()
            return None
        if op == "stats" and not self._loaded.is_set():
            return []  # still loading: nothing counted yet
        await self._loaded.wait()  # control that arrives while this worker loads waits for the load
        repo = self.server.repository
        if op == "load":
            problems = await repo.load_model(msg["name"])
            await self.server._update_health()
            return problems
        if op == "unload":
            if msg["name"] in repo.versions:
                await repo.unload_model(msg["name"])
            await self.server._update_health()
            return None
        if op == "stats":
            name, version = msg["name"], msg["version"]
            return [(mv.name, mv.version, mv.stats.snapshot()) for mv in repo.all() if mv.stats is not None
                    and (not name or mv.name == name) and (not version or str(mv.version) == version)]
        raise ServeError(f"unknown supervisor request {op!r}")


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def _sample_metrics(metrics: Any) -> None:
    while True:
        metrics.sample()
        await asyncio.sleep(QUEUE_SAMPLE_SECONDS)


async def worker_main(sock: socket.socket) -> int:
    """Serve as one worker until SIGTERM/SIGINT or the supervisor's end; returns the exit status."""
    from ctredge.serve.server import InferenceServer

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before the death signal was armed
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    first: asyncio.Future = loop.create_future()
    linked = asyncio.Event()
    link: WorkerLink | None = None

    async def handle(msg: Any) -> Any:
        if not first.done():  # the first message is this worker's configuration
            first.set_result(msg)
            return None
        await linked.wait()
        return await link.handle(msg)

    channel = await Channel.over(sock, handle)
    reader = loop.create_task(channel.run())
    await asyncio.wait([first, loop.create_task(channel.closed.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        log.error("the supervisor went away before it configured this worker")
        return 1
    config = first.result()
    link = WorkerLink(config["index"], config["unloaded"])
    link.channel = channel
    linked.set()
    logging.getLogger("ctredge").setLevel(config["log_level"])
    server = InferenceServer(config["repository"], config["options"], worker=link)
    try:
        port = await server.start()
    except BaseException as exc:
        channel.notify({"op": "failed", "error": str(exc) or type(exc).__name__, "kind": type(exc).__name__})
        await channel.writer.drain()
        return 3
    providers = sorted({mv.provider for mv in server.repository.all() if mv.ready})
    if any("CUDA" in p for p in providers):
        log.info("worker %d: models on %s; this worker holds a CUDA context of its own (one per worker: GPU "
                 "memory grows with --workers)", link.index, ", ".join(providers))
    sampler = loop.create_task(_sample_metrics(server.metrics)) if server.metrics is not None else None
    channel.notify({"op": "started", "pid": os.getpid(), "port": port})
    link.report_ready(server)
    gone = loop.create_task(channel.closed.wait())
    await asyncio.wait([loop.create_task(stop.wait()), gone], return_when=asyncio.FIRST_COMPLETED)
    if gone.done() and not stop.is_set():
        log.warning("worker %d: the supervisor has gone; stopping", link.index)
    if sampler is not None:
        sampler.cancel()
    await server.stop()
    reader.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ctredge.serve.worker",
                                description="one worker process of ctredge serve --workers (started by it)")
    p.add_argument("--fd", type=int, required=True, help="the supervisor's socket")
    p.add_argument("--index", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(name)s %(levelname)s worker {args.index}: %(message)s")
    sock = socket.socket(fileno=args.fd)
    return asyncio.run(worker_main(sock))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
