"""Server processes for the gRPC benchmarks: core pinning, start-up, RSS, cold start.

* :func:`cpu_plan` splits the cores this process may use between the server
  and the load-generating clients, so they do not fight for the same core.
* :class:`ServerProcess` runs ``python -m ctredge.cli serve`` as a child
  process (pinned with ``taskset`` when it exists, else ``os.sched_setaffinity``
  in the child before ``exec``), waits for its ready line, measures its cold
  start, reads its memory from ``/proc``, and stops it.
* :func:`footprint` serves one model alone and reports bytes on disk, cold
  start and resident memory.

What is measured, and how:

``ready_s``
    ``time.perf_counter()`` just before ``Popen`` to the moment the server's
    ``serving REPO on HOST:PORT`` line is read (models are loaded and warmed up
    before that line is printed).
``cold_start_s``
    The same start to the first ``ModelInfer`` answered OK: after the ready line
    the prebuilt request is sent every 5 ms until one succeeds (UNAVAILABLE
    means not yet; any other error status ends the wait with an error).  Process start,
    Python and library imports, model load, warm-up and the first request are
    all inside it.
``rss_bytes`` / ``hwm_bytes``
    ``VmRSS`` / ``VmHWM`` (peak) of the server process from
    ``/proc/PID/status`` (Linux; ``None`` elsewhere).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from ctredge.errors import CtrEdgeError

log = logging.getLogger("ctredge.benchmarks")

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
READY_LINE = re.compile(r"^serving .* on (?P<host>.+):(?P<port>\d+)\s*$")


class ServerStartError(CtrEdgeError):
    """The server process died, or was not ready / not answering within the timeout."""


# ----------------------------------------------------------------------------- cores
def available_cpus() -> list[int]:
    """The cores this process may run on (``os.sched_getaffinity``; all of ``os.cpu_count()`` elsewhere)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_plan(n_client_procs: int | None = None) -> dict[str, Any]:
    """Which cores the server and the load-generating clients get.

    With one core there is nothing to split: ``pinned`` is false and both
    share it.  With ``n`` >= 2 cores the server gets the first ones and the
    clients the rest: ``n_client_procs`` cores for the clients when given
    (at most ``n - 1``), else half of them (``n // 2``; 2 cores: server core 0,
    clients core 1).

    Returns ``{"pinned", "server_cpus", "client_cpus", "available", "method", "reason"}``;
    ``method`` is ``taskset`` or ``sched_setaffinity`` (how :class:`ServerProcess`
    pins), None when not pinned.
    """
    cpus = available_cpus()
    n = len(cpus)
    method = "taskset" if shutil.which("taskset") else "sched_setaffinity"
    if n < 2 or not hasattr(os, "sched_setaffinity"):
        why = (f"only {n} core available" if n < 2 else "this platform has no sched_setaffinity")
        return {"pinned": False, "server_cpus": cpus, "client_cpus": cpus, "available": cpus, "method": None,
                "reason": f"{why}: server and clients share it, not pinned"}
    n_clients = min(max(1, n_client_procs), n - 1) if n_client_procs else n // 2
    server, clients = cpus[:n - n_clients], cpus[n - n_clients:]
    return {"pinned": True, "server_cpus": server, "client_cpus": clients, "available": cpus, "method": method,
            "reason": f"{n} cores: server on {_cpu_list(server)}, clients on {_cpu_list(clients)}"}


def _cpu_list(cpus: Sequence[int]) -> str:
    return ",".join(str(int(c)) for c in cpus)


def read_proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of a process in bytes (empty where ``/proc`` is missing)."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            parts = rest.split()
            out[key] = int(parts[0]) * 1024 if parts else 0
    return out


