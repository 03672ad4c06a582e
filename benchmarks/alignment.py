"""Why the batcher pads requests: does a row's answer depend on the rows run with it?

``python -m ctredge.benchmarks.alignment --repository REPO --data clicks.tsv [--models ctr-fp32,ctr-pruned]
[--alignments 1,2,4,8] [--max-rows 700]``

For each model and alignment ``A``: the reference answer of every row is the row
run alone, padded to ``A`` rows as the server pads it
(:func:`ctredge.serve.batcher.pad_rows`); then the first ``M`` rows are run
together (padded to a multiple of ``A``) for every ``M`` in 1..max-rows, and a
total ``M`` counts as differing when any of its rows is not bit-identical to its
reference.  Also the p50 time of a 1-row request run as ``A`` rows (what the
padding costs).  ONNX Runtime CPU sessions with the serving settings (1 thread,
spinning off).  Prints a Markdown table; no pass/fail.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def check(session, feeds: dict[str, np.ndarray], alignment: int, max_rows: int) -> list[int]:
    """The totals ``M`` (1..max_rows) whose answers differ from the rows run alone."""
    from ctredge.serve.batcher import pad_rows

    def run(rows: int) -> np.ndarray:
        padded, _ = pad_rows({k: v[:rows] for k, v in feeds.items()}, rows, alignment)
        return session.run(None, padded)[0][:rows]

    alone = np.concatenate([
        session.run(None, pad_rows({k: v[i:i + 1] for k, v in feeds.items()}, 1, alignment)[0])[0][:1]
        for i in range(max_rows)])
    return [m for m in range(1, max_rows + 1) if not np.array_equal(run(m), alone[:m])]


def one_row_p50_us(session, feeds: dict[str, np.ndarray], alignment: int, calls: int = 2000) -> float:
    from ctredge.serve.batcher import pad_rows

    padded, _ = pad_rows({k: v[:1] for k, v in feeds.items()}, 1, alignment)
    for _ in range(100):
        session.run(None, padded)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        session.run(None, padded)
        times.append(time.perf_counter_ns() - t0)
    return float(np.median(times)) / 1e3


def main(argv: Sequence[str] | None = None) -> int:
    from ctredge.export.validate import cpu_session
    from ctredge.reader import read_all, resolve_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repository", required=True)
    p.add_argument("--data", required=True, help="click log with the models' FeatureSpec")
    p.add_argument("--models", default="ctr-fp32,ctr-pruned")
    p.add_argument("--alignments", default="1,2,4,8")
    p.add_argument("--max-rows", type=int, default=700)
    args = p.parse_args(argv)
    spec = resolve_spec(args.data)
    feeds = read_all(args.data, spec, limit=args.max_rows).feeds
    if len(next(iter(feeds.values()))) < args.max_rows:
        raise SystemExit(f"--data has fewer than --max-rows {args.max_rows} rows")
    print("| model | alignment | totals 1..%d that differ | 1-row request p50 us |" % args.max_rows)
    print("|---|---|---|---|")
    for model in args.models.split(","):
        path = sorted(Path(args.repository, model).glob("*/model.onnx"))[-1]
        session = cpu_session(str(path))
        for a in (int(x) for x in args.alignments.split(",")):
            bad = check(session, feeds, a, args.max_rows)
            shown = ", ".join(map(str, bad[:6])) + (", ..." if len(bad) > 6 else "")
            print(f"| {model} | {a} | {len(bad)}{f' ({shown})' if bad else ''} | "
                  f"{one_row_p50_us(session, feeds, a):.0f} |", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
