"""Sequential-client latency of ``ctredge serve``: p50/p99 per request, one request in flight.

Usage::

    python -m ctredge.benchmarks.latency_seq [--repository REPO --model NAME] [--url HOST:PORT]
                                              [--requests 1000] [--out report.json]

Without ``--repository`` it writes 2,000 synthetic click-log rows (``ctredge
datagen``) and an untrained DCN-v2 of the default size for their FeatureSpec
(Keras -> tf2onnx; weights do not change the latency) into a temporary
repository.  Without ``--url`` it starts ``ctredge serve --port 0`` as a
separate process (so client and server do not share a GIL) and stops it at the
end.  Requests are built before timing; each timed call is one blocking
``ModelInfer`` on one channel.  Cases: batch 1 and 256 rows as contract ids
(``dense``/``cat``/``hist``), as raw values hashed by the server
(``cat_raw``/``hist_raw``), and a ranking request (1 user x 256 items).
Writes a Markdown table to stdout (and JSON with ``--out``); no pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _make_repository(root: Path) -> tuple[Path, Path]:
    from ctredge.datagen import generate
    from ctredge.export.onnx import convert, set_metadata
    from ctredge.features import METADATA_KEY, FeatureSpec
    from ctredge.reader import sidecar_path
    from ctredge.train.models import ModelConfig, build_model

    data = root / "clicks.tsv"
    generate(str(data), rows=2000, seed=0, history=True)
    spec = FeatureSpec.load(sidecar_path(data, "spec"))
    proto = convert(build_model(spec, ModelConfig(model="dcnv2")), spec, opset=17)
    set_metadata(proto, {METADATA_KEY: spec.to_json(), "ctredge.model_name": "ctr", "ctredge.model_version": "1"})
    path = root / "repo" / "ctr" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(proto.SerializeToString())
    return root / "repo", data


def _start_server(repository: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ctredge.cli", "serve", "--repository", str(repository),
                             "--port", "0", "--workers", "1"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()  # "serving REPO on HOST:PORT" once ready
    if " on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def _cases(spec: Any, data: Path, model: str) -> dict[str, Any]:
    from ctredge.reader import iter_raw
    from ctredge.serve import codec
    from ctredge.serve.client import ranking_inputs, raw_inputs

    chunk = next(iter_raw(data, spec, chunk_rows=256))
    raw = raw_inputs(spec, chunk)
    ids = {"dense": chunk.dense, "cat": spec.hash_cat(chunk.cat_raw)}
    if spec.history is not None:
        ids["hist"] = spec.hash_history(chunk.hist_raw)
    one_user = {k: v.copy() for k, v in raw.items()}
    for kind, name in (("dense", "dense"), ("cat", "cat_raw")):
        for side in ("user", "context"):
            cols = spec.columns(kind, side)
            one_user[name][:, cols] = one_user[name][:1, cols]
    if "hist_raw" in one_user:
        one_user["hist_raw"][:] = one_user["hist_raw"][:1]
    cases = {}
    for rows in (1, 256):
        cases[f"ids, batch {rows}"] = codec.build_request(model, {k: v[:rows] for k, v in ids.items()})
        cases[f"raw, batch {rows}"] = codec.build_request(model, {k: v[:rows] for k, v in raw.items()})
    cases["ranking 1 user x 256 items (raw)"] = codec.build_request(model, ranking_inputs(spec, one_user))
    return cases


def _time(client: Any, request: Any, n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        client.infer_request(request)
    lat = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        client.infer_request(request)
        lat[i] = time.perf_counter() - t0
    ms = lat * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "requests": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", help="existing model repository (default: a temporary untrained DCN-v2)")
    p.add_argument("--model", default="ctr")
    p.add_argument("--data", help="click log for request rows (default: the synthetic one)")
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--requests", type=int, default=1000, help="timed requests per case")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)

    from ctredge.serve.client import Client

    tmp = tempfile.TemporaryDirectory(prefix="ctredge-latency-")
    if args.repository and not args.data:
        p.error("--repository needs --data (a click log matching the model's FeatureSpec)")
    repository, data = (Path(args.repository), Path(args.data)) if args.repository else \
        _make_repository(Path(tmp.name))
    proc, url = _start_server(repository) if not args.url else (None, args.url)
    try:
        with Client(url, timeout=60) as client:
            spec = client.feature_spec(args.model)
            provider = client.model_config(args.model).parameters["execution_provider"].string_value
            results = {name: _time(client, req, args.requests, args.warmup)
                       for name, req in _cases(spec, data, args.model).items()}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        tmp.cleanup()
    print(f"model {args.model} on {provider}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU(s); sequential client, {args.requests} requests per case\n")
    print("| case | p50 ms | p90 ms | p99 ms | mean ms |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"provider": provider, "cpus": os.cpu_count(), "cases": results},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
