"""A closed-loop gRPC load generator on raw ``grpc.aio`` stubs, with pre-built requests.

Requests (:func:`build_requests`) are built from click-log rows with the hub
reader and serialized to ``ModelInferRequest`` bytes *before* timing; the
clients send those bytes as they are (a raw ``unary_unary`` on
``/inference.GRPCInferenceService/ModelInfer`` with no serializer and no
response deserializer), so no protobuf work is timed on the client side.

:func:`run_load` keeps exactly ``concurrency`` requests in flight in total,
spread over ``processes`` client processes (``spawn`` context: gRPC and
``fork`` do not mix).  Each process runs one event loop with its own channel(s)
and ``concurrency / processes`` coroutines; each coroutine sends a request,
awaits the answer and sends the next one at once (closed loop).

What is measured, and how:

* The processes start together (they connect first, then wait for one
  signal).  For ``warmup_s`` seconds answers are not counted; then, for
  ``duration_s`` seconds (or until ``max_requests`` answers are counted), every
  request that *completes* in that window is counted.  Latency is
  ``time.perf_counter_ns()`` from just before the call to just after its
  answer; percentiles and the mean are over the OK answers.
* ``seconds`` is the measured window (the longest of the processes');
  ``req_per_s`` = counted requests / seconds; ``predictions_per_s`` = OK
  requests x ``rows_per_request`` / seconds.
* ``client_cpu`` is each client process's CPU time (``time.process_time``,
  all its threads) over the window's wall time.  ``client_saturated`` is
  true when one process used >= 0.9 of a core (a Python event loop cannot go
  beyond one core) or, with pinned clients, all of them together used >= 0.9
  of every client core: then the load generator, not the server, may have set
  the ceiling.

Default number of client processes: 1 up to concurrency 8 (one event loop
keeps 8 requests in flight easily); above that ``min(4, ceil(concurrency / 16),
client cores)``, never more than ``concurrency``: more processes than cores
only add context switches.

Run by hand: ``python -m ctredge.benchmarks.load --url HOST:PORT --model M --data clicks.tsv
--kind ranking --concurrency 8 --seconds 5``.
"""

from __future__ import annotations

import argparse
import array
import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import sys
import time
import traceback
from typing import Any, Sequence

import numpy as np

from ctredge.errors import CtrEdgeError
from ctredge.features import INPUT_CAT, INPUT_CAT_RAW, INPUT_DENSE, INPUT_HIST, FeatureSpec

log = logging.getLogger("ctredge.benchmarks")

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
INPUT_HIST_RAW = "hist_raw"
KINDS = ("row", "ranking", "batch")
FORMS = ("ids", "raw")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SATURATED = 0.9


class LoadGenError(CtrEdgeError):
    """The load generator could not run: bad arguments, a request the server refuses, a client that failed."""


# ============================================================================ requests
class _Rows:
    """Parsed click-log rows (not hashed): dense, raw categoricals, raw history lists."""

    def __init__(self, dense: np.ndarray, cat_raw: np.ndarray, hist_raw: list[list[bytes]] | None):
        self.dense, self.cat_raw, self.hist_raw = dense, cat_raw, hist_raw

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def take(self, idx: np.ndarray) -> "_Rows":
        hist = None if self.hist_raw is None else [self.hist_raw[i] for i in idx.tolist()]
        return _Rows(self.dense[idx], self.cat_raw[idx], hist)


def _read_rows(path: str | os.PathLike[str], spec: FeatureSpec, n: int) -> _Rows:
    """The first ``n`` rows of a click log (all of them if it has fewer)."""
    from ctredge.reader import iter_raw

    dense, cat, hist = [], [], []
    for chunk in iter_raw(path, spec, chunk_rows=min(n, 65_536), limit=n):
        dense.append(chunk.dense)
        cat.append(chunk.cat_raw.astype(object))
        if spec.history is not None:
            hist.extend(chunk.hist_raw or [[] for _ in range(len(chunk))])
    if not dense:
        raise LoadGenError(f"{path}: no rows to build requests from")
    cat_raw = np.concatenate(cat).astype("S") if spec.n_cat else np.zeros((sum(map(len, dense)), 0), dtype="S1")
    return _Rows(np.concatenate(dense).astype(np.float32), cat_raw,
                 hist if spec.history is not None else None)


