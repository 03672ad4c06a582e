"""Triton's ``perf_analyzer`` as the yardstick: the same C++ load generator against ctredge and PyTriton.

``python -m ctredge.benchmarks.perf_analyzer --repository REPO --model ctr-fp32 --data CLICKS.tsv --out DIR
[--peer pytriton]``

What it does:

1. Finds the binary (:func:`find_perf_analyzer`): ``--perf-analyzer``, ``$CTREDGE_PERF_ANALYZER``,
   ``.venv-perf/bin/perf_analyzer`` (``make perf-tools``) or ``PATH``.  perf_analyzer ships only in
   the ``tritonclient==2.41.*`` manylinux wheel (later wheels dropped it; the ``perf-analyzer`` name
   on PyPI is an empty placeholder); it needs ``libb64.so.0d`` (Debian's ``libb64-0d``) and
   ``libcudart.so.12`` (the ``nvidia-cuda-runtime-cu12`` wheel, put on ``LD_LIBRARY_PATH`` here).
   Missing or not runnable: :class:`PerfAnalyzerMissing` with :data:`NOT_INSTALLED` first; ``ctredge
   bench`` then skips its table with that reason and goes on.
2. Writes ``--input-data`` JSON from real rows (:func:`input_data`): the ONNX contract tensors
   ``dense`` / ``cat`` / ``hist`` of ids hashed with the model's FeatureSpec, so every id is in range,
   one row per entry, binary content in base64 (``dense`` keeps its NaNs).  Without input data
   perf_analyzer sends random ids (out of range) and every optional input as well (``cat_raw``, the
   per-side tensors), which ctredge refuses when sent together with the whole-row inputs.
3. Serves the model (and the no-op ``floor`` with the same ``config.json``) with one ``ctredge serve``
   process, and the same ``model.onnx`` with the PyTriton peer (:mod:`.peer_pytriton`) when asked, both
   pinned to the server cores of :func:`ctredge.benchmarks.procs.cpu_plan`; perf_analyzer runs on the
   client cores (``taskset``).
4. Measures each cell in alternating rounds (ctredge model, floor, PyTriton, then again), so drifting
   background load hits them alike.  Cells: 1-row requests at each ``--concurrency`` (default 1, 16, 64,
   256) and 1-user x ``--ranking-rows`` (256) ranking requests at concurrency 1 and 16.

Ranking requests.  perf_analyzer gives every input of a batching model (``max_batch_size`` > 0, which
ctredge's models report) the same batch size ``-b``, so it cannot send ctredge's broadcast form (user
side with 1 row, ``*_item`` with N).  Both servers get the expanded form: ``-b 256`` requests whose 256
rows repeat one user's columns and history over 256 candidate items (the JSON holds blocks of 256 such
rows; perf_analyzer builds a request from ``-b`` consecutive entries starting at a multiple of ``-b``, so
each request is one block).  ``ctredge bench``'s own load
generator measures the broadcast form.

Figures per run, from perf_analyzer's CSV (``-f``, parsed by :func:`parse_csv`): throughput (its
"Inferences/Second" counts rows, so requests/s = rows/s / ``-b``), p50 / p90 / p95 / p99 latency, and
perf_analyzer's own CPU time from ``os.wait4`` (user + system of the whole run, over its wall time:
cores used; ``client_saturated`` when that reaches 0.9 of the client cores).  A cell over several
rounds: throughput averaged, percentiles the median of the rounds.

perf_analyzer and ctredge.  perf_analyzer 2.41 puts the request parameter
``triton_enable_empty_final_response`` in every ModelInfer request, and ctredge serve refuses every
request parameter (``serve/codec.py`` ``check_parameters``: UNIMPLEMENTED).  Until the server ignores
that one, :func:`server_refuses_pa_parameter` notices it and the benchmark's server process alone is
started with :data:`SHIM` (a ``sitecustomize`` that drops that parameter before the check); the report
says so (``shim``).  Nothing else about the server changes.
"""

from __future__ import annotations

import argparse
import base64
import csv
import glob
import io
import json
import logging
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ctredge.errors import CtrEdgeError

log = logging.getLogger("ctredge.benchmarks.perf_analyzer")

PERF_VENV = Path(".venv-perf")
BINARY_ENV = "CTREDGE_PERF_ANALYZER"
NOT_INSTALLED = "perf_analyzer not installed: run make perf-tools"
PA_PARAMETER = "triton_enable_empty_final_response"
FLOOR = "floor"
PEER_MODEL = "ctr"  # the PyTriton peer's model name (PeerServer's default)
PEER_TOKEN_HEADER = "triton-grpc-protocol-"  # the prefix of Triton's restricted-protocol headers
CONCURRENCY = (1, 16, 64, 256)
RANKING_CONCURRENCY = (1, 16)
RANKING_BLOCKS = 4  # users in the ranking input file (x 256 entries: perf_analyzer reads big files slowly)
SATURATED = 0.9
MEASURE_MARK = "Request concurrency:"  # perf_analyzer's log line when it starts measuring
# perf_analyzer's CSV columns (latencies in microseconds) -> our keys (milliseconds)
LATENCY_COLUMNS = {"p50 latency": "p50_ms", "p90 latency": "p90_ms", "p95 latency": "p95_ms",
                   "p99 latency": "p99_ms"}
