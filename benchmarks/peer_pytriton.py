"""The PyTriton peer: the same ONNX model served by Triton's C++ gRPC frontend and dynamic batcher.

``ctredge bench --peer pytriton`` compares ctredge's server with PyTriton
(``nvidia-pytriton``): Triton Inference Server's C++ gRPC/HTTP frontends and
dynamic batcher, with a Python callable as the model.  The callable
(``pytriton_app.py`` beside this file) runs the *same* ``model.onnx`` in an
ONNX Runtime CPU session with ctredge's serving settings (1 intra-op thread,
1 inter-op thread, sequential, spinning off), so the two servers differ only
in what surrounds the model.  Both speak the Open Inference Protocol v2 over
gRPC, so one load generator with the same pre-built requests measures both.

What the peer does *not* do: hash raw strings (``cat_raw``) or broadcast a
ranking request's user side over its candidates.  Its inputs are the contract
tensors ``dense`` FP32 [B, n_dense], ``cat`` INT64 [B, n_cat] and ``hist``
INT64 [B, L] (whatever the ONNX model declares), so the benchmark sends it the
hashed, expanded ids: a 1-user x 256-candidate ranking request becomes 256 full
rows.

Its own environment.  nvidia-pytriton 0.7 needs numpy < 2, and ctredge's
environment has numpy 2, so :func:`ensure_venv` builds ``.venv-pytriton`` with
the same interpreter (the base of ``sys.executable``) and :data:`PINS`; a
stamp file holding the pins marks it complete and lets later runs reuse it.

libpython.  PyTriton's Python backend stub (``triton_python_backend_stub``)
embeds Python; the wheel bundles a libpython of another version, and on
interpreters whose own libpython is not on the loader's path (pyenv builds)
the stub loads that one with this interpreter's standard library and the
model fails to start (``'_thread.RLock' object has no attribute
'_recursion_count'``).  :func:`child_env` puts the venv interpreter's
``sysconfig`` ``LIBDIR`` first on ``LD_LIBRARY_PATH``.

Processes.  :class:`PeerServer` starts ``python pytriton_app.py`` (in its own
session, optionally under ``taskset``).  That process holds the ONNX Runtime
sessions and starts ``tritonserver``, which starts one Python backend stub per
model instance, each with two multiprocessing helpers.  :meth:`PeerServer.memory`
sums RSS (and PSS, which counts shared pages once) over that whole tree.

``python -m ctredge.benchmarks.peer_pytriton --model model.onnx`` builds the
venv if needed, starts the peer, checks its answers against a local ONNX
Runtime run, and times sequential batch-1 requests (a smoke measure; the load
generator does the real one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ctredge.errors import CtrEdgeError

log = logging.getLogger("ctredge.benchmarks.peer")

# onnxruntime 1.31 wheels are built against numpy 2 and declare numpy>=1.21.6, so they also run on numpy 1.26
# (checked by ensure_venv's import probe); the pin matches the ONNX Runtime of ctredge's own environment.
PINS: tuple[str, ...] = ("nvidia-pytriton==0.7.0", "numpy<2", "onnxruntime==1.31.1")
DEFAULT_VENV = Path(".venv-pytriton")
STAMP = "ctredge-peer.json"
APP = Path(__file__).with_name("pytriton_app.py")
READY_PREFIX = "pytriton ready"  # pytriton_app.READY_PREFIX (the app is not imported here: it is the child's code)
# What the child must not inherit: another environment's packages (numpy 2) or interpreter home.
SCRUB_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")


class PeerError(CtrEdgeError):
    """The PyTriton peer cannot be installed or started; the message says why (a bench skips the peer with it)."""


# --------------------------------------------------------------------------- the virtual environment


def base_python() -> Path:
    """The interpreter ctredge's environment was made from (``sys._base_executable``; else ``base_prefix``)."""
    exe = getattr(sys, "_base_executable", None)
    if exe and Path(exe).exists():
        return Path(exe)
    v = sys.version_info
    for name in (f"python{v.major}.{v.minor}", f"python{v.major}", "python"):
        cand = Path(sys.base_prefix) / "bin" / name
        if cand.exists():
            return cand
    raise PeerError(f"cannot find the base interpreter of {sys.executable} (sys.base_prefix={sys.base_prefix})")