def _inputs(spec: FeatureSpec, rows: _Rows, form: str) -> dict[str, np.ndarray]:
    """Full contract tensors (``dense``, ``cat``, ``hist``) or raw ones (``dense``, ``cat_raw``, ``hist_raw``)."""
    out: dict[str, np.ndarray] = {}
    if spec.n_dense:
        out[INPUT_DENSE] = np.ascontiguousarray(rows.dense, dtype=np.float32)
    if spec.n_cat:
        out[INPUT_CAT if form == "ids" else INPUT_CAT_RAW] = (spec.hash_cat(rows.cat_raw) if form == "ids"
                                                               else rows.cat_raw)
    if spec.history is not None:
        hist = rows.hist_raw or [[] for _ in range(len(rows))]
        if form == "ids":
            out[INPUT_HIST] = spec.hash_history(hist)
        else:
            out[INPUT_HIST_RAW] = np.array([b",".join(h) for h in hist], dtype=object).reshape(-1, 1)
    return out


def _ranking_rows(spec: FeatureSpec, user: _Rows, items: _Rows) -> _Rows:
    """``len(items)`` rows: the item-side columns of ``items``, everything else (and the history) from ``user``."""
    n = len(items)
    dense = items.dense.copy()
    for side in ("user", "context"):
        cols = spec.columns("dense", side) if spec.n_dense else []
        if cols:
            dense[:, cols] = user.dense[0, cols]
    cat = items.cat_raw.astype(object)
    for side in ("user", "context"):
        cols = spec.columns("cat", side) if spec.n_cat else []
        if cols:
            cat[:, cols] = user.cat_raw.astype(object)[0, cols]
    hist = None
    if spec.history is not None:
        hist = [user.hist_raw[0]] * n if spec.history.side != "item" else items.hist_raw  # type: ignore[index]
    return _Rows(dense, cat.astype("S") if spec.n_cat else items.cat_raw, hist)


def rows_per_request(kind: str, rows: int) -> int:
    """Predictions one request of ``kind`` asks for: 1 for ``row``, ``rows`` otherwise."""
    return 1 if kind == "row" else int(rows)


