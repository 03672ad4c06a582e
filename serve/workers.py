"""``ctredge serve --workers N``: N full servers on one port (SO_REUSEPORT), started and watched by a supervisor.

Why this design (README, "Worker processes", has the figures): a 1-row
request costs the server several hundred microseconds of Python (gRPC, protobuf,
checks, the event loop) and a few tens in ONNX Runtime, so what has to run on
more cores is the front end itself.  Executors shared by front-end processes
would put an extra hop (pickling and a socket both ways) in front of a small
share of the work; N whole servers need no hop, and each keeps the batching,
deadlines and limits of a single server.  The price is memory: every worker
loads the repository (one ONNX Runtime session per model per worker; on a GPU,
one CUDA context per worker).

The supervisor (this module) does not serve; it

* picks the port (``--port 0``: one free port, reserved with SO_REUSEPORT and
  held, never listening, until the end) and starts the workers
  (:mod:`.worker`), each with the same :class:`~ctredge.serve.server.ServerOptions`
  but that port and a share of the run threads;
* prints the ready line once every worker is ready, and fails the start with
  the first worker's error if one cannot start (bad repository, ``--require-gpu``,
  port in use);
* applies model control to every worker, one operation at a time, and
  remembers the unloads so that a restarted worker does the same;
* gathers statistics for ModelStatistics, tells every worker whether all are
  ready (health), serves ``/metrics`` from every worker's files
  (prometheus_client multiprocess mode);
* restarts a worker that dies (logged, with a back-off when it keeps dying);
* on SIGTERM/SIGINT, has every worker drain as a single server does, then exits.

The kernel spreads *connections* over the listening workers; a gRPC channel is
one HTTP/2 connection, so one channel always talks to one worker.  Clients that
want all cores open several channels (``grpc.use_local_subchannel_pool``, or
separate processes).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ctredge.serve.errors import ServeError
from ctredge.serve.server import ServerOptions
from ctredge.serve.worker import Channel, ChannelClosed, _rebuild

log = logging.getLogger("ctredge.serve")

STOP_MARGIN_SECONDS = 15.0  # after the grace period, how long a worker has to exit before it is killed
QUICK_DEATH_SECONDS = 10.0  # a worker that dies sooner than this after starting is restarted with a back-off
MAX_BACKOFF_SECONDS = 10.0


# =========================================================================== cores
def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` of v1), or None for no limit."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                candidates.append(root / line[3:].lstrip("/") / "cpu.max")
    except OSError:
        pass
    candidates.append(root / "cpu.max")
    for path in candidates:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 else quota_us / period_us


def available_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by the cgroup CPU quota (rounded up); at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpus(cgroup_root)
    if quota is not None:
        n = min(n, math.ceil(quota))
    return max(1, n)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (never listening) to ``host:port`` with SO_REUSEPORT: the workers' port, held until the end.

    SO_REUSEPORT would let this server share a port that another SO_REUSEPORT
    server (another ``ctredge serve --workers``) listens on: a port that accepts
    a connection is refused first.
    """
    if port:
        probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        try:
            with socket.create_connection((probe, port), timeout=1.0):
                pass
        except OSError:
            pass
        else:
            raise ServeError(f"cannot listen on {host}:{port}: another server is listening there")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


def _status(rc: int | None) -> str:
    if rc is None:
        return "no status"
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"status {rc}"


# =========================================================================== the supervisor
@dataclass
class _Slot:
    index: int
    proc: Any = None
    channel: Channel | None = None
    pid: int | None = None
    ready: bool = False
    started_at: float = 0.0
    quick_deaths: int = 0
    first: asyncio.Future | None = None  # the first start's outcome
    task: asyncio.Task | None = None
    tasks: set = field(default_factory=set)