def venv_python(path: Path) -> Path:
    return Path(path) / "bin" / "python"


def _stamp_wanted(pins: Sequence[str], base: Path) -> dict[str, Any]:
    v = sys.version_info
    return {"pins": list(pins), "base_python": str(base), "python_version": f"{v.major}.{v.minor}.{v.micro}"}


def read_stamp(path: Path) -> dict[str, Any] | None:
    """The stamp of a finished venv at ``path`` (None when absent or unreadable)."""
    try:
        return json.loads((Path(path) / STAMP).read_text())
    except (OSError, ValueError):
        return None


def stamp_matches(stamp: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Whether a venv's stamp was made for the same pins, base interpreter and Python version."""
    return stamp is not None and all(stamp.get(k) == v for k, v in wanted.items())


def _run_logged(cmd: Sequence[str], what: str, *, env: Mapping[str, str] | None = None,
                keep: int = 40) -> None:
    """Run ``cmd``, logging pip's milestone lines; raise :class:`PeerError` with the output's tail on failure."""
    tail: deque[str] = deque(maxlen=keep)
    try:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(env) if env is not None else None)
    except OSError as e:
        raise PeerError(f"{what}: cannot run {cmd[0]}: {e}") from e
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if line.startswith(("Collecting", "Downloading", "Installing", "Successfully", "ERROR")):
            log.info("  %s", line[:160])
    rc = proc.wait()
    if rc != 0:
        text = "\n".join(tail)
        raise PeerError(f"{what} failed (exit {rc}) -- no network, or no wheel for this platform? "
                        f"Command: {' '.join(cmd)}\n{text}")


