"""Sequential-client latency of ``ctredge serve`` over KServe v2 REST (JSON and binary) beside gRPC.

Usage::

    python -m ctredge.benchmarks.latency_rest [--repository REPO --data CLICKS.tsv] [--model NAME]
                                               [--requests 1000] [--out report.json]

The model and rows are :mod:`.latency_seq`'s (without ``--repository``: an
untrained DCN-v2 of the default size on 2,000 synthetic rows).  One ``ctredge
serve --port 0 --http-port P`` runs as a separate process.  Per case (1 and 256
rows as contract ids) and protocol, one request in flight, the same rows:

* ``gRPC (pre-built)``: a pre-built ``ModelInferRequest`` on one channel (as latency_seq);
* ``gRPC tritonclient``: ``tritonclient.grpc`` ``infer`` with inputs set before timing;
* ``REST binary`` / ``REST JSON``: ``tritonclient.http`` ``infer``, inputs set before
  timing (binary data, or JSON ``data``; answers likewise);
* ``REST binary (pre-built)`` / ``REST JSON (pre-built)``: the body built once, sent
  with ``http.client`` on one keep-alive connection (what the server costs, without
  tritonclient's client work).

The protocols take turns in ``--rounds`` rounds (a shared machine's noise falls on
all of them alike).  Each protocol's answer is checked against gRPC's first.  Writes a Markdown table to
stdout (and JSON with ``--out``); no pass/fail.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(repository: Path, http_port: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ctredge.cli", "serve", "--repository", str(repository),
                             "--port", "0", "--http-port", str(http_port), "--workers", "1"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()  # "serving REPO on HOST:PORT" once ready
    if " on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def _feeds(spec: Any, data: Path) -> dict[str, np.ndarray]:
    from ctredge.reader import iter_raw

    chunk = next(iter_raw(data, spec, chunk_rows=256))
    feeds = {"dense": chunk.dense, "cat": spec.hash_cat(chunk.cat_raw)}
    if spec.history is not None:
        feeds["hist"] = spec.hash_history(chunk.hist_raw)
    return feeds


def _dtype(arr: np.ndarray) -> str:
    from ctredge.serve import codec

    return codec.datatype_of(arr)


def _callers(url: str, http_url: str, model: str, feeds: dict[str, np.ndarray]) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per protocol, each returning the ``ctr`` answer as a numpy array."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from ctredge.serve import codec
    from ctredge.serve.client import Client

    client = Client(url, timeout=60)
    request = codec.build_request(model, feeds)
    gclient = tg.InferenceServerClient(url)
    hclient = th.InferenceServerClient(http_url, network_timeout=60)

    def inputs(mod: Any, binary: bool = True) -> list[Any]:
        out = []
        for name, arr in feeds.items():
            i = mod.InferInput(name, list(arr.shape), _dtype(arr))
            if mod is th:
                i.set_data_from_numpy(arr, binary_data=binary)
            else:
                i.set_data_from_numpy(arr)
            out.append(i)
        return out

    g_in, hb_in, hj_in = inputs(tg), inputs(th, True), inputs(th, False)
    hb_out, hj_out = [th.InferRequestedOutput("ctr", binary_data=True)], [th.InferRequestedOutput("ctr",
                                                                                                  binary_data=False)]
    binary_header = json.dumps({
        "inputs": [{"name": n, "datatype": _dtype(a), "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes}} for n, a in feeds.items()],
        "outputs": [{"name": "ctr", "parameters": {"binary_data": True}}]}).encode()
    binary_body = binary_header + b"".join(np.ascontiguousarray(a).tobytes() for a in feeds.values())
    json_body = json.dumps({"inputs": [{"name": n, "datatype": _dtype(a), "shape": list(a.shape),
                                        "data": a.reshape(-1).tolist()} for n, a in feeds.items()]}).encode()
    host, port = http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    path = f"/v2/models/{model}/infer"

    def prebuilt(body: bytes, headers: dict[str, str]) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            conn.request("POST", path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"REST answered {r.status}: {data[:200]!r}")
            n = r.getheader("Inference-Header-Content-Length")
            if n is None:
                return np.asarray(json.loads(data)["outputs"][0]["data"], dtype=np.float32)
            return np.frombuffer(data[int(n):], dtype="<f4")

        return call

    return {
        "gRPC (pre-built)": lambda: client.infer_request(request)["ctr"],
        "gRPC tritonclient": lambda: gclient.infer(model, g_in).as_numpy("ctr"),
        "REST binary": lambda: hclient.infer(model, hb_in, outputs=hb_out).as_numpy("ctr"),
        "REST JSON": lambda: hclient.infer(model, hj_in, outputs=hj_out).as_numpy("ctr"),
        "REST binary (pre-built)": prebuilt(binary_body, {"Inference-Header-Content-Length": str(len(binary_header)),
                                                          "Content-Type": "application/octet-stream"}),
        "REST JSON (pre-built)": prebuilt(json_body, {"Content-Type": "application/json"}),
    }


def _time(callers: dict[str, Callable[[], Any]], want: np.ndarray, n: int, warmup: int,
          rounds: int) -> dict[str, dict[str, float]]:
    """p50/p90/p99/mean ms per protocol; the protocols take turns, ``n / rounds`` requests each per round."""
    lat: dict[str, list[float]] = {name: [] for name in callers}
    for name, call in callers.items():
        for _ in range(warmup):
            got = call()
        np.testing.assert_array_equal(np.asarray(got).reshape(-1), want.reshape(-1))
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, call in callers.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                lat[name].append(time.perf_counter() - t0)
    out = {}
    for name, values in lat.items():
        ms = np.asarray(values) * 1e3
        out[name] = {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
                     "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "requests": len(ms)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", help="existing model repository (default: a temporary untrained DCN-v2)")
    p.add_argument("--model", default="ctr")
    p.add_argument("--data", help="click log for request rows (needed with --repository)")
    p.add_argument("--requests", type=int, default=1000, help="timed requests per case and protocol")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10, help="the protocols take turns this many times")
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.repository and not args.data:
        p.error("--repository needs --data (a click log matching the model's FeatureSpec)")

    from ctredge.benchmarks.latency_seq import _make_repository
    from ctredge.serve.client import Client

    tmp = tempfile.TemporaryDirectory(prefix="ctredge-latency-rest-")
    repository, data = (Path(args.repository), Path(args.data)) if args.repository else \
        _make_repository(Path(tmp.name))
    http_port = _free_port()
    proc, url = _start_server(repository, http_port)
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        with Client(url, timeout=60) as client:
            spec = client.feature_spec(args.model)
            provider = client.model_config(args.model).parameters["execution_provider"].string_value
            feeds = _feeds(spec, data)
            for rows in (1, 256):
                batch = {k: np.ascontiguousarray(v[:rows]) for k, v in feeds.items()}
                want = client.infer(args.model, batch)["ctr"]
                callers = _callers(url, f"127.0.0.1:{http_port}", args.model, batch)
                results[f"ids, batch {rows}"] = _time(callers, want, args.requests, args.warmup, args.rounds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        tmp.cleanup()
    print(f"model {args.model} on {provider}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU(s); sequential client, {args.requests} requests per case and protocol in "
          f"{args.rounds} alternating rounds\n")
    print("| case | protocol | p50 ms | p90 ms | p99 ms | mean ms |\n|---|---|---|---|---|---|")
    for case, by_protocol in results.items():
        for name, r in by_protocol.items():
            print(f"| {case} | {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | "
                  f"{r['mean_ms']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"provider": provider, "cpus": os.cpu_count(), "cases": results},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