# ----------------------------------------------------------------------------- server
class ServerProcess:
    """``ctredge serve --repository R --port 0 [extra_args]`` in a child process.

    Use as a context manager (or call :meth:`start` / :meth:`stop`)::

        with ServerProcess(repo, cpus=[0], model="ctr-fp32", request=req_bytes) as srv:
            run_load(srv.url, ...)
            srv.rss_bytes(), srv.cold_start_s

    ``extra_args`` are passed through to ``ctredge serve`` unchanged (e.g.
    ``["--batching", "off", "--threads", "1"]``).  ``cpus`` pins the process.
    ``model`` + ``request`` (a serialized ``ModelInferRequest``): measure the cold
    start by polling ``ModelInfer`` until it answers OK.  stdout and stderr go to
    files in ``log_dir`` (by default a temporary folder, removed by :meth:`stop`
    unless the start failed): ``.stderr_path``.

    Raises (from :meth:`start`):
        ServerStartError: the process exits, does not print its ready line
            within ``start_timeout`` seconds, or does not answer the request OK;
            the message holds the command and the tail of its stderr.
    """

    def __init__(self, repository: str | os.PathLike[str], extra_args: Sequence[str] = (), *,
                 cpus: Sequence[int] | None = None, model: str | None = None, request: bytes | None = None,
                 start_timeout: float = 120.0, log_dir: str | os.PathLike[str] | None = None,
                 python: str | None = None, env: dict[str, str] | None = None, label: str = "server"):
        self.repository = str(repository)
        self.extra_args = [str(a) for a in extra_args]
        self.cpus = sorted(int(c) for c in cpus) if cpus else None
        self.model = model
        self.request = request
        self.start_timeout = float(start_timeout)
        self.python = python or sys.executable
        self.env = env
        self.label = label
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="ctredge-server-"))
        self.stdout_path = self.log_dir / f"{label}.stdout.log"
        self.stderr_path = self.log_dir / f"{label}.stderr.log"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.ready_s: float | None = None
        self.cold_start_s: float | None = None
        self.pin_method: str | None = None
        self.returncode: int | None = None
        self._files: list[Any] = []
        self._failed = False

    # ------------------------------------------------------------------ info
    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def command(self) -> list[str]:
        # one worker process unless asked: the figures (and the RSS read) are of one server process
        workers = [] if "--workers" in self.extra_args else ["--workers", "1"]
        cmd = [self.python, "-m", "ctredge.cli", "serve", "--repository", self.repository, "--port", "0",
               *workers, *self.extra_args]
        if self.cpus and shutil.which("taskset"):
            cmd = [shutil.which("taskset") or "taskset", "-c", _cpu_list(self.cpus), *cmd]
        return cmd

    def rss_bytes(self) -> int | None:
        """Resident memory now (``VmRSS``), bytes; None if unknown."""
        return read_proc_status(self.pid).get("VmRSS") if self.pid else None

    def hwm_bytes(self) -> int | None:
        """Peak resident memory so far (``VmHWM``), bytes; None if unknown."""
        return read_proc_status(self.pid).get("VmHWM") if self.pid else None

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "(no stderr captured)"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join(tail) if tail else "(stderr is empty)"

    def info(self) -> dict[str, Any]:
        """What was started and measured, for a report."""
        return {"command": self.command, "pid": self.pid, "url": self.url, "cpus": self.cpus,
                "pin_method": self.pin_method, "ready_s": self.ready_s, "cold_start_s": self.cold_start_s,
                "stderr": str(self.stderr_path)}

    # ------------------------------------------------------------------ start / stop
    def start(self) -> "ServerProcess":
        cmd = self.command
        preexec = None
        if self.cpus:
            if cmd[0] != self.python:
                self.pin_method = "taskset"
            elif hasattr(os, "sched_setaffinity"):
                self.pin_method = "sched_setaffinity"
                cpus = set(self.cpus)
                preexec = lambda: os.sched_setaffinity(0, cpus)  # noqa: E731  (runs in the child before exec)
            else:
                log.warning("%s: cannot pin to cores %s on this platform; running unpinned", self.label, self.cpus)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.stdout_path, "wb")
        err = open(self.stderr_path, "wb")
        self._files = [out, err]
        log.info("%s: starting %s", self.label, " ".join(cmd))
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=preexec, start_new_session=True)
        except OSError as exc:
            self._close_files()
            raise ServerStartError(f"{self.label}: cannot run {cmd[0]}: {exc}") from exc
        try:
            self.url = self._wait_ready(t0)
            self.ready_s = time.perf_counter() - t0
            if self.model is not None and self.request is not None:
                self._first_inference(t0)
                self.cold_start_s = time.perf_counter() - t0
        except BaseException:
            self.stop()
            raise
        log.info("%s: ready on %s (pid %d) in %.2fs%s", self.label, self.url, self.pid, self.ready_s,
                 "" if self.cold_start_s is None else f", first inference after {self.cold_start_s:.2f}s")
        return self

    def _fail(self, what: str) -> ServerStartError:
        self._failed = True  # keep the logs the message points to
        code = self.proc.poll() if self.proc is not None else None
        status = f" (exit status {code})" if code is not None else ""
        return ServerStartError(f"{self.label} {what}{status}.\ncommand: {' '.join(self.command)}\n"
                                f"stderr ({self.stderr_path}), last lines:\n{self.stderr_tail()}")

    def _wait_ready(self, t0: float) -> str:
        assert self.proc is not None
        while True:
            try:
                text = self.stdout_path.read_text(errors="replace")
            except OSError:
                text = ""
            for line in text.splitlines():
                m = READY_LINE.match(line.strip())
                if m:
                    host = m.group("host").strip("[]")
                    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
                    if ":" in host and not host.startswith("["):
                        host = f"[{host}]"
                    return f"{host}:{m.group('port')}"
            if self.proc.poll() is not None:
                raise self._fail("exited before it was ready")
            if time.perf_counter() - t0 > self.start_timeout:
                raise self._fail(f"printed no 'serving ... on HOST:PORT' line within {self.start_timeout:.0f}s")
            time.sleep(0.01)

    def _first_inference(self, t0: float) -> None:
        import grpc

        assert self.proc is not None and self.url is not None
        last = ""
        with grpc.insecure_channel(self.url) as channel:
            call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
            while True:
                try:
                    call(self.request, timeout=max(1.0, self.start_timeout))
                    return
                except grpc.RpcError as exc:
                    code = exc.code() if hasattr(exc, "code") else None
                    last = f"{getattr(code, 'name', code)}: {exc.details() if hasattr(exc, 'details') else exc}"
                    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        # not a server still starting: waiting will not help
                        raise self._fail(f"refused the cold-start request for model {self.model!r} ({last})") \
                            from None
                if self.proc.poll() is not None:
                    raise self._fail("exited before its first inference")
                if time.perf_counter() - t0 > self.start_timeout:
                    raise self._fail(f"answered no ModelInfer for {self.model!r} OK within "
                                     f"{self.start_timeout:.0f}s (last: {last})")
                time.sleep(0.005)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns the exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop within %.0fs of SIGTERM; killing it", self.label, proc.pid,
                            timeout)
                proc.kill()
                proc.wait()
        if proc is not None:
            self.returncode = proc.returncode
        self._close_files()
        if self._own_log_dir and not self._failed:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return self.returncode

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------- footprint
def model_bytes(repository: str | os.PathLike[str], model: str, version: int | None = None) -> dict[str, Any]:
    """Bytes on disk of one model version (the latest by default): ``model.onnx`` and its whole folder.

    Raises:
        CtrEdgeError: no such model or version folder.
    """
    from ctredge.layout import RepositoryLayout

    layout = RepositoryLayout(repository)
    versions = layout.versions(model)
    if not versions:
        raise CtrEdgeError(f"{layout.model_dir(model)}: expected a model folder with version folders "
                           f"(REPO/<model>/<version>/model.onnx)")
    v = versions[-1] if version is None else int(version)
    if v not in versions:
        raise CtrEdgeError(f"{layout.model_dir(model)}: no version {v}; it has {versions}")
    onnx_file = layout.model_path(model, v)
    return {"version": v, "onnx_bytes": onnx_file.stat().st_size if onnx_file.is_file() else None,
            "folder_bytes": layout.version_bytes(model, v, with_manifest=True)}