class Supervisor:
    """Starts, watches and stops the worker processes of one ``ctredge serve --workers N``."""

    def __init__(self, repository: str | os.PathLike[str], options: ServerOptions, workers: int):
        if workers < 2:
            raise ServeError(f"a supervisor needs at least 2 workers, got {workers} (1 is a plain server)")
        self.repository = str(repository)
        self.options = options
        self.n = workers
        self.slots = [_Slot(i) for i in range(workers)]
        self.unloaded: set[str] = set()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.stopping = False
        self.all_ready = False
        self._control = asyncio.Lock()
        self._reservation: socket.socket | None = None
        self._http_reservation: socket.socket | None = None
        self._metrics_dir: str | None = None
        self._metrics_http: Any = None
        self._worker_options: ServerOptions | None = None

    # ------------------------------------------------------------------ start
    async def start(self) -> int:
        """Start every worker; returns the port once all are ready.

        Raises:
            ServeError (or the worker's own error class): the port cannot be bound, or a worker cannot start.
        """
        o = self.options
        self._reservation = _reserve_port(o.host, o.port)
        self.port = self._reservation.getsockname()[1]
        run_threads = o.run_threads or max(1, math.ceil(available_cores() / self.n))
        http_port = o.http_port
        if o.http_port is not None:   # the REST port: reserved here too, SO_REUSEPORT in each worker's listener
            self._http_reservation = _reserve_port(o.http_host or o.host, o.http_port)
            http_port = self._http_reservation.getsockname()[1]
        # every worker gets the same options but the ports
        self._worker_options = replace(o, port=self.port, run_threads=run_threads, http_port=http_port)
        if o.metrics_port is not None:
            self._metrics_dir = tempfile.mkdtemp(prefix="ctredge-metrics-")
        log.info("starting %d workers on %s:%d (%d run thread(s) each)", self.n, o.host, self.port, run_threads)
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            slot.first = loop.create_future()
            slot.task = loop.create_task(self._keep(slot))
        try:
            for slot in self.slots:
                await slot.first
            if o.metrics_port is not None:
                self._serve_metrics(o.metrics_port, o.metrics_host or o.host)
        except BaseException:
            for slot in self.slots:  # one error is raised; the others' are the same story
                if slot.first is not None and slot.first.done() and not slot.first.cancelled():
                    slot.first.exception()
            await self.stop()
            raise
        log.info("%d workers serving on %s:%d (pids %s)", self.n, o.host, self.port,
                 ", ".join(str(s.pid) for s in self.slots))
        return self.port

    def _serve_metrics(self, port: int, host: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._metrics_dir)
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ServeError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self._metrics_http = server
        self.metrics_port = int(server.server_address[1])
        log.info("Prometheus metrics of all %d workers on http://%s:%d/metrics", self.n, host, self.metrics_port)

    async def _spawn(self, slot: _Slot) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        else:
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        try:
            slot.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ctredge.serve.worker", "--fd", str(child.fileno()), "--index", str(slot.index),
                pass_fds=(child.fileno(),), env=env)
        finally:
            child.close()
        slot.pid, slot.ready, slot.started_at = slot.proc.pid, False, time.monotonic()
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        channel = await Channel.over(parent, lambda msg, s=slot, f=started: self._handle(s, f, msg))
        reader = asyncio.get_running_loop().create_task(channel.run())
        slot.tasks.add(reader)
        reader.add_done_callback(slot.tasks.discard)
        async with self._control:
            # its configuration first, with the unloads so far; every control operation after them reaches it
            channel.notify({"index": slot.index, "repository": self.repository, "options": self._worker_options,
                            "unloaded": set(self.unloaded), "log_level": logging.getLogger("ctredge").level})
            slot.channel = channel
        exited = asyncio.get_running_loop().create_task(slot.proc.wait())
        await asyncio.wait([started, exited], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.set_exception(ServeError(f"worker {slot.index} (pid {slot.pid}) exited with "
                                             f"{_status(slot.proc.returncode)} before it was ready"))
        try:
            started.result()
        finally:
            exited.cancel()

    async def _keep(self, slot: _Slot) -> None:
        """Run one worker for as long as the server runs; restart it when it dies."""
        while not self.stopping:
            try:
                await self._spawn(slot)
            except Exception as exc:
                if slot.first is not None and not slot.first.done():
                    slot.first.set_exception(exc)
                    return
                log.error("worker %d could not start again: %s", slot.index, exc)
            else:
                if slot.first is not None and not slot.first.done():
                    slot.first.set_result(None)
            rc = await slot.proc.wait()
            slot.ready = False
            self._mark_dead(slot.pid)
            self._update_all_ready()
            if self.stopping:
                return
            lived = time.monotonic() - slot.started_at
            slot.quick_deaths = slot.quick_deaths + 1 if lived < QUICK_DEATH_SECONDS else 0
            delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (slot.quick_deaths - 1)) if slot.quick_deaths else 0.0
            log.warning("worker %d (pid %s) exited with %s after %.1fs; restarting it%s", slot.index, slot.pid,
                        _status(rc), lived, f" in {delay:.1f}s" if delay else "")
            if delay:
                await asyncio.sleep(delay)

    def _mark_dead(self, pid: int | None) -> None:
        if self._metrics_dir is not None and pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self._metrics_dir)

    # ------------------------------------------------------------------ what workers ask
    async def _handle(self, slot: _Slot, started: asyncio.Future, msg: dict[str, Any]) -> Any:
        op = msg.get("op")
        if op == "started":
            if not started.done():
                started.set_result(msg["port"])
            return None
        if op == "failed":
            if not started.done():
                started.set_exception(_rebuild(msg["kind"], f"worker {slot.index}: {msg['error']}"))
            return None
        if op == "ready":
            slot.ready = bool(msg["ready"])
            self._update_all_ready()
            return None
        if op in ("load", "unload"):
            return await self._control_op(op, msg["name"])
        if op == "stats":
            results = await self._broadcast(msg)
            return [item for r in results for item in r]
        raise ServeError(f"unknown worker request {op!r}")

    def _update_all_ready(self) -> None:
        now = (not self.stopping and all(s.ready and s.channel is not None and not s.channel.closed.is_set()
                                         for s in self.slots))
        if now != self.all_ready:
            self.all_ready = now
            log.info("all %d workers ready" if now else "not every worker is ready (of %d): health NOT_SERVING",
                     self.n)
            for s in self.slots:
                if s.channel is not None:
                    s.channel.notify({"op": "all_ready", "ready": now})

    async def _broadcast(self, msg: dict[str, Any]) -> list[Any]:
        """``msg`` to every connected worker; their answers (workers that died meanwhile left out)."""
        channels = [s.channel for s in self.slots if s.channel is not None and not s.channel.closed.is_set()]
        results = await asyncio.gather(*(ch.request(msg) for ch in channels), return_exceptions=True)
        out = []
        for r in results:
            if isinstance(r, ChannelClosed):
                continue
            if isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    async def _control_op(self, op: str, name: str) -> list[str] | None:
        """A load or unload on every worker, one operation at a time; remembered for workers started later."""
        async with self._control:
            results = await self._broadcast({"op": op, "name": name})
            if op == "unload":
                self.unloaded.add(name)
                return None
            self.unloaded.discard(name)
            problems: list[str] = []
            for r in results:
                problems += [p for p in r if p not in problems]
            return problems

    # ------------------------------------------------------------------ stop
    async def stop(self) -> None:
        """Every worker drains (SIGTERM: as one server does) and exits; killed after the grace period and a margin."""
        if self.stopping:
            return
        self.stopping = True
        self._update_all_ready()
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if procs:
            done, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs],
                                            timeout=self.options.grace_seconds + STOP_MARGIN_SECONDS)
            for p in procs:
                if p.returncode is None:
                    log.error("worker pid %d did not stop in time; killing it", p.pid)
                    p.kill()
                    await p.wait()
                elif p.returncode != 0:
                    log.warning("worker pid %d stopped with %s", p.pid, _status(p.returncode))
        for s in self.slots:
            if s.task is not None and s.task is not asyncio.current_task():
                s.task.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
        if self._http_reservation is not None:
            self._http_reservation.close()
            self._http_reservation = None
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("all workers stopped")


async def serve_workers_until_signal(repository: str | os.PathLike[str], options: ServerOptions, workers: int,
                                     on_ready: Callable[..., None] | None = None) -> None:
    """Start ``workers`` worker processes, call ``on_ready(port[, metrics_port])``, serve until SIGINT/SIGTERM."""
    supervisor = Supervisor(repository, options, workers)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = loop.create_task(supervisor.start())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    try:
        if not starting.done():
            log.info("signal received while starting: stopping")
            starting.cancel()
            return
        port = starting.result()
        if on_ready is not None:
            on_ready(port, supervisor.metrics_port) if supervisor.metrics_port is not None else on_ready(port)
        await stopped
        log.info("signal received: every worker drains (grace %.1fs)", options.grace_seconds)
    finally:
        await supervisor.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(repository: str | os.PathLike[str], options: ServerOptions, workers: int,
        on_ready: Callable[..., None] | None = None) -> None:
    """Blocking entry point of ``ctredge serve --workers N`` (N >= 2; 1 is :func:`ctredge.serve.server.run`)."""
    asyncio.run(serve_workers_until_signal(repository, options, workers, on_ready))
