"""Observability: Triton's per-model statistics (``ModelStatistics``) and Prometheus metrics.

:class:`ModelStats` keeps Triton's counters for one model version, in Triton's
meaning: ``inference_count`` counts rows (inferences), ``execution_count``
ONNX Runtime runs (batches); ``success``/``fail`` count requests with their
end-to-end duration in the server; ``queue`` is the wait for a run slot (and
for batch-mates); ``compute_input`` decoding, checking, hashing, padding and
merging; ``compute_infer`` the ONNX Runtime run; ``compute_output`` splitting
and encoding.  ``batch_stats`` are per run size (rows).

:class:`Metrics` exposes Prometheus text on its own HTTP port
(``ctredge serve --metrics-port``), from a registry of its own:

=========================================  =========  ============================================
metric                                     type       labels
=========================================  =========  ============================================
``ctredge_requests_total``                 counter    model, version, code (gRPC status name)
``ctredge_request_duration_seconds``       histogram  model (whole request in the server)
``ctredge_queue_duration_seconds``         histogram  model
``ctredge_compute_duration_seconds``       histogram  model (input + infer + output)
``ctredge_inferences_total``               counter    model, version (rows)
``ctredge_executions_total``               counter    model, version (runs)
``ctredge_batch_rows``                     histogram  model (rows per run)
``ctredge_queue_depth``                    gauge      model, version (requests waiting)
``ctredge_model_state``                    gauge      model, version, state (1 for the current state)
``ctredge_model_info``                     gauge      model, version, provider (1 while loaded)
=========================================  =========  ============================================

Worker processes (``ctredge serve --workers N``, :mod:`.workers`): each worker
counts its own requests; ModelStatistics at any worker answers the sum of the
live workers' :meth:`ModelStats.snapshot` (:meth:`ModelStats.merged`).  The
Prometheus metrics use prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor, which serves ``/metrics``):
counters and histograms sum every worker's, those of workers that died
included; ``ctredge_queue_depth`` sums the live workers' (sampled every
:data:`QUEUE_SAMPLE_SECONDS`, as a scrape cannot call into another process);
``ctredge_model_state`` and ``ctredge_model_info`` are the largest value among
live workers (while a reload is under way, two states may read 1).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("ctredge.serve")

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
STATES = ("READY", "UNAVAILABLE", "LOADING", "UNLOADING")
QUEUE_SAMPLE_SECONDS = 1.0
_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += int(ns)


@dataclass
class ModelStats:
    """Triton's ``ModelStatistics`` counters of one model version (thread-safe)."""

    name: str
    version: int
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    batches: dict[int, list[_Duration]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self, ok: bool, total_ns: int, queue_ns: int = 0, input_ns: int = 0, infer_ns: int = 0,
                output_ns: int = 0) -> None:
        """One request answered (``ok``) or failed, with its durations."""
        with self._lock:
            if not ok:
                self.fail.add(total_ns)
                return
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.compute_input.add(input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns)
            self.last_inference_ms = int(time.time() * 1000)

    def execution(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One successful run of ``rows`` rows."""
        with self._lock:
            self.inference_count += rows
            self.execution_count += 1
            b = self.batches.setdefault(rows, [_Duration(), _Duration(), _Duration()])
            b[0].add(input_ns)
            b[1].add(infer_ns)
            b[2].add(output_ns)

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain values (picklable): what a worker sends for :meth:`merged`."""
        with self._lock:
            out: dict[str, Any] = {"inference_count": self.inference_count, "execution_count": self.execution_count,
                                   "last_inference_ms": self.last_inference_ms}
            for k in _DURATIONS:
                d = getattr(self, k)
                out[k] = (d.count, d.ns)
            out["batches"] = {rows: [(d.count, d.ns) for d in b] for rows, b in self.batches.items()}
            return out

    @classmethod
    def merged(cls, name: str, version: int, snapshots: list[dict[str, Any]]) -> "ModelStats":
        """The sum of several workers' :meth:`snapshot` of one version (the latest ``last_inference``)."""
        total = cls(name, version)
        for snap in snapshots:
            total.inference_count += snap["inference_count"]
            total.execution_count += snap["execution_count"]
            total.last_inference_ms = max(total.last_inference_ms, snap["last_inference_ms"])
            for k in _DURATIONS:
                getattr(total, k).add(snap[k][1], snap[k][0])
            for rows, b in snap["batches"].items():
                mine = total.batches.setdefault(rows, [_Duration(), _Duration(), _Duration()])
                for d, (count, ns) in zip(mine, b):
                    d.add(ns, count)
        return total

    def to_proto(self) -> Any:
        from tritonclient.grpc import service_pb2 as pb

        def d(x: _Duration) -> Any:
            return pb.StatisticDuration(count=x.count, ns=x.ns)

        with self._lock:
            return pb.ModelStatistics(
                name=self.name, version=str(self.version), last_inference=self.last_inference_ms,
                inference_count=self.inference_count, execution_count=self.execution_count,
                inference_stats=pb.InferStatistics(
                    success=d(self.success), fail=d(self.fail), queue=d(self.queue),
                    compute_input=d(self.compute_input), compute_infer=d(self.compute_infer),
                    compute_output=d(self.compute_output)),
                batch_stats=[pb.InferBatchStatistics(batch_size=rows, compute_input=d(b[0]), compute_infer=d(b[1]),
                                                     compute_output=d(b[2]))
                             for rows, b in sorted(self.batches.items())])


class Metrics:
    """Prometheus metrics of one server, in a registry of their own (several servers may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ctredge_requests", "ModelInfer requests by gRPC status code",
                                ["model", "version", "code"], registry=r)
        self.request_seconds = Histogram("ctredge_request_duration_seconds",
                                         "Whole request time in the server (decode to encode)", ["model"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("ctredge_queue_duration_seconds",
                                       "Time waiting for a run slot and batch-mates", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("ctredge_compute_duration_seconds",
                                         "Compute time of a request: input + infer + output", ["model"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.inferences = Counter("ctredge_inferences", "Rows inferred", ["model", "version"], registry=r)
        self.executions = Counter("ctredge_executions", "ONNX Runtime runs (batches)", ["model", "version"],
                                  registry=r)
        self.batch_rows = Histogram("ctredge_batch_rows", "Rows per ONNX Runtime run", ["model"],
                                    buckets=ROW_BUCKETS, registry=r)
        # multiprocess_mode only matters in worker processes (PROMETHEUS_MULTIPROC_DIR set): see the module doc
        self.queue_depth = Gauge("ctredge_queue_depth", "Requests waiting in the batching queue",
                                 ["model", "version"], registry=r, multiprocess_mode="livesum")
        self.model_state = Gauge("ctredge_model_state", "1 for the model version's current state",
                                 ["model", "version", "state"], registry=r, multiprocess_mode="livemax")
        self.model_info = Gauge("ctredge_model_info", "1 while the version is loaded, with its execution provider",
                                ["model", "version", "provider"], registry=r, multiprocess_mode="livemax")
        self.refusals = Counter("ctredge_refused_calls", "Calls refused before their handler ran (tokens)",
                                ["method", "code"], registry=r)
        self._http: Any = None
        # in multiprocess mode a gauge's function is never called (the scrape reads files): sample() sets them
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._depths: dict[tuple[str, str], Callable[[], int]] = {}

    def request(self, model: str, version: str, code: str, total_s: float, queue_s: float = 0.0,
                compute_s: float = 0.0, ok: bool = True) -> None:
        self.requests.labels(model, version, code).inc()
        self.request_seconds.labels(model).observe(total_s)
        if ok:
            self.queue_seconds.labels(model).observe(queue_s)
            self.compute_seconds.labels(model).observe(compute_s)

    def refused(self, method: str, code: str) -> None:
        """Count a call refused before its handler; ``method`` is a short method name or ``other``."""
        self.refusals.labels(method, code).inc()

    def execution(self, model: str, version: str, rows: int) -> None:
        self.inferences.labels(model, version).inc(rows)
        self.executions.labels(model, version).inc()
        self.batch_rows.labels(model).observe(rows)

    def state(self, model: str, version: str, state: str, provider: str = "") -> None:
        """Record a version's state (one of :data:`STATES`) and, when loaded, its provider."""
        for s in STATES:
            self.model_state.labels(model, version, s).set(1.0 if s == state else 0.0)
        if provider:
            self.model_info.labels(model, version, provider).set(1.0 if state == "READY" else 0.0)

    def track_queue(self, model: str, version: str, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the queue depth at each scrape (multiprocess mode: at each :meth:`sample`)."""
        if self.multiprocess:
            self._depths[(model, version)] = depth
        else:
            self.queue_depth.labels(model, version).set_function(depth)

    def sample(self) -> None:
        """Multiprocess mode: write the tracked queue depths (a worker calls this every few moments)."""
        for (model, version), depth in list(self._depths.items()):
            try:
                self.queue_depth.labels(model, version).set(depth())
            except Exception:  # a version being released: its scheduler is gone
                self._depths.pop((model, version), None)

    def text(self) -> str:
        """The exposition text (what a scrape returns)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (any path answers the metrics); returns the bound port."""
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            from ctredge.serve.errors import ServeError

            raise ServeError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self._http = server
        bound = int(server.server_address[1])
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
