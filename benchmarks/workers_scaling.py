"""``ctredge serve --workers 1`` vs ``--workers N``: 1-row and 1 x 256 ranking load, alternating rounds.

For each round, for each worker count (the order alternates between rounds), a
server starts (:class:`~ctredge.benchmarks.procs.ServerProcess`) and every cell
runs :func:`~ctredge.benchmarks.load.run_load` (clients in separate processes,
``processes x channels`` connections: one channel is one connection, which the
kernel gives to one worker).  Per cell it records what ``run_load`` measures
(req/s, p50/p99, client CPU) and, from ``/proc`` and ModelStatistics: the
server's CPU per request (all its processes), the ONNX Runtime time per request
(``compute_infer``), each process's share of that CPU, and the 1-minute load
average.  Per server: RSS of the supervisor and of each worker after start.

``python -m ctredge.benchmarks.workers_scaling --repository REPO --model ctr-fp32 --data clicks.tsv
--out OUT.json [--workers 1,2] [--rounds 3] [--seconds 4]`` prints one JSON line per cell and a
markdown table of the medians.

``--hop`` measures instead what the other design (front ends feeding shared
executors) would add per request: a decoded 1-row request (the feeds of a
ctredge contract model) handed to another process and its answer back,
length-prefixed pickle over a Unix socket with asyncio at both ends, at 1, 16
and 64 in flight: round trips/s and the front end's CPU per round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pickle
import resource
import statistics
import struct
import tempfile
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ctredge.benchmarks.load import build_requests, rows_per_request, run_load
from ctredge.benchmarks.procs import ServerProcess, read_proc_status

# (kind, concurrency, client processes, channels per process)
CELLS = (("row", 1, 1, 1), ("row", 16, 1, 1), ("row", 16, 2, 4), ("row", 64, 1, 1), ("row", 64, 2, 4),
         ("row", 256, 2, 4), ("ranking", 1, 1, 1), ("ranking", 8, 2, 4))
RANKING_ROWS = 256


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (the workers of a supervisor)."""
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    return [pid] + kids


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/PID/stat``); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _statistics(url: str, model: str) -> tuple[int, int]:
    """(successful requests, compute_infer ns) of ``model`` from ModelStatistics (the sum over workers)."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    with grpc.insecure_channel(url) as ch:
        stats = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=30)
    s = stats.model_stats[0].inference_stats
    return s.success.count, s.compute_infer.ns


def measure(repository: str, model: str, data: str, workers: Sequence[int], rounds: int,
            seconds: float) -> list[dict[str, Any]]:
    requests = {"row": build_requests(None, data, model, "row"),
                "ranking": build_requests(None, data, model, "ranking", rows=RANKING_ROWS)}
    results = []
    for rnd in range(rounds):
        for n in (workers if rnd % 2 == 0 else list(reversed(workers))):
            with ServerProcess(repository, ["--workers", str(n)], label=f"workers{n}") as srv:
                pids = process_tree(srv.pid)
                rss = [read_proc_status(p).get("VmRSS") for p in pids]
                for kind, conc, procs, chans in CELLS:
                    n0, infer0 = _statistics(srv.url, model)
                    cpu0 = [cpu_seconds(p) for p in pids]
                    load = os.getloadavg()[0]
                    r = run_load(srv.url, requests[kind], concurrency=conc, duration_s=seconds, warmup_s=0.5,
                                 processes=procs, channels_per_process=chans,
                                 rows_per_request=rows_per_request(kind, RANKING_ROWS))
                    cpu1 = [cpu_seconds(p) for p in pids]
                    n1, infer1 = _statistics(srv.url, model)
                    done, used = max(1, n1 - n0), sum(cpu1) - sum(cpu0)
                    cell = {"round": rnd, "workers": n, "kind": kind, "concurrency": conc, "client_procs": procs,
                            "channels": procs * chans, "req_per_s": r["req_per_s"], "p50_ms": r["p50_ms"],
                            "p99_ms": r["p99_ms"], "errors": r["errors"], "client_cpu": r["client_cpu"],
                            "client_saturated": r["client_saturated"], "server_cpu_us_per_req": used / done * 1e6,
                            "infer_us_per_req": (infer1 - infer0) / done / 1e3, "load_avg_1m": load,
                            "cpu_share": [round((b - a) / used, 2) if used else None for a, b in zip(cpu0, cpu1)],
                            "rss_bytes": rss}
                    results.append(cell)
                    print(json.dumps(cell), flush=True)
                    time.sleep(0.2)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """Medians over rounds, one line per (request, in flight, channels, workers)."""
    keys: list[tuple] = []
    for r in results:
        k = (r["kind"], r["concurrency"], r["channels"], r["workers"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (k[0] != "row", k[1], k[2], k[3]))
    lines = ["| request | in flight | channels | workers | req/s | p50 ms | p99 ms | server CPU us/req | "
             "ONNX Runtime us/req | CPU share per process | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        cells = [r for r in results if (r["kind"], r["concurrency"], r["channels"], r["workers"]) == k]

        def med(f: str) -> float:
            return statistics.median(r[f] for r in cells)

        shares = [statistics.median(r["cpu_share"][i] or 0 for r in cells) for i in range(len(cells[0]["cpu_share"]))]
        errors = sum(sum(r["errors"].values()) for r in cells)
        lines.append(
            f"| {'1 row' if k[0] == 'row' else f'1x{RANKING_ROWS} ranking'} | {k[1]} | {k[2]} | {k[3]} | "
            f"{med('req_per_s'):,.0f} | {med('p50_ms'):.2f} | {med('p99_ms'):.1f} | {med('server_cpu_us_per_req'):.0f} | "
            f"{med('infer_us_per_req'):.0f} | {' / '.join(f'{s:.2f}' for s in shares)} | "
            f"{min(r['load_avg_1m'] for r in cells):.1f}-{max(r['load_avg_1m'] for r in cells):.1f} |"
            + (f" {errors} errors" if errors else ""))
    return "\n".join(lines)


# ============================================================================ the shared-executor hop
_FRAME = struct.Struct("<II")  # request id, body bytes


def _hop_feeds() -> dict[str, Any]:
    import numpy as np

    return {"dense": np.ones((1, 13), np.float32), "cat": np.ones((1, 26), np.int64),
            "hist": np.ones((1, 20), np.int64)}


async def _hop_executor_main(path: str) -> None:
    import numpy as np

    answer = pickle.dumps({"ctr": np.zeros((1, 1), np.float32)}, protocol=5)
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                rid, n = _FRAME.unpack(await reader.readexactly(_FRAME.size))
                pickle.loads(await reader.readexactly(n))
                writer.write(_FRAME.pack(rid, len(answer)) + answer)
        except asyncio.IncompleteReadError:
            done.set()

    server = await asyncio.start_unix_server(serve, path=path)
    async with server:
        await done.wait()


def _hop_executor(path: str) -> None:
    asyncio.run(_hop_executor_main(path))


async def _hop_front(path: str, seconds: float) -> list[dict[str, Any]]:
    for _ in range(500):
        try:
            reader, writer = await asyncio.open_unix_connection(path)
            break
        except OSError:
            await asyncio.sleep(0.02)
    else:
        raise RuntimeError("the executor process did not listen")
    pending: dict[int, asyncio.Future] = {}

    async def read() -> None:
        while True:
            rid, n = _FRAME.unpack(await reader.readexactly(_FRAME.size))
            pending.pop(rid).set_result(pickle.loads(await reader.readexactly(n)))

    reading = asyncio.get_running_loop().create_task(read())
    feeds, out, next_id = _hop_feeds(), [], [0]
    for conc in (1, 16, 64):
        end, count = time.perf_counter() + seconds, [0]

        async def one() -> None:
            loop = asyncio.get_running_loop()
            while time.perf_counter() < end:
                next_id[0] += 1
                fut = pending[next_id[0]] = loop.create_future()
                body = pickle.dumps(feeds, protocol=5)
                writer.write(_FRAME.pack(next_id[0], len(body)) + body)
                await fut
                count[0] += 1

        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(one() for _ in range(conc)))
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        out.append({"in_flight": conc, "round_trips_per_s": count[0] / wall,
                    "front_end_cpu_us_per_round_trip": cpu / max(1, count[0]) * 1e6, "load_avg_1m": os.getloadavg()[0]})
    reading.cancel()
    writer.close()
    return out


def measure_hop(seconds: float = 3.0) -> list[dict[str, Any]]:
    """The shared-executor hop (module doc): one executor process, the front end in this process."""
    with tempfile.TemporaryDirectory(prefix="ctredge-hop-") as tmp:
        path = os.path.join(tmp, "executor.sock")
        proc = multiprocessing.get_context("spawn").Process(target=_hop_executor, args=(path,), daemon=True)
        proc.start()
        try:
            return asyncio.run(_hop_front(path, seconds))
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.workers_scaling", description=__doc__.split("\n")[0])
    p.add_argument("--hop", action="store_true", help="measure the shared-executor hop only (module doc)")
    p.add_argument("--repository")
    p.add_argument("--model")
    p.add_argument("--data", help="click log (spec from its .spec.json sidecar)")
    p.add_argument("--out", help="JSON file of every cell")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    if args.hop:
        for r in measure_hop(args.seconds):
            print(json.dumps(r), flush=True)
        return 0
    if not (args.repository and args.model and args.data and args.out):
        p.error("--repository, --model, --data and --out are required (or --hop)")
    results = measure(args.repository, args.model, args.data, [int(x) for x in args.workers.split(",")],
                      args.rounds, args.seconds)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
