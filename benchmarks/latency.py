"""In-process ONNX Runtime latency of every model in a repository (no gRPC, no TensorFlow).

``python -m ctredge.benchmarks.latency --repository REPO [--batches 1,256] [--seconds 2]``

Each model gets a CPU session with 1 intra-op thread and spinning off (the
serving defaults); after warm-up the models are timed in interleaved rounds so
background load hits all of them alike.  Inputs are seeded
(:func:`ctredge.export.validate.random_feeds`).  Prints a Markdown table and the
CPU flags that matter for int8 kernels; ``--out`` writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctredge.export.validate import cpu_session, random_feeds
from ctredge.features import FeatureSpec, METADATA_KEY
from ctredge.layout import RepositoryLayout

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags() -> dict[str, Any]:
    """CPU model name and the SIMD flags relevant to ORT's int8/fp32 kernels (Linux)."""
    info: dict[str, Any] = {"model": "unknown", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["model"] == "unknown":
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            info["flags"] = [f for f in FLAGS if f in have]
            break
    return info


def measure(repo: Path, batches: list[int], seconds: float, rounds: int = 5) -> list[dict[str, Any]]:
    """p50/p99 milliseconds and rows/s per (model, batch) over interleaved rounds (each model's latest version).

    Raises:
        ArtifactError: the repository folder does not exist.
    """
    sessions = {}
    for entry in RepositoryLayout(repo).latest_models():
        sess = cpu_session(entry.path)
        meta = sess.get_modelmeta().custom_metadata_map
        spec = FeatureSpec.from_json(meta[METADATA_KEY])
        sessions[entry.name] = (sess, spec)
    times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in sessions for b in batches}
    feeds = {(m, b): random_feeds(spec, b, seed=b) for m, (_, spec) in sessions.items() for b in batches}
    for (m, b), f in feeds.items():  # warm-up
        for _ in range(5):
            sessions[m][0].run(["ctr"], f)
    per_round = seconds / rounds
    for _ in range(rounds):
        for (m, b), f in feeds.items():
            sess = sessions[m][0]
            end = time.perf_counter() + per_round / len(feeds) * len(sessions)
            while time.perf_counter() < end:
                t = time.perf_counter()
                sess.run(["ctr"], f)
                times[(m, b)].append(time.perf_counter() - t)
    out = []
    for (m, b), ts in times.items():
        a = np.array(ts) * 1e3
        out.append({"model": m, "batch": b, "p50_ms": float(np.percentile(a, 50)),
                    "p99_ms": float(np.percentile(a, 99)), "rows_per_s": float(b / np.median(a) * 1e3),
                    "runs": len(ts)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.latency", description=__doc__.splitlines()[0])
    p.add_argument("--repository", required=True)
    p.add_argument("--batches", default="1,256")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per model and batch")
    p.add_argument("--out", help="write JSON here")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = measure(Path(args.repository), batches, args.seconds * len(batches))
    cpu = cpu_flags()
    print("| model | batch | p50 ms | p99 ms | rows/s |\n|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"])):
        print(f"| {r['model']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['rows_per_s']:,.0f} |")
    print(f"ONNX Runtime CPU, 1 intra-op thread, spinning off; CPU {cpu['model']}, flags {' '.join(cpu['flags'])}")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": rows, "cpu": cpu, "threads": 1, "spinning": False}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