def build_requests(spec: FeatureSpec | None, data_path: str | os.PathLike[str], model: str, kind: str, *,
                   rows: int = 256, count: int = 64, form: str = "ids", expand_ranking: bool = False,
                   version: str = "", outputs: Sequence[str] | None = None) -> list[bytes]:
    """``count`` serialized ``ModelInferRequest`` s (raw contents) built from rows of ``data_path``.

    ``spec``: the FeatureSpec laying out the file (None: the ``<data>.spec.json``
    sidecar).  ``kind``:

    * ``row``: 1 row per request, request ``i`` carrying data row ``i``;
    * ``ranking``: one user x ``rows`` candidates.  The user and context
      columns and the history come from data row ``i``, the item columns from
      ``rows`` other rows.  Sent per side as the server accepts it
      (:func:`ctredge.serve.client.ranking_inputs`): ``dense_user``,
      ``cat_user``/``cat_raw_user``, ``dense_context``..., ``hist``/``hist_raw``
      with 1 row, the ``*_item`` tensors with ``rows``.  ``expand_ranking``:
      the same work as full tensors of ``rows`` rows (user side repeated), for
      servers that do not broadcast;
    * ``batch``: ``rows`` consecutive rows per request as full tensors.

    ``form``: ``ids`` sends hashed ids (``dense``, ``cat``, ``hist``: the ONNX
    contract, which any ONNX server takes); ``raw`` sends raw values
    (``cat_raw``, ``hist_raw``) that a ctredge server hashes.  A file with
    fewer rows than needed is cycled.

    Raises:
        LoadGenError: an unknown kind/form, rows < 1, count < 1, or no rows.
        DataError / SpecError: unreadable data or spec.
    """
    from ctredge.reader import resolve_spec
    from ctredge.serve.client import ranking_inputs
    from ctredge.serve.codec import build_request

    if kind not in KINDS:
        raise LoadGenError(f"kind must be one of {KINDS}, got {kind!r}")
    if form not in FORMS:
        raise LoadGenError(f"form must be one of {FORMS}, got {form!r}")
    if count < 1 or rows < 1:
        raise LoadGenError(f"count and rows must be >= 1, got count={count}, rows={rows}")
    if spec is None:
        spec = resolve_spec(data_path)
    per = rows_per_request(kind, rows)
    needed = count * per + (count if kind == "ranking" else 0)
    data = _read_rows(data_path, spec, needed)
    n = len(data)
    out: list[bytes] = []
    for i in range(count):
        if kind == "row":
            inputs = _inputs(spec, data.take(np.array([i % n])), form)
        elif kind == "batch":
            inputs = _inputs(spec, data.take(np.arange(i * per, (i + 1) * per) % n), form)
        else:
            user = data.take(np.array([i % n]))
            items = data.take((count + np.arange(i * per, (i + 1) * per)) % n)
            inputs = _inputs(spec, _ranking_rows(spec, user, items), form)
            if not expand_ranking:
                inputs = ranking_inputs(spec, inputs)
        req = build_request(model, inputs, model_version=version, outputs=outputs)
        out.append(req.SerializeToString())
    log.info("built %d %s request(s) (%s, %d row(s) each%s) for %s: %.1f KiB each on average", count, kind, form,
             per, ", expanded" if expand_ranking and kind == "ranking" else "", model,
             sum(map(len, out)) / len(out) / 1024)
    return out


def check_request(url: str, request: bytes, rows: int, *, timeout_s: float = 30.0) -> dict[str, np.ndarray]:
    """Send one serialized request and check every output has ``rows`` rows; returns the outputs.

    Raises:
        LoadGenError: the server refused it (status code and details in the
            message) or answered with another number of rows.
    """
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    from ctredge.serve.codec import decode_response

    with grpc.insecure_channel(url, options=_channel_options(False)) as channel:
        call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        try:
            raw = call(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            req = pb.ModelInferRequest.FromString(request)
            shapes = {t.name: list(t.shape) for t in req.inputs}
            raise LoadGenError(f"{url} refused a {req.model_name!r} request with inputs {shapes}: "
                               f"{exc.code().name}: {exc.details()}") from None
    outputs = decode_response(pb.ModelInferResponse.FromString(raw))
    bad = {k: list(v.shape) for k, v in outputs.items() if not v.shape or v.shape[0] != rows}
    if not outputs or bad:
        raise LoadGenError(f"{url}: expected outputs with {rows} row(s) per request, got "
                           f"{ {k: list(v.shape) for k, v in outputs.items()} }")
    return outputs


# ============================================================================ load
def default_processes(concurrency: int, cpus: Sequence[int] | None = None) -> int:
    """Client processes for ``concurrency`` (rule in the module docstring)."""
    if concurrency <= 8:
        return 1
    cores = len(cpus) if cpus else len(_available_cpus())
    return max(1, min(4, math.ceil(concurrency / 16), cores, concurrency))


def _available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(os.cpu_count() or 1))


def _channel_options(local_pool: bool) -> list[tuple[str, int]]:
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if local_pool:  # each channel its own TCP connection
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return opts