SHIM = f'''"""Written by ctredge.benchmarks.perf_analyzer: drop perf_analyzer's {PA_PARAMETER!r} request parameter
before ctredge serve's parameter check (which refuses every parameter).  Loaded only by the benchmark's
server process (PYTHONPATH), only when that check refuses it."""
try:
    import ctredge.serve.codec as _codec

    _check = _codec.check_parameters

    def check_parameters(request):
        if {PA_PARAMETER!r} in request.parameters:
            del request.parameters[{PA_PARAMETER!r}]
        _check(request)

    _codec.check_parameters = check_parameters
except ImportError:
    pass
'''


class PerfAnalyzerError(CtrEdgeError):
    """perf_analyzer could not measure a cell (bad arguments, input data, a failed run)."""


class PerfAnalyzerMissing(PerfAnalyzerError):
    """No runnable perf_analyzer; the message starts with :data:`NOT_INSTALLED`."""


# ============================================================================ the binary
@dataclass(frozen=True)
class PerfAnalyzer:
    """A perf_analyzer binary that runs, with the environment it needs."""

    binary: str
    env: dict[str, str] = field(repr=False)
    version: str = ""
    lib_dirs: tuple[str, ...] = ()

    def info(self) -> dict[str, Any]:
        return {"binary": self.binary, "version": self.version, "ld_library_path": list(self.lib_dirs)}


def cuda_runtime_dirs(prefix: str | os.PathLike[str]) -> list[str]:
    """Folders holding ``libcudart.so.12`` under a venv ``prefix`` (the ``nvidia-cuda-runtime-cu12`` wheel)."""
    pattern = os.path.join(str(prefix), "lib", "python*", "site-packages", "nvidia", "cuda_runtime", "lib")
    return sorted(d for d in glob.glob(pattern) if glob.glob(os.path.join(d, "libcudart.so.12*")))


def _candidates(binary: str | None, venv: Path) -> list[tuple[str, str]]:
    out = []
    if binary:
        out.append((binary, "--perf-analyzer"))
    if os.environ.get(BINARY_ENV):
        out.append((os.environ[BINARY_ENV], f"${BINARY_ENV}"))
    out.append((str(venv / "bin" / "perf_analyzer"), f"{venv} (make perf-tools)"))
    found = shutil.which("perf_analyzer")
    if found:
        out.append((found, "PATH"))
    return out


def find_perf_analyzer(binary: str | None = None, *, venv: str | os.PathLike[str] = PERF_VENV,
                       timeout_s: float = 30.0) -> PerfAnalyzer:
    """The first perf_analyzer that prints its version, with ``libcudart.so.12`` on ``LD_LIBRARY_PATH``.

    Looks at ``binary``, ``$CTREDGE_PERF_ANALYZER``, ``venv/bin/perf_analyzer``, then ``PATH``.  The
    CUDA runtime folder comes from the venv beside the binary (``<venv>/bin/perf_analyzer``) or ``venv``.

    Raises:
        PerfAnalyzerMissing: none found, or the one found does not run (a missing ``libb64.so.0d`` or
            ``libcudart.so.12``: the message names it and how to install it).
    """
    venv = Path(venv)
    tried = []
    for path, where in _candidates(binary, venv):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            tried.append(f"{path} ({where}): not found")
            continue
        prefix = Path(path).resolve().parent.parent
        libs = cuda_runtime_dirs(prefix) or cuda_runtime_dirs(venv)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join([*libs, *[p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]])
        try:
            res = subprocess.run([path, "--version"], capture_output=True, text=True, env=env, timeout=timeout_s)
        except (OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{path} ({where}): cannot run it: {exc}")
            continue
        text = (res.stdout + res.stderr).strip()
        if res.returncode != 0 or "Perf Analyzer Version" not in text:
            hint = ""
            if "libb64" in text:
                hint = " (needs libb64.so.0d: apt-get install libb64-0d)"
            elif "libcudart" in text:
                hint = " (needs libcudart.so.12: pip install nvidia-cuda-runtime-cu12 into its venv)"
            tried.append(f"{path} ({where}): exit {res.returncode}: {text[-300:]}{hint}")
            continue
        version = text.splitlines()[0].replace("Perf Analyzer Version", "").strip()
        return PerfAnalyzer(binary=path, env=env, version=version, lib_dirs=tuple(libs))
    raise PerfAnalyzerMissing(f"{NOT_INSTALLED} ({'; '.join(tried)})")


# ============================================================================ input data
def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()).decode("ascii")