def ensure_venv(path: Path = DEFAULT_VENV, *, pins: Sequence[str] = PINS, python: Path | None = None) -> Path:
    """The Python executable of the peer's virtual environment, building it when needed.

    ``path`` is reused when its stamp file (``ctredge-peer.json``) holds the same
    pins, base interpreter and Python version.  Otherwise an existing venv there
    (a folder with ``pyvenv.cfg``) is removed, ``python -m venv`` makes a new one
    with ``python`` (default :func:`base_python`, the interpreter of ctredge's own
    environment: the stub needs its version's libpython), ``pip install`` puts
    ``pins`` in, an import probe checks numpy / onnxruntime / pytriton load and
    the stamp (with their versions and the install time) is written last.

    Raises:
        PeerError: ``path`` exists and is not a venv; venv creation, pip (no
            network, no wheel) or the import probe failed (the message has the
            output's tail).
    """
    path = Path(path).absolute()
    base = Path(python) if python is not None else base_python()
    wanted = _stamp_wanted(pins, base)
    exe = venv_python(path)
    if exe.exists() and stamp_matches(read_stamp(path), wanted):
        log.info("peer venv %s is ready (%s)", path, ", ".join(pins))
        return exe
    if path.exists():
        if not (path / "pyvenv.cfg").exists():
            raise PeerError(f"{path} exists and is not a virtual environment (no pyvenv.cfg); "
                            f"remove it or pass another --peer-venv")
        log.info("peer venv %s is stale or unfinished; rebuilding it", path)
        shutil.rmtree(path)
    t0 = time.perf_counter()
    log.info("creating the peer venv %s with %s", path, base)
    env = {k: v for k, v in os.environ.items() if k not in SCRUB_ENV}
    _run_logged([str(base), "-m", "venv", str(path)], f"creating the venv {path}", env=env)
    log.info("installing %s into %s (about 440 MB)", " ".join(pins), path)
    _run_logged([str(exe), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
                 *pins], "pip install of the peer's packages", env=env)
    probe = ("import json, numpy, onnxruntime, importlib.metadata as m; import pytriton.triton; "
             "print(json.dumps({'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__, "
             "'nvidia-pytriton': m.version('nvidia-pytriton')}))")
    res = subprocess.run([str(exe), "-c", probe], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise PeerError(f"the peer venv {path} was installed but does not import numpy/onnxruntime/pytriton:\n"
                        f"{res.stderr[-3000:]}")
    versions = json.loads(res.stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - t0
    stamp = {**wanted, "versions": versions, "install_seconds": round(seconds, 1),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (path / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
    log.info("peer venv ready in %.0f s: %s", seconds, versions)
    return exe


# --------------------------------------------------------------------------- the child's environment


def libdir_from_config(config: Mapping[str, Any]) -> Path | None:
    """The folder holding the interpreter's shared libpython, from its ``sysconfig`` variables.

    Takes ``LIBDIR``, ``INSTSONAME``, ``LDLIBRARY`` and ``Py_ENABLE_SHARED``;
    returns ``LIBDIR`` when the build is shared (``Py_ENABLE_SHARED`` true) and
    names a shared library, else None (a static build: the stub cannot use its
    libpython at all).
    """
    if not config.get("Py_ENABLE_SHARED"):
        return None
    libdir = config.get("LIBDIR")
    names = [n for n in (config.get("INSTSONAME"), config.get("LDLIBRARY")) if n]
    if not libdir or not any(".so" in n for n in names):
        return None
    return Path(libdir)


def python_libdir(python: Path) -> Path | None:
    """:func:`libdir_from_config` of ``python``'s ``sysconfig``, read by running it.

    Returns None (and logs a warning) for a static build or when the library is
    not in that folder.
    """
    code = ("import json, sysconfig; print(json.dumps({k: sysconfig.get_config_var(k) for k in "
            "('LIBDIR', 'INSTSONAME', 'LDLIBRARY', 'Py_ENABLE_SHARED')}))")
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise PeerError(f"cannot run {python} to read its sysconfig: {res.stderr.strip()[-500:]}")
    config = json.loads(res.stdout)
    libdir = libdir_from_config(config)
    if libdir is None:
        log.warning("%s has no shared libpython (sysconfig %s); PyTriton's stub may load its bundled one and "
                    "fail", python, config)
        return None
    if not any((libdir / n).exists() for n in (config.get("INSTSONAME"), config.get("LDLIBRARY")) if n):
        log.warning("%s: libpython not found in LIBDIR %s", python, libdir)
        return None
    return libdir


def child_env(base: Mapping[str, str], libdir: Path | None, tmpdir: Path | None = None) -> dict[str, str]:
    """The peer's environment: ``base`` without :data:`SCRUB_ENV`, ``libdir`` first on ``LD_LIBRARY_PATH``.

    ``libdir`` is not repeated when already there; ``tmpdir`` becomes ``TMPDIR``
    (so the peer's temporary files go where :class:`PeerServer` removes them).
    """
    env = {k: v for k, v in base.items() if k not in SCRUB_ENV}
    if libdir is not None:
        parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != str(libdir)]
        env["LD_LIBRARY_PATH"] = ":".join([str(libdir), *parts])
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS says are free now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cpu_list(cpus: Iterable[int] | str | None) -> str | None:
    """``taskset -c`` syntax for ``cpus`` (``[0, 1]`` -> ``"0,1"``; a string passes through; None -> None)."""
    if cpus is None:
        return None
    if isinstance(cpus, str):
        return cpus.strip() or None
    ids = [int(c) for c in cpus]
    return ",".join(str(c) for c in ids) if ids else None


# --------------------------------------------------------------------------- process tree memory (/proc)


def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ..."; comm may hold spaces and parentheses
        fields = stat.rsplit(")", 1)[1].split()
        out[int(entry.name)] = int(fields[1])
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants alive now (from ``/proc/*/stat``), root first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    if not Path(f"/proc/{root}").exists():
        return []
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _status_kb(pid: int, key: str, file: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory(root: int) -> dict[str, int]:
    """``{"rss_bytes", "pss_bytes", "processes"}`` summed over :func:`process_tree` of ``root``.

    RSS counts a page shared by two processes twice; PSS (``/proc/PID/smaps_rollup``)
    splits it between them, so PSS is the fairer total.  Processes that end
    while being read count as 0.
    """
    pids = process_tree(root)
    return {"rss_bytes": sum(_status_kb(p, "VmRSS") for p in pids) * 1024,
            "pss_bytes": sum(_status_kb(p, "Pss", "smaps_rollup") for p in pids) * 1024,
            "processes": len(pids)}


# --------------------------------------------------------------------------- the server


class PeerServer:
    """The PyTriton peer serving one ONNX model, as a context manager.

    ``with PeerServer("model.onnx") as peer: ... peer.url, peer.model_name``

    ``start()`` makes (or reuses) the venv unless ``python`` is given, picks
    free gRPC/HTTP/metrics ports, starts ``pytriton_app.py`` with the venv's
    Python in a new session (under ``taskset -c CPUS`` when ``cpus`` is given and
    taskset exists; every child inherits the pinning), waits for its ready line
    and then for ``ServerReady`` and ``ModelReady`` over gRPC.  ``ready_s`` is the
    time from process start to ``ModelReady``.  Everything the peer writes (its
    log, PyTriton's workspace with its copy of tritonserver, temporary files)
    lives in one temporary folder that ``stop()`` removes.

    Raises (from ``start``):
        PeerError: the venv cannot be made, the process exits, or it is not
            ready within ``start_timeout_s``; the message has the log's tail.
    """

    def __init__(self, model: str | os.PathLike[str], *, python: str | os.PathLike[str] | None = None,
                 venv: str | os.PathLike[str] = DEFAULT_VENV, model_name: str = "ctr",
                 max_batch_size: int = 4096, queue_delay_us: int = 500, batching: bool = True,
                 instances: int = 1, intra_op_threads: int = 1, cpus: Iterable[int] | str | None = None,
                 host: str = "127.0.0.1", start_timeout_s: float = 180.0):
        self.model = Path(model).absolute()
        if not self.model.is_file():
            raise PeerError(f"model file {self.model} does not exist")
        self.python = Path(python) if python is not None else None
        self.venv = Path(venv)
        self.model_name = model_name
        self.max_batch_size = int(max_batch_size)
        self.queue_delay_us = int(queue_delay_us)
        self.batching = bool(batching)
        self.instances = int(instances)
        self.intra_op_threads = int(intra_op_threads)
        self.cpus = cpu_list(cpus)
        self.host = host
        self.start_timeout_s = float(start_timeout_s)
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = self.http_port = self.metrics_port = 0
        self.ready_s: float | None = None
        self.pinned: str | None = None
        self.libdir: Path | None = None
        self._dir: Path | None = None
        self._log_file: Any = None

    # -- properties
    @property
    def url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._dir / "peer.log" if self._dir is not None else None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the peer's stdout + stderr."""
        path = self.log_path
        if path is None or not path.exists():
            return "(no log)"
        text = path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def settings(self) -> dict[str, Any]:
        """What a report records about this peer: versions, pins, batching, threads, pinning, libpython."""
        stamp = read_stamp(self.python.parent.parent) if self.python is not None else None
        return {"server": "pytriton", "model": str(self.model), "model_name": self.model_name,
                "versions": (stamp or {}).get("versions"), "pins": list(PINS),
                "max_batch_size": self.max_batch_size, "dynamic_batching": self.batching,
                "queue_delay_us": self.queue_delay_us, "instances": self.instances,
                "intra_op_threads": self.intra_op_threads, "allow_spinning": False,
                "cpus": self.pinned, "ld_library_path": str(self.libdir) if self.libdir else None,
                "ready_s": self.ready_s}

    # -- lifecycle
    def command(self) -> list[str]:
        """The child's command line (without taskset)."""
        assert self.python is not None
        cmd = [str(self.python), str(APP), "--model", str(self.model), "--name", self.model_name,
               "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
               "--metrics-port", str(self.metrics_port), "--address", self.host,
               "--max-batch-size", str(self.max_batch_size), "--queue-delay-us", str(self.queue_delay_us),
               "--instances", str(self.instances), "--intra-op-threads", str(self.intra_op_threads)]
        if not self.batching:
            cmd.append("--no-batching")
        if self._dir is not None:
            cmd += ["--workspace", str(self._dir / "workspace")]
        return cmd

    def start(self) -> "PeerServer":
        if self.proc is not None:
            raise PeerError("the peer is already started")
        if self.python is None:
            self.python = ensure_venv(self.venv)
        self.libdir = python_libdir(self.python)
        self._dir = Path(tempfile.mkdtemp(prefix="ctredge-pytriton-"))
        (self._dir / "tmp").mkdir()
        self.grpc_port, self.http_port, self.metrics_port = free_ports(3, self.host)
        cmd = self.command()
        if self.cpus is not None:
            if shutil.which("taskset"):
                cmd = ["taskset", "-c", self.cpus, *cmd]
                self.pinned = self.cpus
            else:
                log.warning("taskset not found: the peer runs unpinned (wanted cpus %s)", self.cpus)
        env = child_env(os.environ, self.libdir, self._dir / "tmp")
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 -- closed in stop()
        log.info("starting the PyTriton peer on %s (model %s%s)", self.url, self.model,
                 f", cpus {self.pinned}" if self.pinned else "")
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                         cwd=self._dir, start_new_session=True)
        except OSError as e:
            self._log_file.close()
            self._log_file = None
            self._cleanup_dir()
            raise PeerError(f"cannot start the PyTriton peer ({cmd[0]}): {e}") from e
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        log.info("PyTriton peer ready on %s in %.1f s", self.url, self.ready_s)
        return self

    def _fail(self, why: str) -> PeerError:
        tail = self.log_tail()
        hint = ""
        if "_recursion_count" in tail or "libpython" in tail:
            hint = (f"\n(the Python backend stub loaded another libpython: LD_LIBRARY_PATH was "
                    f"{self.libdir or 'not set'}; it needs the folder of {self.python}'s shared libpython)")
        return PeerError(f"the PyTriton peer {why}; last lines of its log:\n{tail}{hint}")

    def _wait_ready(self, t0: float) -> None:
        from ctredge.serve.client import Client, RemoteError

        deadline = t0 + self.start_timeout_s
        saw_line = False
        assert self.proc is not None
        with Client(self.url, timeout=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise self._fail(f"exited with code {self.proc.returncode} before it was ready")
                if time.perf_counter() > deadline:
                    raise self._fail(f"was not ready within {self.start_timeout_s:.0f} s")
                if not saw_line:
                    saw_line = READY_PREFIX in self.log_tail(200)
                if saw_line:
                    try:
                        if client.ready() and client.model_ready(self.model_name):
                            return
                    except RemoteError:
                        pass
                time.sleep(0.1)

    def memory(self) -> dict[str, int]:
        """:func:`tree_memory` of the peer (its Python, tritonserver, stubs and their helpers)."""
        if self.proc is None or self.proc.poll() is not None:
            raise PeerError("the peer is not running")
        return tree_memory(self.proc.pid)

    def rss_bytes(self) -> int:
        """Resident set size summed over the peer's process tree (see :meth:`memory` for PSS)."""
        return self.memory()["rss_bytes"]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the app (PyTriton then stops Triton and removes its workspace), SIGKILL the session after
        ``timeout_s``, and remove the temporary folder.  Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("the PyTriton peer did not stop within %.0f s; killing it", timeout_s)
            try:  # whatever is left in the peer's own session (tritonserver, stubs)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "PeerServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --------------------------------------------------------------------------- smoke measure


def model_feeds(model: Path, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for ``model``: its FeatureSpec's (``random_feeds``) when it has one, else from its inputs."""
    from ctredge.export.validate import cpu_session, random_feeds
    from ctredge.features import METADATA_KEY, FeatureSpec

    sess = cpu_session(str(model))
    meta = sess.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise PeerError(f"{model} has no ctredge FeatureSpec in its metadata ({METADATA_KEY})")
    return random_feeds(FeatureSpec.from_json(meta[METADATA_KEY]), batch, seed=seed)


def sequential_latency(url: str, model_name: str, feeds: Mapping[str, np.ndarray], *, requests: int = 300,
                       warmup: int = 20) -> dict[str, Any]:
    """Time ``requests`` sequential ModelInfer calls of one pre-built request (one in flight, one channel).

    Returns ``{"requests", "p50_ms", "p99_ms", "mean_ms", "first_ms"}``; ``first_ms`` is
    the first call (before warm-up).  A smoke measure: closed loop, concurrency 1.
    """
    from ctredge.serve import codec
    from ctredge.serve.client import Client

    request = codec.build_request(model_name, feeds, outputs=["ctr"])
    times = []
    with Client(url, timeout=30.0) as client:
        t = time.perf_counter()
        client.infer_request(request)
        first = time.perf_counter() - t
        for _ in range(warmup):
            client.infer_request(request)
        for _ in range(requests):
            t = time.perf_counter()
            client.infer_request(request)
            times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {"requests": requests, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "first_ms": first * 1e3}


def smoke(model: Path, *, venv: Path = DEFAULT_VENV, requests: int = 300, cpus: str | None = None,
          check_rows: int = 64, **server_options: Any) -> dict[str, Any]:
    """Build/reuse the venv, start the peer on ``model``, compare it with local ONNX Runtime on ``check_rows``
    rows, time sequential batch-1 requests, read its memory; returns every figure with the settings.

    ``server_options`` go to :class:`PeerServer` (``queue_delay_us``, ``batching``, ``instances`` ...)."""
    from ctredge.export.validate import cpu_session
    from ctredge.serve.client import Client

    t0 = time.perf_counter()
    python = ensure_venv(venv)
    venv_s = time.perf_counter() - t0
    check = model_feeds(model, check_rows, seed=1)
    expected = cpu_session(str(model)).run(["ctr"], check)[0]
    one = {k: v[:1] for k, v in model_feeds(model, 1, seed=2).items()}
    with PeerServer(model, python=python, cpus=cpus, **server_options) as peer:
        t = time.perf_counter()
        with Client(peer.url, timeout=30.0) as client:
            got = client.infer(peer.model_name, check, outputs=["ctr"])["ctr"]
        first_s = time.perf_counter() - t
        lat = sequential_latency(peer.url, peer.model_name, one, requests=requests)
        mem = peer.memory()
        out = {"settings": peer.settings(), "venv_seconds": round(venv_s, 1),
               "cold_start_s": (peer.ready_s or 0.0) + first_s,  # process start -> first answered request
               "max_abs_diff_vs_ort": float(np.abs(got - expected).max()), "batch1": lat, **mem}
    return out


def ctredge_latency(model: Path, feeds: Mapping[str, np.ndarray], *, requests: int = 300,
                    timeout_s: float = 120.0) -> dict[str, Any]:
    """:func:`sequential_latency` of ctredge's own server on the same model and request, for context.

    ``model`` must sit in a repository (``REPO/<name>/<version>/model.onnx``); ``ctredge serve
    --repository REPO --port 0`` runs as a subprocess (its repository's ``config.json`` settings apply).
    """
    repo, name = model.parents[2], model.parents[1].name
    cmd = [sys.executable, "-c", "import sys; from ctredge.cli import main; sys.exit(main(sys.argv[1:]))",
           "serve", "--repository", str(repo), "--port", "0", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        deadline, url, seen = time.perf_counter() + timeout_s, None, deque(maxlen=20)
        for line in proc.stdout:
            seen.append(line.rstrip())
            if line.startswith("serving ") and " on " in line:
                url = line.rsplit(" on ", 1)[1].strip()
                break
            if time.perf_counter() > deadline:
                break
        if url is None:
            raise PeerError("ctredge serve did not print its ready line:\n" + "\n".join(seen))
        return {"server": "ctredge", "model_name": name, **sequential_latency(url, name, feeds, requests=requests)}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Start the PyTriton peer on a model, check it, time batch-1 requests.")
    p.add_argument("--model", required=True, type=Path, help="model.onnx (a ctredge model)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"peer venv (default {DEFAULT_VENV})")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--cpus", default=None, help="taskset cpu list for the peer, e.g. 1")
    p.add_argument("--queue-delay-us", type=int, default=500, help="Triton's max_queue_delay_microseconds")
    p.add_argument("--no-batching", action="store_true", help="turn Triton's dynamic batcher off")
    p.add_argument("--ctredge", action="store_true",
                   help="also time ctredge's own server (ctredge serve on the model's repository), same request")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        res = smoke(args.model, venv=args.venv, requests=args.requests, cpus=args.cpus,
                    queue_delay_us=args.queue_delay_us, batching=not args.no_batching)
        if args.ctredge:
            one = {k: v[:1] for k, v in model_feeds(args.model, 1, seed=2).items()}
            res["ctredge_batch1"] = ctredge_latency(args.model.absolute(), one, requests=args.requests)
    except PeerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