def run_load(url: str, requests: Sequence[bytes], *, concurrency: int, duration_s: float,
             rows_per_request: int, max_requests: int | None = None, warmup_s: float = 0.5,
             processes: int | None = None, cpus: Sequence[int] | None = None, channels_per_process: int = 1,
             timeout_s: float = 30.0, verify: bool = True, start_timeout_s: float = 60.0) -> dict[str, Any]:
    """Closed-loop load: ``concurrency`` requests in flight, for ``duration_s`` (or ``max_requests``).

    ``requests``: serialized ``ModelInferRequest`` s, sent round-robin.
    ``rows_per_request``: predictions per request (for ``predictions_per_s``
    and the ``verify`` check).  ``processes``: client processes (default:
    :func:`default_processes`); ``cpus``: pin the client processes to these
    cores.  ``verify`` first sends ``requests[0]`` once and checks the answer.
    How the figures are measured is in the module docstring.

    Returns ``{"requests", "ok", "errors" ({status code: count}), "seconds",
    "req_per_s", "predictions_per_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms",
    "max_ms", "concurrency", "processes", "client_cpus", "client_cpu",
    "client_saturated", "rows_per_request", "warmup_s", "duration_s",
    "max_requests"}``.

    Raises:
        LoadGenError: bad arguments, a refused ``verify`` request, or a client
            process that failed or did not start.
    """
    if concurrency < 1:
        raise LoadGenError(f"concurrency must be >= 1, got {concurrency}")
    if not requests:
        raise LoadGenError("no requests to send")
    if duration_s <= 0 and not max_requests:
        raise LoadGenError(f"give a duration_s > 0 or max_requests, got duration_s={duration_s}")
    if max_requests is not None and max_requests < 1:
        raise LoadGenError(f"max_requests must be >= 1, got {max_requests}")
    if channels_per_process < 1:
        raise LoadGenError(f"channels_per_process must be >= 1, got {channels_per_process}")
    requests = [bytes(r) for r in requests]
    if verify:
        check_request(url, requests[0], rows_per_request, timeout_s=timeout_s)
    procs = default_processes(concurrency, cpus) if processes is None else int(processes)
    if procs < 1:
        raise LoadGenError(f"processes must be >= 1, got {processes}")
    procs = min(procs, concurrency)
    conc = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    limits: list[int | None] = [None] * procs
    if max_requests is not None:
        shares = [max_requests * c // concurrency for c in conc]
        for i in range(max_requests - sum(shares)):  # the shares add up to max_requests
            shares[i % procs] += 1
        limits = [max(1, s) for s in shares]
    duration = float(duration_s) if duration_s and duration_s > 0 else math.inf
    ctx = multiprocessing.get_context("spawn")
    ready_q, result_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    children = []
    for i in range(procs):
        cfg = {"index": i, "url": url, "concurrency": conc[i], "warmup_s": float(warmup_s), "duration_s": duration,
               "max_requests": limits[i], "timeout_s": float(timeout_s), "channels": channels_per_process,
               "cpus": list(cpus) if cpus else None, "start_timeout_s": float(start_timeout_s)}
        p = ctx.Process(target=_client_main, args=(cfg, requests, ready_q, go, result_q), daemon=True,
                        name=f"ctredge-load-{i}")
        p.start()
        children.append(p)
    try:
        _wait_ready(children, ready_q, start_timeout_s)
        go.set()
        wait = (warmup_s + (duration if duration != math.inf else 0) + timeout_s + start_timeout_s
                + (3600 if duration == math.inf else 0))
        results = _collect(children, result_q, wait)
    finally:
        go.set()
        for p in children:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return _summarize(results, concurrency=concurrency, rows=rows_per_request, cpus=cpus, warmup_s=warmup_s,
                      duration_s=duration_s, max_requests=max_requests)


def _wait_ready(children: list[Any], ready_q: Any, timeout: float) -> None:
    pending = {i for i in range(len(children))}
    deadline = time.monotonic() + timeout
    while pending:
        try:
            kind, idx, payload = ready_q.get(timeout=0.2)
        except queue.Empty:
            dead = [i for i in pending if not children[i].is_alive()]
            if dead:
                raise LoadGenError(f"client process {dead[0]} exited with status "
                                   f"{children[dead[0]].exitcode} before it was ready") from None
            if time.monotonic() > deadline:
                raise LoadGenError(f"client processes {sorted(pending)} not ready within {timeout:.0f}s") from None
            continue
        if kind == "error":
            raise LoadGenError(f"client process {idx} failed while connecting:\n{payload}")
        pending.discard(idx)


def _collect(children: list[Any], result_q: Any, timeout: float) -> list[dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(results) < len(children):
        try:
            kind, idx, payload = result_q.get(timeout=0.2)
        except queue.Empty:
            dead = [i for i, p in enumerate(children) if i not in results and not p.is_alive()]
            if dead:
                time.sleep(0.2)  # a result may still be in the pipe
                try:
                    kind, idx, payload = result_q.get_nowait()
                except queue.Empty:
                    raise LoadGenError(f"client process {dead[0]} exited with status {children[dead[0]].exitcode} "
                                       f"without a result") from None
            elif time.monotonic() > deadline:
                raise LoadGenError(f"client processes gave no result within {timeout:.0f}s") from None
            else:
                continue
        if kind == "error":
            raise LoadGenError(f"client process {idx} failed:\n{payload}")
        results[idx] = payload
    return [results[i] for i in sorted(results)]


def _summarize(results: list[dict[str, Any]], *, concurrency: int, rows: int, cpus: Sequence[int] | None,
               warmup_s: float, duration_s: float, max_requests: int | None) -> dict[str, Any]:
    lat = np.concatenate([np.frombuffer(r["latencies"], dtype=np.int64) for r in results]) / 1e6
    ok = int(sum(r["ok"] for r in results))
    errors: dict[str, int] = {}
    for r in results:
        for code, k in r["errors"].items():
            errors[code] = errors.get(code, 0) + k
    total = ok + sum(errors.values())
    seconds = max(r["seconds"] for r in results)
    cpu = [r["cpu_s"] / r["wall_s"] if r["wall_s"] > 0 else 0.0 for r in results]
    saturated = bool(cpu) and (max(cpu) >= SATURATED or (bool(cpus) and sum(cpu) >= SATURATED * len(cpus or ())))

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if lat.size else None

    return {
        "requests": total, "ok": ok, "errors": errors, "seconds": seconds,
        "req_per_s": total / seconds if seconds > 0 else 0.0,
        "predictions_per_s": ok * rows / seconds if seconds > 0 else 0.0,
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_ms": float(lat.mean()) if lat.size else None, "max_ms": float(lat.max()) if lat.size else None,
        "concurrency": concurrency, "processes": len(results), "per_process_concurrency":
            [r["concurrency"] for r in results],
        "client_cpus": list(cpus) if cpus else None, "client_cpu": [round(c, 3) for c in cpu],
        "client_saturated": saturated, "rows_per_request": rows, "warmup_s": warmup_s,
        "duration_s": duration_s, "max_requests": max_requests,
    }


# ============================================================================ client process
def _client_main(cfg: dict[str, Any], requests: list[bytes], ready_q: Any, go: Any, result_q: Any) -> None:
    """One client process: pin, connect, wait for ``go``, run the closed loop, report."""
    idx = cfg["index"]
    connected = False
    try:
        if cfg["cpus"]:
            os.sched_setaffinity(0, set(cfg["cpus"]))  # before grpc starts its threads
        import asyncio

        def on_connected() -> None:
            nonlocal connected
            connected = True
            ready_q.put(("ready", idx, None))

        result = asyncio.run(_client_loop(cfg, requests, go, on_connected))
        result_q.put(("result", idx, result))
    except BaseException:  # report everything, the parent raises it
        (result_q if connected else ready_q).put(("error", idx, traceback.format_exc()))


async def _client_loop(cfg: dict[str, Any], requests: list[bytes], go: Any, on_connected: Any) -> dict[str, Any]:
    import asyncio

    import grpc

    conc, n_ch = cfg["concurrency"], cfg["channels"]
    channels = [grpc.aio.insecure_channel(cfg["url"], options=_channel_options(n_ch > 1)) for _ in range(n_ch)]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), cfg["start_timeout_s"])
        calls = [ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None) for ch in channels]
        on_connected()
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, go.wait, cfg["start_timeout_s"] + 60):
            raise LoadGenError("no start signal from the parent")
        ns = 1_000_000_000
        t_start = time.perf_counter_ns()
        t_w = t_start + int(cfg["warmup_s"] * ns)
        t_end = t_w + int(cfg["duration_s"] * ns) if cfg["duration_s"] != math.inf else 2 ** 62
        limit = cfg["max_requests"]
        timeout = cfg["timeout_s"]
        lat = array.array("q")
        errors: dict[str, int] = {}
        state = {"counted": 0, "ok": 0, "t_stop": None}
        done = asyncio.Event()
        counter = itertools.count(cfg["index"] * 7919)  # processes start at different requests
        n_req = len(requests)
        AioRpcError = grpc.aio.AioRpcError
        perf = time.perf_counter_ns

        async def worker(k: int) -> None:
            call = calls[k % n_ch]
            while not done.is_set():
                req = requests[next(counter) % n_req]
                t0 = perf()
                if t0 >= t_end:
                    return
                try:
                    await call(req, timeout=timeout)
                    code = None
                except AioRpcError as exc:
                    code = exc.code().name
                t1 = perf()
                if t_w <= t1 < t_end and not done.is_set():
                    if code is None:
                        lat.append(t1 - t0)
                        state["ok"] += 1
                    else:
                        errors[code] = errors.get(code, 0) + 1
                    state["counted"] += 1
                    if limit is not None and state["counted"] >= limit:
                        state["t_stop"] = t1
                        done.set()

        async def monitor() -> tuple[float, float]:
            await asyncio.sleep(max(0.0, (t_w - perf()) / ns))
            c0, w0 = time.process_time(), perf()
            try:
                await asyncio.wait_for(done.wait(), max(0.0, (t_end - perf()) / ns))
            except asyncio.TimeoutError:
                pass
            return time.process_time() - c0, (perf() - w0) / ns

        mon = asyncio.ensure_future(monitor())
        await asyncio.gather(*(worker(k) for k in range(conc)))
        done.set()
        cpu_s, wall_s = await mon
        stop = state["t_stop"] if state["t_stop"] is not None else min(t_end, perf())
        return {"ok": state["ok"], "errors": errors, "latencies": lat.tobytes(), "seconds": (stop - t_w) / ns,
                "cpu_s": cpu_s, "wall_s": wall_s, "concurrency": conc, "pid": os.getpid()}
    finally:
        for ch in channels:
            await ch.close()


