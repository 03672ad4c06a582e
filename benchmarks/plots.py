"""The benchmark report's PNG plots: latency against batch size, throughput against concurrency, AUC against bytes.

Drawn with matplotlib's Agg backend from the same results dict as the report
(:mod:`ctredge.benchmarks.report`); without matplotlib the report says so and
has no plots.  A plot that fails is reported as not drawn, never as a failed report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ctredge.benchmarks.report import FLOOR_MODEL, PLOTS, _grpc_rows, _not_measured, _num, _order, _section

log = logging.getLogger("ctredge.benchmarks")


def write_plots(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """PNG plots into ``out_dir``: ``{key: file name}`` or ``{key: reason it was not drawn}``.

    Without matplotlib: ``{"note": "...", key: reason}`` and no files.
    """
    out_dir = Path(out_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        reason = f"matplotlib is not installed ({exc}); install ctredge[bench] for the plots"
        log.info("report: no plots: %s", reason)
        return {"note": f"Plots: not drawn ({reason}).", **{k: f"not drawn ({reason})" for k in PLOTS}}
    out: dict[str, str] = {}
    for key, fn in (("latency_vs_batch", _plot_latency), ("throughput_vs_concurrency", _plot_throughput),
                    ("auc_vs_bytes", _plot_auc)):
        fig = None
        try:
            fig = fn(plt, results)
            if isinstance(fig, str):
                out[key] = f"not drawn ({fig})"
                fig = None
                continue
            fig.savefig(out_dir / PLOTS[key], dpi=110, bbox_inches="tight")
            out[key] = PLOTS[key]
        except Exception as exc:  # a plot must never cost the report
            log.warning("report: plot %s failed: %s", key, exc)
            out[key] = f"not drawn ({type(exc).__name__}: {exc})"
        finally:
            if fig is not None:
                plt.close(fig)
    return out


def _plot_latency(plt: Any, results: dict[str, Any]) -> Any:
    inproc, reason = _section(results, "inproc")
    if not inproc or not inproc.get("cells"):
        return f"in-process latency {_not_measured(reason or 'no cells')}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for c in inproc["cells"]:
        if _num(c.get("p50_ms")):
            series.setdefault((c["model"], c.get("provider", "cpu")), []).append((c["batch"], c["p50_ms"]))
    for (model, provider), pts in sorted(series.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
        pts.sort()
        tf = model == "keras-full"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if tf else "-",
                color="black" if tf else None, label=f"{model} (TensorFlow)" if tf else
                (model if provider == "cpu" else f"{model} ({provider})"))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel("p50 latency per call (ms)")
    ax.set_title("In-process latency vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _plot_throughput(plt: Any, results: dict[str, Any]) -> Any:
    rows = [r for r in _grpc_rows(results) if _num(r.get("predictions_per_s")) and r.get("concurrency")]
    if not rows:
        return f"gRPC {_not_measured(_section(results, 'grpc')[1] or 'no rows')}"
    kinds = sorted({r.get("kind", "row") for r in rows}, key=lambda k: (k != "row", k))
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        series: dict[tuple, list[tuple[int, float]]] = {}
        for r in rows:
            if r.get("kind", "row") == kind:
                key = (r.get("server", "ctredge"), r.get("model"), r.get("batching"), r.get("provider", "cpu"),
                       r.get("rows_per_request"))
                series.setdefault(key, []).append((r["concurrency"], r["predictions_per_s"]))
        for (server, model, batching, provider, rpr), pts in sorted(series.items(), key=lambda kv: (
                kv[0][0], _order(kv[0][1] or ""), str(kv[0][2]), kv[0][3])):
            pts.sort()
            label = f"{model} batching {batching}" + (f" {provider}" if provider != "cpu" else "") + \
                (f" [{server}]" if server != "ctredge" else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    linestyle=":" if model == FLOOR_MODEL else ("--" if server != "ctredge" else "-"), label=label)
        ax.set_xscale("log", base=2)
        concs = sorted({r["concurrency"] for r in rows if r.get("kind", "row") == kind})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("requests in flight (concurrency)")
        ax.set_ylabel("predictions / s")
        rpr = sorted({r.get("rows_per_request") for r in rows if r.get("kind", "row") == kind} - {None})
        ax.set_title(f"gRPC throughput, {kind} requests ({', '.join(map(str, rpr))} rows/request)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _plot_auc(plt: Any, results: dict[str, Any]) -> Any:
    acc, reason = _section(results, "accuracy")
    pts = [(m["bytes"], m["auc"], m["name"]) for m in (acc or {}).get("models", [])
           if _num(m.get("auc")) is not None and _num(m.get("bytes"))]
    if not pts:
        return f"accuracy {_not_measured(reason or 'no scored model')}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = next((m for m in acc["models"] if m["name"] == acc.get("reference")), None)
    for b, a, name in pts:
        ax.scatter([b], [a], color="black" if name == acc.get("reference") else "tab:blue", zorder=3)
        ax.annotate(name, (b, a), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if ref and _num(ref.get("auc")):
        ra = ref["auc"]
        ax.axhline(ra, color="black", linewidth=0.8, label=f"{ref['name']} AUC {ra:.4f}")
        ax.axhline(ra * 0.999, color="tab:green", linestyle="--", linewidth=0.8, label="99.9% of full (MLPerf)")
        ax.axhline(ra * 0.99, color="tab:orange", linestyle="--", linewidth=0.8, label="99% of full (MLPerf)")
    bayes = _num(acc.get("bayes_auc"))
    title = "AUC vs bytes on disk"
    if bayes is not None:
        lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
        if bayes - hi < 2 * max(hi - lo, 0.005):
            ax.axhline(bayes, color="tab:red", linestyle=":", label=f"Bayes-optimal {bayes:.4f}")
        else:
            title += f" (Bayes-optimal AUC {bayes:.4f}, above the plot)"
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g} MB"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes on disk (log scale)")
    ax.set_ylabel("AUC")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


__all__ = ["write_plots"]