def footprint(repository: str | os.PathLike[str], model: str, request: bytes, *, n_requests: int = 200,
              extra_args: Sequence[str] = (), cpus: Sequence[int] | None = None, start_timeout: float = 120.0,
              log_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Serve ``model`` alone and measure what it costs.

    A temporary repository holds a symlink to ``repository/model`` (config
    and versions as they are); a :class:`ServerProcess` serves it.  Then
    ``request`` (a serialized ``ModelInferRequest`` for ``model``) is sent
    once more (warm-up), the RSS read, ``n_requests`` more sent one at a time,
    and RSS and peak RSS read again.

    Returns ``{"model", "onnx_bytes", "folder_bytes", "version", "ready_s",
    "cold_start_s", "rss_warm_bytes", "rss_after_bytes", "hwm_bytes",
    "n_requests", "cpus", "pin_method"}``.

    Raises:
        ServerStartError: the server does not start or refuses the request.
        CtrEdgeError: no such model folder.
    """
    import grpc

    src = Path(repository).resolve() / model
    sizes = model_bytes(repository, model)
    with tempfile.TemporaryDirectory(prefix="ctredge-footprint-") as tmp:
        (Path(tmp) / model).symlink_to(src, target_is_directory=True)
        with ServerProcess(tmp, extra_args, cpus=cpus, model=model, request=request, start_timeout=start_timeout,
                           log_dir=log_dir, label=f"footprint-{model}") as srv:
            with grpc.insecure_channel(srv.url) as channel:
                call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
                call(request, timeout=60)
                rss_warm = srv.rss_bytes()
                for _ in range(n_requests):
                    call(request, timeout=60)
            rss_after, hwm = srv.rss_bytes(), srv.hwm_bytes()
            info = srv.info()
    result = {"model": model, **sizes, "ready_s": info["ready_s"], "cold_start_s": info["cold_start_s"],
              "rss_warm_bytes": rss_warm, "rss_after_bytes": rss_after, "hwm_bytes": hwm,
              "n_requests": n_requests, "cpus": info["cpus"], "pin_method": info["pin_method"]}
    log.info("footprint %s: %s bytes on disk, cold start %.2fs, RSS %.1f MB after %d requests", model,
             f"{sizes['folder_bytes']:,}", result["cold_start_s"], (rss_after or 0) / 1e6, n_requests)
    return result


def baseline_rss(extra_args: Sequence[str] = (), *, cpus: Sequence[int] | None = None,
                 start_timeout: float = 60.0) -> dict[str, Any]:
    """RSS of a server with an empty repository: subtract it from :func:`footprint`'s to get a model's share.

    Returns ``{"ready_s", "rss_bytes", "hwm_bytes"}``.
    """
    with tempfile.TemporaryDirectory(prefix="ctredge-empty-repo-") as tmp:
        with ServerProcess(tmp, extra_args, cpus=cpus, start_timeout=start_timeout, label="empty-server") as srv:
            return {"ready_s": srv.ready_s, "rss_bytes": srv.rss_bytes(), "hwm_bytes": srv.hwm_bytes()}