# ============================================================================ command line
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.load", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="HOST:PORT of the server")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="click log (spec from its .spec.json sidecar unless --spec)")
    p.add_argument("--spec", help="FeatureSpec JSON")
    p.add_argument("--kind", choices=KINDS, default="row")
    p.add_argument("--form", choices=FORMS, default="ids")
    p.add_argument("--rows", type=int, default=256, help="rows per ranking/batch request")
    p.add_argument("--expand-ranking", action="store_true")
    p.add_argument("--concurrency", default="1", help="comma-separated, e.g. 1,8,64")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--max-requests", type=int)
    p.add_argument("--processes", type=int)
    p.add_argument("--cpus", help="pin the clients, e.g. 1 or 2-3")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = FeatureSpec.load(args.spec) if args.spec else None
    reqs = build_requests(spec, args.data, args.model, args.kind, rows=args.rows, form=args.form,
                          expand_ranking=args.expand_ranking)
    cpus = _parse_cpus(args.cpus) if args.cpus else None
    for c in (int(x) for x in args.concurrency.split(",")):
        r = run_load(args.url, reqs, concurrency=c, duration_s=args.seconds, warmup_s=args.warmup,
                     max_requests=args.max_requests, processes=args.processes, cpus=cpus,
                     rows_per_request=rows_per_request(args.kind, args.rows))
        print(json.dumps(r), flush=True)
    return 0


def _parse_cpus(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