def _entries(tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """One perf_analyzer data entry per row of ``tensors`` (all with the same rows)."""
    n = {int(v.shape[0]) for v in tensors.values()}
    if len(n) != 1:
        raise PerfAnalyzerError(f"tensors with different row counts: { {k: v.shape for k, v in tensors.items()} }")
    out = []
    for i in range(n.pop()):
        out.append({name: {"content": {"b64": _b64(arr[i])}, "shape": [int(d) for d in arr.shape[1:]]}
                    for name, arr in tensors.items()})
    return out


def input_data(spec: Any, data_path: str | os.PathLike[str], kind: str, *, rows: int = 256,
               count: int = 64) -> dict[str, Any]:
    """perf_analyzer ``--input-data`` JSON (as a dict) from the first rows of a click log.

    ``kind``: ``row``: ``count`` entries, data row ``i`` in entry ``i`` (send with ``-b 1``);
    ``ranking``: ``count`` blocks of ``rows`` entries, block ``i`` being data row ``i``'s user and
    context columns and history over the item columns of ``rows`` other rows (send with ``-b rows``:
    perf_analyzer starts each request at a multiple of ``-b`` entries, so a request is one block).  Tensors are the hashed contract ids ``dense`` FP32, ``cat`` INT64, ``hist`` INT64.

    Raises:
        PerfAnalyzerError: an unknown kind, or rows/count < 1.
    """
    from ctredge.benchmarks.load import _inputs, _ranking_rows, _read_rows

    if kind not in ("row", "ranking"):
        raise PerfAnalyzerError(f"kind must be row or ranking, got {kind!r}")
    if rows < 1 or count < 1:
        raise PerfAnalyzerError(f"rows and count must be >= 1, got rows={rows}, count={count}")
    if kind == "row":
        data = _read_rows(data_path, spec, count)
        idx = np.arange(count) % len(data)
        return {"data": _entries(_inputs(spec, data.take(idx), "ids"))}
    data = _read_rows(data_path, spec, count * rows + count)
    n = len(data)
    entries: list[dict[str, Any]] = []
    for i in range(count):
        user = data.take(np.array([i % n]))
        items = data.take((count + np.arange(i * rows, (i + 1) * rows)) % n)
        entries.extend(_entries(_inputs(spec, _ranking_rows(spec, user, items), "ids")))
    return {"data": entries}


def decode_input_data(doc: Mapping[str, Any], spec: Any) -> list[dict[str, np.ndarray]]:
    """The entries of an :func:`input_data` document as arrays of one row each (``[1, ...]``).

    Raises:
        PerfAnalyzerError: an entry lacks a contract input, names another, or its bytes do not fit its shape.
    """
    sig = spec.input_signature()
    out = []
    for i, entry in enumerate(doc.get("data") or []):
        if set(entry) != set(sig):
            raise PerfAnalyzerError(f"entry {i}: inputs {sorted(entry)}, expected {sorted(sig)}")
        row = {}
        for name, (dtype, shape) in sig.items():
            t = entry[name]
            raw = base64.b64decode(t["content"]["b64"])
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
            want = [int(d) for d in shape[1:]]
            if list(t.get("shape", [])) != want or arr.size != math.prod(want):
                raise PerfAnalyzerError(f"entry {i} input {name}: shape {t.get('shape')} with {arr.size} "
                                        f"values, expected {want}")
            row[name] = arr.reshape([1, *want])
        out.append(row)
    if not out:
        raise PerfAnalyzerError("input data has no entries")
    return out


def requests_of(doc: Mapping[str, Any], spec: Any, batch: int) -> list[dict[str, np.ndarray]]:
    """The requests perf_analyzer builds from ``doc`` with ``-b batch``: ``batch`` consecutive entries each,
    from entry 0, batch, 2 x batch ... (its ``step = request x batch mod entries``)."""
    rows = decode_input_data(doc, spec)
    out = []
    for start in range(0, len(rows) - batch + 1, batch):
        block = rows[start:start + batch]
        out.append({k: np.concatenate([r[k] for r in block]) for k in block[0]})
    return out


def check_input_data(doc: Mapping[str, Any], spec: Any, batch: int = 1, *, max_batch_size: int = 4096) -> int:
    """Check every request of ``doc`` (at ``-b batch``) the way ``ctredge serve`` checks it (dtypes, shapes,
    id ranges: :class:`ctredge.serve.signature.CtrSignature`); returns the number of requests checked.

    Raises:
        PerfAnalyzerError: a malformed entry, or a request the server would refuse (its message).
    """
    from ctredge.serve.errors import InvalidInput
    from ctredge.serve.signature import CtrSignature

    sig = CtrSignature(spec, max_batch_size)
    reqs = requests_of(doc, spec, batch)
    if not reqs:
        raise PerfAnalyzerError(f"input data has {len(doc.get('data') or [])} entries, fewer than -b {batch}")
    for i, tensors in enumerate(reqs):
        try:
            sig.prepare(tensors)
        except InvalidInput as exc:
            raise PerfAnalyzerError(f"request {i} (-b {batch}) would be refused: {exc}") from None
    return len(reqs)


def write_input_data(doc: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return path


# ============================================================================ one run
def parse_csv(text: str) -> dict[str, Any]:
    """perf_analyzer's ``-f`` CSV: the first measured row as ``{"concurrency", "infer_per_s", "p50_ms", ...}``.

    Latency columns (``p50 latency`` ...) are microseconds in the file and milliseconds here; every other
    column is kept too, as a float, under its own name in ``columns``.

    Raises:
        PerfAnalyzerError: no header with ``Inferences/Second``, or no data row.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if "Inferences/Second" in ln), None)
    if start is None:
        raise PerfAnalyzerError(f"not a perf_analyzer CSV (no 'Inferences/Second' column): {text[:200]!r}")
    reader = csv.DictReader(io.StringIO("\n".join(lines[start:])))
    rows = [r for r in reader if any((v or "").strip() for v in r.values())]
    if not rows:
        raise PerfAnalyzerError("perf_analyzer's CSV has a header and no measurement")
    columns: dict[str, float] = {}
    for k, v in rows[0].items():
        if k is None:
            continue
        try:
            columns[k.strip()] = float(v)
        except (TypeError, ValueError):
            pass
    out: dict[str, Any] = {"columns": columns, "concurrency": columns.get("Concurrency"),
                           "infer_per_s": columns.get("Inferences/Second")}
    for col, key in LATENCY_COLUMNS.items():
        out[key] = columns[col] / 1000.0 if col in columns else None
    return out


def pa_command(tool: PerfAnalyzer, *, url: str, model: str, input_file: str | os.PathLike[str], concurrency: int,
               csv_path: str | os.PathLike[str], batch: int = 1, protocol: str = "grpc",
               measurement_ms: int = 2000, stability: int = 500, max_trials: int = 8,
               cpus: Sequence[int] | None = None, headers: Mapping[str, str] | None = None) -> list[str]:
    """The perf_analyzer command line of one cell (``--async``, one concurrency, time windows); ``headers``
    go with ``-H name:value`` (gRPC metadata)."""
    cmd = [tool.binary, "-m", model, "-u", url, "-i", protocol, "--async", "--input-data", str(input_file),
           "-b", str(int(batch)), "--concurrency-range", f"{int(concurrency)}:{int(concurrency)}",
           "--measurement-interval", str(int(measurement_ms)), "-s", str(int(stability)),
           "-r", str(int(max_trials)), "-f", str(csv_path)]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}:{v}"]
    if cpus and shutil.which("taskset"):
        cmd = [shutil.which("taskset") or "taskset", "-c", ",".join(str(int(c)) for c in cpus), *cmd]
    return cmd


def run_perf_analyzer(tool: PerfAnalyzer, *, url: str, model: str, input_file: str | os.PathLike[str],
                      concurrency: int, work_dir: str | os.PathLike[str], batch: int = 1, protocol: str = "grpc",
                      measurement_ms: int = 2000, stability: int = 500, max_trials: int = 8,
                      cpus: Sequence[int] | None = None, timeout_s: float = 300.0,
                      label: str = "pa", headers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run perf_analyzer once and return its figures with its own CPU use.

    Returns ``{"ok", "error", "infer_per_s", "rows_per_s", "req_per_s", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
    "client_cpu_s", "client_cores_used", "client_cpus", "client_saturated", "wall_s", "measure_wall_s",
    "measure_cpu_s", "startup_s", "command", "log"}``; ``client_cores_used`` is perf_analyzer's CPU over wall
    time while it measured (from its first "Request concurrency" line to its exit; the whole run's when
    that line never came), ``client_cpu_s`` the whole run's CPU (reading the input data included);
    a failed run has ``ok`` false, ``error`` (the tail of its output) and no figures.
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    csv_path = work / f"{label}.csv"
    log_path = work / f"{label}.log"
    csv_path.unlink(missing_ok=True)
    cmd = pa_command(tool, url=url, model=model, input_file=input_file, concurrency=concurrency, csv_path=csv_path,
                     batch=batch, protocol=protocol, measurement_ms=measurement_ms, stability=stability,
                     max_trials=max_trials, cpus=cpus, headers=headers)
    shown_cmd = [a.split(":", 1)[0] + ":<token>" if i and cmd[i - 1] == "-H" and a.startswith(PEER_TOKEN_HEADER)
                 else a for i, a in enumerate(cmd)]  # no token in reports
    base = {"command": " ".join(shown_cmd), "log": str(log_path), "concurrency": int(concurrency), "batch": int(batch),
            "protocol": protocol, "client_cpus": list(cpus) if cpus else None,
            "load_1m": os.getloadavg()[0]}
    t0 = time.perf_counter()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=tool.env)
        status, usage, mark = _wait4(proc, timeout_s, log_path)
    t_end = time.perf_counter()
    wall = t_end - t0
    cpu_s = usage.ru_utime + usage.ru_stime if usage is not None else None
    text = log_path.read_text(errors="replace")
    # cores used while measuring: from the first "Request concurrency" line (after reading the input data,
    # which takes long for big files) to the exit; the whole run's when that line was not seen
    cores = (cpu_s / wall) if cpu_s is not None and wall > 0 else None
    measure_wall = measure_cpu = None
    if mark is not None and cpu_s is not None and t_end - mark[0] > 0:
        measure_wall, measure_cpu = t_end - mark[0], max(0.0, cpu_s - mark[1])
        cores = measure_cpu / measure_wall
    base.update({"wall_s": wall, "client_cpu_s": cpu_s, "client_cores_used": cores,
                 "measure_wall_s": measure_wall, "measure_cpu_s": measure_cpu,
                 "startup_s": (mark[0] - t0) if mark is not None else None, "returncode": status})
    ncpu = len(cpus) if cpus else (os.cpu_count() or 1)
    base["client_saturated"] = bool(base["client_cores_used"] is not None
                                    and base["client_cores_used"] >= SATURATED * ncpu)
    if status != 0 or not csv_path.is_file():
        why = "timed out" if status is None else f"exit {status}"
        tail = "\n".join(text.strip().splitlines()[-6:])
        return {**base, "ok": False, "error": f"perf_analyzer {why}: {tail}"}
    try:
        parsed = parse_csv(csv_path.read_text())
    except PerfAnalyzerError as exc:
        return {**base, "ok": False, "error": str(exc)}
    rows_s = parsed["infer_per_s"]
    parsed.pop("concurrency", None)
    return {**base, **parsed, "ok": True, "error": "", "rows_per_s": rows_s,
            "req_per_s": rows_s / batch if rows_s is not None else None}


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (``/proc/PID/stat``), None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _wait4(proc: subprocess.Popen, timeout_s: float,
           log_path: Path | None = None) -> tuple[int | None, Any, tuple[float, float] | None]:
    """Wait for ``proc`` with ``os.wait4`` (its own rusage); kill it after ``timeout_s``.

    Returns (exit status or None when killed, rusage, mark): ``mark`` is (perf_counter, CPU seconds) when
    :data:`MEASURE_MARK` first appeared in ``log_path``, None if it never did.
    """
    deadline = time.monotonic() + timeout_s
    mark = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code  # reaped here: keep Popen from waiting again
            return code, usage, mark
        if mark is None and log_path is not None:
            try:
                seen = MEASURE_MARK in log_path.read_text(errors="replace")
            except OSError:
                seen = False
            cpu = _proc_cpu_s(proc.pid) if seen else None
            if cpu is not None:
                mark = (time.perf_counter(), cpu)
        if time.monotonic() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, usage, mark
        time.sleep(0.02)


# ============================================================================ cells
def combine(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One cell from its rounds: throughput and CPU averaged, percentiles the median; failed rounds listed."""
    ok = [r for r in runs if r.get("ok")]
    out: dict[str, Any] = {"rounds": len(runs), "ok_rounds": len(ok),
                           "errors": [r.get("error") for r in runs if not r.get("ok")]}
    if not ok:
        return {**out, "ok": False}
    for key in ("rows_per_s", "req_per_s", "client_cores_used"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        out[key] = statistics.fmean(vals) if vals else None
    for key in LATENCY_COLUMNS.values():
        vals = [r[key] for r in ok if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    out["client_saturated"] = any(r.get("client_saturated") for r in ok)
    out["per_round"] = [{k: r.get(k) for k in ("rows_per_s", "p50_ms", "p99_ms", "client_cores_used", "load_1m")}
                        for r in ok]
    out["command"] = ok[-1].get("command")
    return {**out, "ok": True}


def server_refuses_pa_parameter() -> bool:
    """Whether this ctredge's request checks refuse perf_analyzer's :data:`PA_PARAMETER` (then :data:`SHIM`)."""
    from tritonclient.grpc import service_pb2 as pb

    from ctredge.serve import codec
    from ctredge.serve.errors import Unimplemented

    req = pb.ModelInferRequest(model_name="m")
    req.parameters[PA_PARAMETER].bool_param = True
    try:
        codec.check_parameters(req)
    except Unimplemented:
        return True
    return False


def shim_env(folder: str | os.PathLike[str], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with :data:`SHIM` written to ``folder/sitecustomize.py`` first on
    ``PYTHONPATH``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SHIM)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    return env


def restricted_grpc_header(argv: Sequence[str]) -> tuple[str, str] | None:
    """The gRPC header a ``tritonserver`` command line asks of restricted calls, ``(name, value)``, or None.

    ``--grpc-restricted-protocol=<protocols>:<key>=<value>`` (or as two arguments) makes Triton expect the
    metadata ``triton-grpc-protocol-<key>: <value>``.
    """
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--grpc-restricted-protocol="):
            value = arg.split("=", 1)[1]
        elif arg == "--grpc-restricted-protocol" and i + 1 < len(argv):
            value = argv[i + 1]
        if value and ":" in value:
            key, sep, token = value.rsplit(":", 1)[1].partition("=")
            if sep and key and token:
                return f"triton-grpc-protocol-{key}", token
    return None


def peer_access_header(root_pid: int) -> tuple[str, str] | None:
    """:func:`restricted_grpc_header` of the ``tritonserver`` under ``root_pid`` (read from ``/proc``).

    PyTriton 0.7 restricts the statistics endpoint, which perf_analyzer reads, to callers with a random
    access token it gives tritonserver on its command line; perf_analyzer sends it with ``-H``.
    """
    from ctredge.benchmarks.peer_pytriton import process_tree

    for pid in process_tree(root_pid):
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        found = restricted_grpc_header(argv)
        if found:
            return found
    return None


def _bench_repository(repository: Path, model: str, spec: Any, work: Path) -> Path:
    """``work/repository``: a symlink to ``repository/model`` and the floor with the model's ``config.json``."""
    from ctredge.benchmarks.floor import write_noop_model

    repo = work / "repository"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    (repo / model).symlink_to((repository / model).resolve(), target_is_directory=True)
    cfg_file = repository / model / "config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    write_noop_model(spec, repo, name=FLOOR, config=config)
    return repo


@dataclass(frozen=True)
class PaConfig:
    """Settings of one perf_analyzer comparison (recorded in its JSON)."""

    repository: str
    model: str
    data: str
    out: str
    peer: str | None = None  # "pytriton"
    peer_venv: str = ".venv-pytriton"
    perf_venv: str = str(PERF_VENV)
    binary: str | None = None
    concurrency: tuple[int, ...] = CONCURRENCY
    ranking_concurrency: tuple[int, ...] = RANKING_CONCURRENCY
    ranking_rows: int = 256
    rounds: int = 2
    measurement_ms: int = 2000
    stability: int = 500
    max_trials: int = 8
    protocol: str = "grpc"
    pin: bool = True
    floor: bool = True
    count: int = 64  # data entries (row); ranking files hold min(count, RANKING_BLOCKS) users
    server_args: tuple[str, ...] = ("--batching", "on", "--providers", "cpu")  # passed to ctredge serve


def _targets(cfg: PaConfig, plan: Mapping[str, Any]) -> list[tuple[str, str]]:
    names = [("ctredge", cfg.model)]
    if cfg.floor:
        names.append(("ctredge", FLOOR))
    if cfg.peer:
        names.append(("pytriton", PEER_MODEL))
    return names


def measure(cfg: PaConfig, tool: PerfAnalyzer | None = None) -> dict[str, Any]:
    """Serve, write the input data, run every cell in alternating rounds; returns the results dict
    (``{"status", "rows", "settings", "tool", "peer", "ratios", ...}``) and writes ``perf_analyzer.json`` and
    ``perf_analyzer.md`` into ``cfg.out``.

    Raises:
        PerfAnalyzerMissing: no runnable perf_analyzer.
        CtrEdgeError: no such model, unreadable data, a server that does not start.
    """
    import contextlib

    from ctredge.benchmarks.bench import _latest_onnx, _spec_of
    from ctredge.benchmarks.procs import ServerProcess, cpu_plan
    from ctredge.benchmarks.report import machine_info

    tool = tool or find_perf_analyzer(cfg.binary, venv=cfg.perf_venv)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    repository = Path(cfg.repository)
    onnx_path = _latest_onnx(repository, cfg.model)
    spec = _spec_of(onnx_path)
    plan = cpu_plan() if cfg.pin else {"pinned": False, "server_cpus": [], "client_cpus": [],
                                       "reason": "pinning turned off"}
    server_cpus = plan["server_cpus"] if plan["pinned"] else None
    client_cpus = plan["client_cpus"] if plan["pinned"] else None
    load_before = list(os.getloadavg())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctredge-pa-") as tmp:
        work = Path(tmp)
        files = {"row": write_input_data(input_data(spec, cfg.data, "row", count=cfg.count),
                                         out / "input-row.json")}
        blocks = max(1, min(RANKING_BLOCKS, cfg.count))
        files["ranking"] = write_input_data(input_data(spec, cfg.data, "ranking", rows=cfg.ranking_rows,
                                                       count=blocks), out / f"input-ranking-{cfg.ranking_rows}.json")
        for kind, f in files.items():
            n = check_input_data(json.loads(f.read_text()), spec, 1 if kind == "row" else cfg.ranking_rows)
            log.info("input data %s: %d request(s) checked against %s's signature", f, n, cfg.model)
        repo = _bench_repository(repository, cfg.model, spec, work)
        shim = server_refuses_pa_parameter()
        env = shim_env(work / "shim") if shim else None
        if shim:
            log.warning("this ctredge serve refuses perf_analyzer's %r request parameter; the benchmark's server "
                        "drops it first (sitecustomize shim)", PA_PARAMETER)
        peer_info: dict[str, Any] = {"status": "not measured", "reason": "no --peer"}
        with contextlib.ExitStack() as stack:
            ours = stack.enter_context(ServerProcess(repo, list(cfg.server_args), cpus=server_cpus, env=env,
                                                     label="pa-ctredge"))
            urls = {"ctredge": ours.url}
            headers: dict[str, dict[str, str]] = {}
            if cfg.peer == "pytriton":
                from ctredge.benchmarks.peer_pytriton import PeerError, PeerServer, ensure_venv

                try:
                    python = ensure_venv(Path(cfg.peer_venv))
                    peer = stack.enter_context(PeerServer(onnx_path, python=python, cpus=server_cpus,
                                                          batching=True))
                    urls["pytriton"] = peer.url
                    found = peer_access_header(peer.pid)
                    if found:
                        headers["pytriton"] = {found[0]: found[1]}
                    peer_info = {"status": "measured", "reason": "", "settings": peer.settings()}
                except PeerError as exc:
                    peer_info = {"status": "skipped", "reason": f"PyTriton could not run: {exc}"}
                    log.error("%s", peer_info["reason"])
            targets = [(s, m) for s, m in _targets(cfg, plan) if s in urls]
            cells = [("row", 1, c) for c in cfg.concurrency] + \
                    [("ranking", cfg.ranking_rows, c) for c in cfg.ranking_concurrency]
            rows = []
            for kind, batch, conc in cells:
                runs: dict[tuple[str, str], list[dict[str, Any]]] = {t: [] for t in targets}
                for rnd in range(cfg.rounds):
                    for server, model in targets:
                        r = run_perf_analyzer(tool, url=urls[server], model=model, input_file=files[kind],
                                              concurrency=conc, batch=batch, protocol=cfg.protocol,
                                              measurement_ms=cfg.measurement_ms, stability=cfg.stability,
                                              max_trials=cfg.max_trials, cpus=client_cpus, work_dir=out / "runs",
                                              label=f"{server}-{model}-{kind}-c{conc}-r{rnd}",
                                              headers=headers.get(server))
                        runs[(server, model)].append(r)
                        if not r["ok"]:
                            log.warning("%s %s %s c=%d round %d: %s", server, model, kind, conc, rnd, r["error"])
                for (server, model), got in runs.items():
                    cell = combine(got)
                    rows.append({**cell, "server": server, "model": model, "kind": kind, "batch": batch,
                                 "concurrency": conc, "floor": model == FLOOR})
                    log.info("pa %-8s %-8s %-7s c=%-3d: %s", server, model, kind, conc,
                             f"{cell['rows_per_s']:.0f} rows/s, p50 {cell['p50_ms']:.3f} ms, p99 "
                             f"{cell['p99_ms']:.3f} ms, perf_analyzer {cell['client_cores_used']:.2f} cores"
                             if cell["ok"] else f"failed: {cell['errors'][-1:]}")
    results = {
        "status": "measured", "reason": "", "tool": tool.info(), "rows": rows, "peer": peer_info,
        "shim": (f"ctredge serve refuses perf_analyzer's {PA_PARAMETER!r} request parameter; the benchmark's "
                 f"server dropped it first (sitecustomize)") if shim else "",
        "input_data": {k: str(v) for k, v in files.items()},
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
                     "cpu_plan": plan, "command": " ".join(sys.argv)},
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "seconds": round(time.perf_counter() - t_start, 1), "machine": machine_info(),
    }
    results["ratios"] = ratios(results)
    (out / "perf_analyzer.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    (out / "perf_analyzer.md").write_text(markdown(results) + "\n")
    return results


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# ============================================================================ report
def _pick(rows: Iterable[Mapping[str, Any]], server: str, model: str | None, kind: str,
          conc: int) -> Mapping[str, Any] | None:
    for r in rows:
        if (r.get("server") == server and (model is None or r.get("model") == model) and r.get("kind") == kind
                and r.get("concurrency") == conc and r.get("ok")):
            return r
    return None


def _div(a: Any, b: Any) -> float | None:
    try:
        return float(a) / float(b) if a is not None and b not in (None, 0) else None
    except (TypeError, ValueError):
        return None


def ratios(results: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's ratios from one run: batch-1 p50 vs the floor's at concurrency 1, and 1-row throughput vs
    PyTriton's at every concurrency (64 is the target's)."""
    rows = [r for r in results.get("rows") or [] if isinstance(r, Mapping)]
    model = (results.get("settings") or {}).get("model")
    out: dict[str, Any] = {}
    ours = _pick(rows, "ctredge", model, "row", 1)
    floor = _pick(rows, "ctredge", FLOOR, "row", 1)
    if ours and floor:
        out["b1_p50_vs_floor"] = _div(ours.get("p50_ms"), floor.get("p50_ms"))
    peer = {}
    for r in rows:
        if r.get("server") == "ctredge" and r.get("model") == model and r.get("ok"):
            theirs = _pick(rows, "pytriton", None, r["kind"], r["concurrency"])
            if theirs:
                peer[f"{r['kind']}@c{r['concurrency']}"] = _div(r.get("rows_per_s"), theirs.get("rows_per_s"))
    if peer:
        out["throughput_vs_pytriton"] = peer
    return out


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "–"


def markdown(results: Mapping[str, Any] | None) -> str:
    """The perf_analyzer table (with its ratios, tool, cores and load) as markdown; the reason when not measured."""
    if not results:
        return "not measured (not run)"
    if results.get("status") != "measured":
        return f"not measured ({results.get('reason') or results.get('status')})"
    rows = [r for r in results.get("rows") or [] if isinstance(r, Mapping)]
    floor_p50 = {}
    for r in rows:
        if r.get("floor") and r.get("ok"):
            floor_p50[(r["kind"], r["concurrency"])] = r.get("p50_ms")
    body = []
    for r in rows:
        fl = None if r.get("floor") or r.get("server") != "ctredge" else \
            _div(r.get("p50_ms"), floor_p50.get((r.get("kind"), r.get("concurrency"))))  # the floor is ctredge's
        cpu = _f(r.get("client_cores_used"), "{:.2f}") + (" (saturated)" if r.get("client_saturated") else "")
        if not r.get("ok"):
            errs = [e for e in r.get("errors") or [] if e]
            body.append([r.get("server", ""), r.get("model", "") + (" (floor)" if r.get("floor") else ""),
                         r.get("kind", ""), str(r.get("batch")), str(r.get("concurrency")),
                         "failed: " + (errs[-1].replace("\n", " ")[:120] if errs else "?"),
                         "", "", "", "", "", "", ""])
            continue
        body.append([r["server"], r["model"] + (" (floor)" if r.get("floor") else ""), r["kind"], str(r["batch"]),
                     str(r["concurrency"]), _f(r.get("rows_per_s"), "{:,.0f}"), _f(r.get("req_per_s"), "{:,.0f}"),
                     _f(r.get("p50_ms")), _f(r.get("p90_ms")), _f(r.get("p99_ms")), cpu,
                     _f(fl, "{:.2f}x"), f"{r.get('ok_rounds')}/{r.get('rounds')}"])
    head = ["server", "model", "kind", "-b", "concurrency", "rows/s", "req/s", "p50 ms", "p90 ms", "p99 ms",
            "perf_analyzer cores", "p50 x floor", "rounds ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    s = results.get("settings") or {}
    plan = s.get("cpu_plan") or {}
    tool = results.get("tool") or {}
    rat = results.get("ratios") or {}
    notes = [
        f"perf_analyzer {tool.get('version', '?')} ({tool.get('binary', '?')}), -i {s.get('protocol', 'grpc')} "
        f"--async, {s.get('measurement_ms')} ms windows, -s {s.get('stability')} -r {s.get('max_trials')}, "
        f"{s.get('rounds')} alternating round(s) per cell (throughput averaged, percentiles the median); "
        f"{plan.get('reason', 'unpinned')}; ctredge serve {' '.join(s.get('server_args') or [])}"
        + (", PyTriton with its dynamic batcher (500 us queue delay, 1 instance)." if
           (results.get("peer") or {}).get("status") == "measured" else "."),
        "rows/s is perf_analyzer's Inferences/Second (rows); ranking = 1 user x "
        f"{s.get('ranking_rows')} candidates sent expanded (-b {s.get('ranking_rows')}) to both servers: "
        "perf_analyzer gives every input of a batching model the same batch, so it cannot send ctredge's "
        "broadcast form. perf_analyzer cores = its CPU time (os.wait4, /proc) over wall time while it measured.",
        f"load average before {_load(results.get('load_average_before'))}, after "
        f"{_load(results.get('load_average_after'))}" + _load_range(rows) + ".",
    ]
    if "b1_p50_vs_floor" in rat:
        notes.append(f"batch-1 p50 vs the no-op floor at concurrency 1: {_f(rat['b1_p50_vs_floor'], '{:.2f}x')} "
                     f"(target <= 1.3x).")
    peer = rat.get("throughput_vs_pytriton") or {}
    if peer:
        notes.append("ctredge / PyTriton rows/s: " + ", ".join(f"{k} {_f(v, '{:.2f}x')}" for k, v in peer.items())
                     + " (target >= 2x for row@c64).")
    p = results.get("peer") or {}
    if p.get("status") != "measured" and p.get("reason") and p.get("reason") != "no --peer":
        notes.append(f"PyTriton: {p['reason'][:300]}")
    if results.get("shim"):
        notes.append(str(results["shim"]) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _load_range(rows: Sequence[Mapping[str, Any]]) -> str:
    loads = [p["load_1m"] for r in rows for p in r.get("per_round") or [] if isinstance(p.get("load_1m"), float)]
    return f"; 1-minute load at the runs' starts {min(loads):.2f}-{max(loads):.2f}" if loads else ""


def _load(v: Any) -> str:
    return " ".join(f"{x:.2f}" for x in v) if isinstance(v, (list, tuple)) else "?"


# ============================================================================ bench section
def bench_section(cfg: PaConfig) -> dict[str, Any]:
    """:func:`measure` for ``ctredge bench``: a missing binary is ``{"status": "skipped", "reason": NOT_INSTALLED
    ...}``, never an error."""
    try:
        tool = find_perf_analyzer(cfg.binary, venv=cfg.perf_venv)
    except PerfAnalyzerMissing as exc:
        log.warning("%s", NOT_INSTALLED)
        return {"status": "skipped", "reason": str(exc)}
    return measure(cfg, tool)


# ============================================================================ CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.perf_analyzer",
                                description="Triton's perf_analyzer against ctredge serve (and PyTriton).")
    p.add_argument("--repository", help="model repository (ctredge compress all)")
    p.add_argument("--model", default="ctr-fp32")
    p.add_argument("--data", help="click log the requests are made of (its first rows)")
    p.add_argument("--out", help="folder for perf_analyzer.md / .json, the input data and each run's CSV and log")
    p.add_argument("--peer", choices=("pytriton",), help="serve the same model.onnx through PyTriton too")
    p.add_argument("--peer-venv", default=".venv-pytriton")
    p.add_argument("--perf-venv", default=str(PERF_VENV), help="venv of make perf-tools (default .venv-perf)")
    p.add_argument("--perf-analyzer", help="path of a perf_analyzer binary")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    p.add_argument("--ranking-concurrency", default=",".join(map(str, RANKING_CONCURRENCY)))
    p.add_argument("--ranking-rows", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--measurement-ms", type=int, default=2000)
    p.add_argument("--no-floor", action="store_true")
    p.add_argument("--server-args", default="--batching on --providers cpu",
                   help="arguments for ctredge serve (default: '--batching on --providers cpu')")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--check", action="store_true", help="only check that perf_analyzer runs; print its version")
    p.add_argument("--write-input-data", metavar="FILE",
                   help="only write the 1-row --input-data JSON for --model to FILE (needs --repository, --data)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ctredge").setLevel(logging.INFO)
    try:
        if args.check:
            tool = find_perf_analyzer(args.perf_analyzer, venv=args.perf_venv)
            print(json.dumps(tool.info()))
            return 0
        if not (args.repository and args.data):
            p.error("--repository and --data are required")
        if args.write_input_data:
            from ctredge.benchmarks.bench import _latest_onnx, _spec_of

            spec = _spec_of(_latest_onnx(Path(args.repository), args.model))
            doc = input_data(spec, args.data, "row")
            check_input_data(doc, spec)
            print(write_input_data(doc, args.write_input_data))
            return 0
        if not args.out:
            p.error("--out is required")
        cfg = PaConfig(repository=args.repository, model=args.model, data=args.data, out=args.out, peer=args.peer,
                       peer_venv=args.peer_venv, perf_venv=args.perf_venv, binary=args.perf_analyzer,
                       concurrency=_ints(args.concurrency), ranking_concurrency=_ints(args.ranking_concurrency),
                       ranking_rows=args.ranking_rows, rounds=args.rounds, measurement_ms=args.measurement_ms,
                       floor=not args.no_floor, pin=not args.no_pin,
                       server_args=tuple(shlex.split(args.server_args)))
        results = measure(cfg)
    except PerfAnalyzerMissing as exc:
        print(f"{exc}", file=sys.stderr)
        return 3
    except CtrEdgeError as exc:
        print(f"perf_analyzer: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"written: {Path(args.out) / 'perf_analyzer.md'}, {Path(args.out) / 'perf_analyzer.json'}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise CtrEdgeError(f"expected comma-separated integers, got {text!r}") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
