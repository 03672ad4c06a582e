"""What the ``attributions`` output costs, and what it shows on a few held-out rows.

``python -m ctredge.benchmarks.explain_cost --repository REPO --data HELD_OUT.tsv --out OUT``

* **Cost through the server.**  An in-process server (:class:`~ctredge.serve.server.ServerThread`,
  gRPC on loopback) and ``tritonclient.grpc``: per batch size (1 and 64 by default),
  plain requests (``ctr``) and requests that also ask for ``attributions``, interleaved
  call by call after a warm-up, contract ids taken from the first rows of ``--data``;
  the median of ``--calls`` calls each, and their ratio.
* **Cost of the run alone.**  The same model's ONNX Runtime session with the serving
  settings: ``B`` rows against the ``B x (G + 1)`` rows :func:`ctredge.serve.explain.expand`
  builds (median of ``--calls`` runs each).
* **Picture.**  The attributions of ``--plot-rows`` held-out rows (the first clicked and
  the first unclicked rows of ``--data``, half each; ``--data`` should be a file the model
  never trained on, e.g. ``ctredge datagen --sample-seed``), as horizontal bars per row.

Writes ``OUT/explain_cost.md`` (the table), ``OUT/explain_cost.json`` and
``OUT/explain_attributions.png``.  Timings depend on the machine and its load; the
table records the CPU count and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge.features import METADATA_KEY, OUTPUT_CTR, FeatureSpec
from ctredge.reader import read_all

DEFAULT_BATCHES = (1, 64)


def _model_path(repository: str, model: str | None) -> tuple[str, str]:
    from ctredge.benchmarks.accuracy import repository_models

    models = repository_models(repository)
    if not models:
        raise SystemExit(f"no model in {repository}")
    chosen = next((m for m in models if m["name"] == model), None) if model else models[0]
    if chosen is None:
        raise SystemExit(f"no model {model!r} in {repository}; it has {[m['name'] for m in models]}")
    return chosen["name"], chosen["path"]


def _median_ms(fn: Any, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e6


def _slice(feeds: dict[str, np.ndarray], rows: int, start: int = 0) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[start:start + rows]) for k, v in feeds.items()}


def measure(repository: str, data: str, *, model: str | None = None, batches: Sequence[int] = DEFAULT_BATCHES,
            calls: int = 300, warmup: int = 30, plot_rows: int = 4, rows: Any = None) -> dict[str, Any]:
    """Time plain vs attributions requests and runs; returns the figures and the held-out rows' attributions.

    ``rows``: the rows to use (a :class:`~ctredge.reader.Batch` hashed with the
    model's spec, e.g. the trained artifact's test split); None reads every row of ``data``.
    """
    import onnxruntime as ort
    import tritonclient.grpc as tg

    from ctredge.onnxrt import ort_session_options
    from ctredge.serve import explain
    from ctredge.serve.server import ServerThread

    name, path = _model_path(repository, model)
    model_file = path if path.endswith(".onnx") else os.path.join(path, "model.onnx")
    session = ort.InferenceSession(model_file, ort_session_options(intra_op_threads=1),
                                   providers=["CPUExecutionProvider"])
    spec = FeatureSpec.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    groups = explain.group_names(spec)
    batch_rows = read_all(data, spec) if rows is None else rows
    need = max(batches)
    if len(batch_rows.labels) < need:
        raise SystemExit(f"{data} has {len(batch_rows.labels)} rows, need {need}")
    feeds = _slice(batch_rows.feeds, need)
    # the pictured rows: the file's first clicked rows and first unclicked rows, half each, in file order
    labels = batch_rows.labels
    clicked, unclicked = np.flatnonzero(labels > 0.5), np.flatnonzero(labels <= 0.5)
    n_clicked = min(len(clicked), plot_rows // 2)
    picked = np.sort(np.concatenate([clicked[:n_clicked], unclicked[:plot_rows - n_clicked]]))

    def infer(client: Any, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> Any:
        ins = []
        for k, v in inputs.items():
            i = tg.InferInput(k, list(v.shape), "FP32" if v.dtype == np.float32 else "INT64")
            i.set_data_from_numpy(v)
            ins.append(i)
        return client.infer(name, ins, outputs=[tg.InferRequestedOutput(o) for o in outputs])

    rows_out: list[dict[str, Any]] = []
    with ServerThread(repository, port=0) as srv, tg.InferenceServerClient(srv.url) as client:
        for b in batches:
            x = _slice(feeds, b)
            plain = lambda: infer(client, x, [OUTPUT_CTR])  # noqa: E731
            asked = lambda: infer(client, x, [OUTPUT_CTR, explain.OUTPUT_ATTRIBUTIONS])  # noqa: E731
            for _ in range(warmup):
                plain(), asked()
            tp, ta = [], []
            for _ in range(calls):  # interleaved, so load changes hit both alike
                t0 = time.perf_counter_ns()
                plain()
                t1 = time.perf_counter_ns()
                asked()
                t2 = time.perf_counter_ns()
                tp.append(t1 - t0)
                ta.append(t2 - t1)
            expanded = explain.expand(x, spec)
            run_plain = _median_ms(lambda: session.run([OUTPUT_CTR], x), calls)
            run_expl = _median_ms(lambda: session.run([OUTPUT_CTR], expanded), calls)
            p, a = statistics.median(tp) / 1e6, statistics.median(ta) / 1e6
            rows_out.append({"batch": b, "rows_run": b * (len(groups) + 1), "plain_ms": p, "attributions_ms": a,
                             "x": a / p, "ort_plain_ms": run_plain, "ort_explained_ms": run_expl,
                             "ort_x": run_expl / run_plain})
        held = {k: np.ascontiguousarray(v[picked]) for k, v in batch_rows.feeds.items()}
        res = infer(client, held, [OUTPUT_CTR, explain.OUTPUT_ATTRIBUTIONS])
        attributions = res.as_numpy(explain.OUTPUT_ATTRIBUTIONS)
        ctr = res.as_numpy(OUTPUT_CTR).reshape(-1)
    return {"model": name, "path": path, "data": os.path.abspath(data), "groups": groups, "calls": calls,
            "cpus": os.cpu_count(), "results": rows_out,
            "held_out": {"rows": picked.tolist(), "ctr": ctr.tolist(), "labels": labels[picked].tolist(),
                         "attributions": attributions.tolist()}}


def table(res: dict[str, Any]) -> str:
    lines = [f"model `{res['model']}`, G = {len(res['groups'])} groups, median of {res['calls']} calls, "
             f"{res['cpus']} CPUs",
             "",
             "| batch | rows run | plain (ms) | + attributions (ms) | x | ORT run: plain (ms) "
             "| ORT run: B x (G+1) rows (ms) | x |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["results"]:
        lines.append(f"| {r['batch']} | {r['rows_run']} | {r['plain_ms']:.3f} | {r['attributions_ms']:.3f} | "
                     f"{r['x']:.2f} | {r['ort_plain_ms']:.3f} | {r['ort_explained_ms']:.3f} | {r['ort_x']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = res["held_out"]
    attr = np.asarray(held["attributions"])
    groups = res["groups"]
    n = attr.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 0.28 * len(groups) + 1.6), sharey=True)
    axes = np.atleast_1d(axes)
    y = np.arange(len(groups))
    lim = float(np.abs(attr).max()) * 1.1 or 1.0
    for k, ax in enumerate(axes):
        colors = ["#c0392b" if v > 0 else "#2471a3" for v in attr[k]]
        ax.barh(y, attr[k], color=colors)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlim(-lim, lim)
        ax.set_title(f"held-out row {held['rows'][k]}\nctr {held['ctr'][k]:.4f}, "
                     f"clicked {int(held['labels'][k])}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].set_yticks(y, groups)
    axes[0].invert_yaxis()
    fig.supxlabel("attribution = ctr(x) - ctr(x with the group at its baseline)   "
                  "(red: the value raised the score, blue: it lowered it)", fontsize=9)
    fig.suptitle(f"{res['model']}: leave-one-group-out attributions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.explain_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--repository", required=True)
    ap.add_argument("--data", required=True, help="held-out click log (.tsv) of the model's world")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="model name (default: the repository's first)")
    ap.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--plot-rows", type=int, default=4)
    args = ap.parse_args(argv)
    res = measure(args.repository, args.data, model=args.model, batches=[int(b) for b in args.batches.split(",")],
                  calls=args.calls, plot_rows=args.plot_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["command"] = "python -m ctredge.benchmarks.explain_cost " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "explain_cost.json").write_text(json.dumps(res, indent=1))
    md = table(res)
    (out / "explain_cost.md").write_text(md + f"\n`{res['command']}`\n")
    plot(res, str(out / "explain_attributions.png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
