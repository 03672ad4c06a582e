"""The benchmark report: ``report.json``, ``report.md`` and PNG plots from one results dict.

:func:`write_report` writes into ``out_dir``:

* ``report.json`` — the results dict as given (every figure with its settings),
  plus ``machine`` (filled in where missing), the evaluated ``targets`` and the
  plots written; NaN and infinity become ``null``;
* ``report.md`` — a summary table first, then one section per benchmark, then
  the product's targets (:func:`targets`: dAUC budget, edge-model size, latency
  and throughput against the floor);
* ``latency_vs_batch.png``, ``throughput_vs_concurrency.png``, ``auc_vs_bytes.png``
  (:mod:`ctredge.benchmarks.plots`; without matplotlib the report says so and has no plots).

Every section may be missing: it then reads "not measured (reason)".

Results-dict schema (every key optional)::

    {
      "accuracy":  dict from ctredge.benchmarks.accuracy.accuracy_table(),
      "inproc":    dict from ctredge.benchmarks.inproc.inproc_latency(),
      "grpc":      [ {"model": str,                 # FLOOR_MODEL ("floor") or "floor": true marks the no-op floor
                      "kind": "row" | "ranking",
                      "rows_per_request": int,      # 1 for row requests, candidates per ranking request
                      "concurrency": int,           # requests in flight, all client processes together
                      "batching": "on" | "off",     # the server's dynamic batching
                      "server": "ctredge" | "pytriton",
                      "provider": "cpu" | "cuda",
                      "p50_ms", "p95_ms", "p99_ms": float,
                      "req_per_s", "predictions_per_s": float,
                      "errors": int,
                      "client_saturated": bool,     # the load generator, not the server, was the limit
                      "processes": int,             # client processes
                      ...any more keys (duration_s, requests, pinning) are kept in report.json} ],
      "footprint": [ {"model": str, "bytes": int, "rss_bytes": int | None, "cold_start_s": float | None,
                      ...} ],
      "peer":      {"status": "measured" | "skipped" | "failed", "reason": str, "server": "pytriton", ...}
                   (its measurements are the "grpc" rows with server "pytriton"),
      "perf_analyzer": dict from ctredge.benchmarks.perf_analyzer.measure() ({"status", "rows", "ratios", ...}),
      "gpu":       {"status": ..., "reason": str, "device": str,
                    "cells": [inproc cells], "grpc": [grpc rows], ...},
      "explain":   {"models": [ctredge.benchmarks.explain_cost.measure() results], "calls": int,
                    "rows_source": str, "picture": "explain_attributions.png" | None},
      "machine":   {...}  (default: machine_info() at report time),
      "settings":  {"command": str, "duration_s": float, "pinning": str, ...},
    }

Any section may instead be ``{"status": "not measured", "reason": "..."}``
(or absent, or None): the report prints "not measured (reason)".

gRPC ratios to the floor pair each row with the floor row of the same kind,
rows per request, concurrency, batching, server and provider.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger("ctredge.benchmarks")

FLOOR_MODEL = "floor"
TARGET_DAUC = 0.0005
TARGET_EDGE_BYTES = 0.15
TARGET_INT8_B1 = 5.0
TARGET_INT8_B256 = 2.0
TARGET_FLOOR_RATIO = 1.3
TARGET_PEER_RATIO = 2.0
INT8_MODEL = "ctr-int8"
EDGE_MODEL = "ctr-edge"
PLOTS = {"latency_vs_batch": "latency_vs_batch.png",
         "throughput_vs_concurrency": "throughput_vs_concurrency.png",
         "auc_vs_bytes": "auc_vs_bytes.png"}
NA = "–"


# ------------------------------------------------------------------ machine and helpers
def machine_info() -> dict[str, Any]:
    """Host name, CPU model and SIMD flags, cores, CPU affinity, memory, OS, library versions, date, argv."""
    from ctredge.artifacts import library_versions
    from ctredge.benchmarks.latency import cpu_flags

    cpu = cpu_flags()
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "cpu_model": cpu["model"], "cpu_flags": cpu["flags"],
        "cores": os.cpu_count(), "platform": platform.platform(),
        "libraries": library_versions(library_names()),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command_line": " ".join(sys.argv),
    }
    try:
        info["affinity"] = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["affinity"] = None
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_bytes"] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return info


def library_names() -> tuple[str, ...]:
    from ctredge.artifacts import DEFAULT_LIBRARIES

    return tuple(DEFAULT_LIBRARIES) + ("matplotlib", "nvidia-pytriton")


def _section(results: dict[str, Any], key: str) -> tuple[Any, str | None]:
    """(data, None) or (None, reason it is not measured)."""
    if key not in results or results[key] is None:
        return None, "not run"
    value = results[key]
    if isinstance(value, dict) and value.get("status") not in (None, "measured", "ok"):
        has_data = any(value.get(k) for k in ("cells", "grpc", "models", "rows"))
        if not has_data:
            return None, str(value.get("reason") or value.get("status"))
    if isinstance(value, (list, tuple)) and not value:
        return None, "no rows"
    return value, None


def _not_measured(reason: str | None) -> str:
    return f"not measured ({reason})"


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    f = _num(v)
    return NA if f is None else fmt.format(f)


def _int(v: Any) -> str:
    f = _num(v)
    return NA if f is None else f"{int(round(f)):,}"


def _table(header: list[str], rows: Iterable[list[str]], align: str | None = None) -> str:
    rows = list(rows)
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else "---" for a in align]
    return "\n".join(["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def _order(name: str) -> tuple[int, str]:
    from ctredge.benchmarks.accuracy import model_order

    if name == FLOOR_MODEL:
        return (10_000, name)
    return model_order(name)


# ------------------------------------------------------------------ gRPC helpers
def _is_floor(row: dict[str, Any]) -> bool:
    return bool(row.get("floor")) or row.get("model") == FLOOR_MODEL


def _grpc_key(row: dict[str, Any]) -> tuple:
    return (row.get("kind"), row.get("rows_per_request"), row.get("concurrency"), row.get("batching"),
            row.get("server", "ctredge"), row.get("provider", "cpu"))


def _floor_of(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
    key = _grpc_key(row)
    return next((r for r in rows if _is_floor(r) and _grpc_key(r) == key), None)


def _ratio(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return a / b if a is not None and b else None


def _grpc_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    data, _ = _section(results, "grpc")
    return [r for r in (data or []) if isinstance(r, dict)]


def _pick(rows: list[dict[str, Any]], model: str, *, kind: str, concurrency: int, server: str = "ctredge",
          rows_per_request: int | None = 1, prefer_batching: str = "off",
          provider: str = "cpu") -> dict[str, Any] | None:
    """The row for (model, kind, concurrency), preferring the given batching setting."""
    cands = [r for r in rows if r.get("model") == model and r.get("kind") == kind
             and r.get("concurrency") == concurrency and r.get("server", "ctredge") == server
             and r.get("provider", "cpu") == provider
             and (rows_per_request is None or r.get("rows_per_request") == rows_per_request)]
    cands.sort(key=lambda r: r.get("batching") != prefer_batching)
    return cands[0] if cands else None


# ------------------------------------------------------------------ targets
def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each product target checked against the results: ``[{target, model, measured, value, status}]``.

    ``status`` is ``met``, ``not met`` or ``not measured (reason)``; ``value`` is the
    number compared against the threshold.
    """
    out: list[dict[str, Any]] = []

    def add(target: str, model: str, value: float | None, measured: str, ok: bool | None, reason: str = "") -> None:
        status = _not_measured(reason) if value is None else ("met" if ok else "not met")
        out.append({"target": target, "model": model, "value": value, "measured": measured if value is not None
                    else NA, "status": status})

    acc, acc_reason = _section(results, "accuracy")
    t1 = f"within dAUC {TARGET_DAUC} of the full model"
    if acc:
        ref = acc.get("reference")
        variants = [m for m in acc.get("models", []) if m.get("name") != ref
                    and m.get("kind") not in ("keras", "baseline", "dp")]
        if ref != "keras-full":
            t1 += f" (reference: {ref})"
        for m in variants:
            d = _num(m.get("dauc"))
            if d is None:
                add(t1, m["name"], None, "", None, m.get("error") or "not scored")
                continue
            ci = m.get("dauc_ci") or [None, None]
            add(t1, m["name"], d, f"{d:+.5f} [{_f(ci[0], '{:+.5f}')}, {_f(ci[1], '{:+.5f}')}]", -d <= TARGET_DAUC)
        if not variants:
            add(t1, "every variant", None, "", None, "no variants in the repository")
    else:
        add(t1, "every variant", None, "", None, acc_reason or "")

    t2 = f"{EDGE_MODEL} bytes <= {TARGET_EDGE_BYTES:.0%} of ctr-fp32"
    sizes = {m["name"]: m.get("bytes") for m in (acc or {}).get("models", []) if m.get("bytes")}
    fp, _ = _section(results, "footprint")
    for m in fp or []:
        if isinstance(m, dict) and m.get("bytes"):
            sizes.setdefault(m.get("model"), m["bytes"])
    r = _ratio(sizes.get(EDGE_MODEL), sizes.get("ctr-fp32"))
    add(t2, EDGE_MODEL, r, f"{r:.1%} ({_int(sizes.get(EDGE_MODEL))} / {_int(sizes.get('ctr-fp32'))} bytes)"
        if r is not None else "", r is not None and r <= TARGET_EDGE_BYTES,
        "no size of ctr-edge and ctr-fp32" if acc or fp else (acc_reason or "no accuracy or footprint section"))

    inproc, in_reason = _section(results, "inproc")
    for batch, goal in ((1, TARGET_INT8_B1), (256, TARGET_INT8_B256)):
        t = f"ONNX Runtime int8 >= {goal:g}x faster than the TensorFlow full model at batch {batch}"
        s = ((inproc or {}).get("speedup_vs_tf") or {}).get(INT8_MODEL, {}).get(str(batch))
        reason = in_reason or ("no TensorFlow full model or ctr-int8 timing at this batch"
                               if not (inproc or {}).get("skipped") else "; ".join(inproc["skipped"]))
        add(t, INT8_MODEL, _num(s), f"{s:.2f}x (p50)" if _num(s) is not None else "", _num(s) is not None
            and s >= goal, reason)

    rows = _grpc_rows(results)
    t5 = f"gRPC batch-1 p50 <= {TARGET_FLOOR_RATIO}x the no-op floor"
    _, g_reason = _section(results, "grpc")
    models = sorted({r["model"] for r in rows if not _is_floor(r) and r.get("server", "ctredge") == "ctredge"},
                    key=_order)
    any5 = False
    for m in models:
        row = _pick(rows, m, kind="row", concurrency=1)
        if row is None:
            continue
        fl = _floor_of(rows, row)
        ratio = _ratio(row.get("p50_ms"), (fl or {}).get("p50_ms"))
        any5 = True
        add(t5, m, ratio, f"{ratio:.2f}x ({_f(row.get('p50_ms'))} vs {_f(fl.get('p50_ms'))} ms, c1, batching "
            f"{row.get('batching')})" if ratio is not None and fl else "", ratio is not None
            and ratio <= TARGET_FLOOR_RATIO, "no floor row with the same settings")
    if not any5:
        add(t5, "every model", None, "", None, g_reason or "no batch-1 rows at concurrency 1")

    t6 = f">= {TARGET_PEER_RATIO:g}x PyTriton's throughput on ranking requests"
    any6 = False
    peer, p_reason = _section(results, "peer")
    peer_rows = _ours_vs_peer(results)
    for m in sorted({r["model"] for r in peer_rows if r.get("server") == "pytriton"}, key=_order):
        best = {}
        for server in ("ctredge", "pytriton"):
            cands = [r for r in peer_rows if r.get("model") == m and r.get("kind") == "ranking"
                     and r.get("server", "ctredge") == server and _num(r.get("predictions_per_s"))]
            best[server] = max(cands, key=lambda r: r["predictions_per_s"]) if cands else None
        if not best["ctredge"] or not best["pytriton"]:
            continue
        any6 = True
        ratio = _ratio(best["ctredge"]["predictions_per_s"], best["pytriton"]["predictions_per_s"])
        add(t6, m, ratio, f"{ratio:.2f}x ({_int(best['ctredge']['predictions_per_s'])} vs "
            f"{_int(best['pytriton']['predictions_per_s'])} preds/s, best of each)", ratio is not None
            and ratio >= TARGET_PEER_RATIO)
    if not any6:
        add(t6, "ranking", None, "", None, p_reason or g_reason or "no ranking rows from both servers")
    return out


# ------------------------------------------------------------------ Markdown sections
def _summary(results: dict[str, Any]) -> str:
    acc, _ = _section(results, "accuracy")
    inproc, _ = _section(results, "inproc")
    rows = _grpc_rows(results)
    fp, _ = _section(results, "footprint")
    by_acc = {m["name"]: m for m in (acc or {}).get("models", [])}
    cells = [c for c in (inproc or {}).get("cells", []) if c.get("provider", "cpu") == "cpu"]
    p50 = {(c["model"], c["batch"]): c.get("p50_ms") for c in cells}
    fp_by = {m.get("model"): m for m in (fp or []) if isinstance(m, dict)}
    names = set(by_acc) | {c["model"] for c in cells} | {r["model"] for r in rows if r.get("server", "ctredge")
                                                          == "ctredge"} | set(fp_by)
    fp32_bytes = (acc or {}).get("fp32_bytes") or (fp_by.get("ctr-fp32") or {}).get("bytes")
    body = []
    for name in sorted(names, key=_order):
        a = by_acc.get(name, {})
        size = a.get("bytes") or (fp_by.get(name) or {}).get("bytes")
        ci = a.get("dauc_ci") or [None, None]
        dauc = NA if _num(a.get("dauc")) is None else \
            f"{a['dauc']:+.5f} [{_f(ci[0], '{:+.5f}')}, {_f(ci[1], '{:+.5f}')}]"
        line99 = NA if "mlperf_99_9" not in a else ("yes" if a["mlperf_99_9"] else "no")
        g1 = _pick(rows, name, kind="row", concurrency=1, prefer_batching="off")
        g64 = _pick(rows, name, kind="row", concurrency=64, prefer_batching="on")
        c1 = NA
        if g1:
            r = _ratio(g1.get("p50_ms"), (_floor_of(rows, g1) or {}).get("p50_ms"))
            c1 = _f(g1.get("p50_ms")) + (f" ({r:.2f}x)" if r is not None and not _is_floor(g1) else "")
        c64 = NA
        if g64:
            r = _ratio(g64.get("predictions_per_s"), (_floor_of(rows, g64) or {}).get("predictions_per_s"))
            c64 = _int(g64.get("predictions_per_s")) + (f" ({r:.2f}x)" if r is not None and not _is_floor(g64)
                                                        else "") + (" *" if g64.get("client_saturated") else "")
        label = f"{FLOOR_MODEL} (no-op)" if name == FLOOR_MODEL else \
            f"{name} (baseline)" if a.get("kind") == "baseline" else f"{name} (DP)" if a.get("kind") == "dp" else name
        body.append([label, _int(size),
                     _f(_ratio(size, fp32_bytes), "{:.3f}"), _f(a.get("auc"), "{:.5f}"), dauc,
                     _f(a.get("pct_of_full_auc"), "{:.3f}%"), line99,
                     _f(p50.get((name, 1))), _f(p50.get((name, 256))), c1, c64])
    if not body:
        return "No model was measured."
    header = ["model", "bytes", "x fp32", "AUC", "dAUC [95% CI]", "% of full", ">= 99.9%",
              "b1 p50 ms (in-proc)", "b256 p50 ms (in-proc)", "gRPC b1 p50 ms @c1 (x floor)",
              "gRPC preds/s @c64 (x floor)"]
    notes = ["In-process: one call, CPU, p50.",
             "gRPC: 1-row requests to ctredge on the CPU; @c1 with dynamic batching off where measured, "
             "@c64 with batching on where measured; (x floor) = ratio to the no-op model, same settings; "
             "* = the load generator was saturated (a lower bound)."]
    if acc:
        notes.insert(0, f"Accuracy on {_int(acc.get('rows'))} rows ({acc.get('rows_source')}); "
                        f"dAUC against {acc.get('reference')}; x fp32 = bytes / ctr-fp32's bytes.")
        base = acc.get("baselines") or {}
        if base.get("status") == "measured":
            notes.insert(1, "(baseline) rows: cheap models fit by `ctredge bench` on the same training rows and "
                            "scored on the same rows (hashed LR, LightGBM), so the deep model's gain over them shows.")
        elif base:
            notes.insert(1, f"Baselines: {_not_measured(base.get('reason'))}.")
    return _table(header, body, "l" + "r" * 3 + "l" + "r" + "l" + "r" * 4) + "\n\n" + "\n".join(
        f"- {n}" for n in notes)


def _accuracy_md(results: dict[str, Any]) -> str:
    acc, reason = _section(results, "accuracy")
    if acc is None:
        return _not_measured(reason)
    lines = [f"Rows: {_int(acc.get('rows'))} — {acc.get('rows_source')} of `{acc.get('data')}` "
             f"({acc.get('note', '')}); observed click rate {_f(acc.get('click_rate'), '{:.4f}')}.",
             f"Reference: **{acc.get('reference')}**" + (f" ({acc['reference_note']})" if acc.get("reference_note")
                                                         else "") + f"; dAUC = AUC(model) - AUC(reference) with "
             f"a paired bootstrap {_f(100 * (acc.get('confidence') or 0.95), '{:.0f}')}% interval over "
             f"{acc.get('bootstrap')} resamples (seed {acc.get('seed')}).",
             "MLPerf's lines for context: 99% and 99.9% of the reference's AUC."]
    if acc.get("bayes_auc") is not None:
        scope = (acc.get("truth") or {}).get("scope") or "whole file"
        lines.append(f"Ceiling: Bayes-optimal AUC {acc['bayes_auc']:.5f} (true click probabilities of the "
                     f"synthetic data, {scope}).")
        ceiling = (acc.get("truth") or {}).get("ceiling") or {}
        if ceiling.get("status") == "measured":
            lines.append(f"Learnable ceiling (logistic regression on the planted structure, datagen --ceiling) on "
                         f"the same rows: AUC {ceiling['test_auc']:.5f}.")
    if acc.get("budget") is not None:
        lines.append(f"Budget of `compress all`: dAUC >= -{acc['budget']} (verdict column, from index.json).")
    lines.append(_baselines_line(acc))
    body = []
    dp = [m for m in acc.get("models", []) if m.get("kind") == "dp"]
    for m in acc.get("models", []):
        budget = m.get("verdict") or (NA if m.get("within_budget") is None else
                                      ("within" if m["within_budget"] else "OVER"))
        if m.get("kind") == "baseline" and m.get("scored", True) and _num(m.get("auc")) is not None:
            ci = m.get("dauc_ci") or [None, None]
            dauc = NA if _num(m.get("dauc")) is None else \
                f"{m['dauc']:+.5f} [{_f(ci[0], '{:+.5f}')}, {_f(ci[1], '{:+.5f}')}]"
            body.append([f"{m['name']} (baseline)", m.get("quantization") or NA, NA, NA, _f(m.get("auc"), "{:.5f}"),
                         dauc, _f(m.get("pct_of_full_auc"), "{:.3f}%"), NA, NA, _f(m.get("logloss"), "{:.5f}"),
                         _f(m.get("normalized_entropy"), "{:.4f}"), _f(m.get("calibration"), "{:.3f}"),
                         _f(m.get("mean_prediction"), "{:.4f}"), _f(m.get("click_rate"), "{:.4f}"), NA])
            continue
        if m.get("kind") == "dp":
            budget = NA
        if not m.get("scored", True) or _num(m.get("auc")) is None:
            body.append([m["name"], m.get("quantization") or NA, _int(m.get("bytes")), _f(m.get("x_fp32_bytes")),
                         f"not scored ({m.get('error', '')})"] + [NA] * 9 + [budget])
            continue
        ci = m.get("dauc_ci") or [None, None]
        body.append([m["name"], m.get("quantization") or NA, _int(m.get("bytes")), _f(m.get("x_fp32_bytes")),
                     _f(m.get("auc"), "{:.5f}"),
                     f"{m['dauc']:+.5f} [{_f(ci[0], '{:+.5f}')}, {_f(ci[1], '{:+.5f}')}]",
                     _f(m.get("pct_of_full_auc"), "{:.3f}%"), "yes" if m.get("mlperf_99") else "no",
                     "yes" if m.get("mlperf_99_9") else "no", _f(m.get("logloss"), "{:.5f}"),
                     _f(m.get("normalized_entropy"), "{:.4f}"), _f(m.get("calibration"), "{:.3f}"),
                     _f(m.get("mean_prediction"), "{:.4f}"), _f(m.get("click_rate"), "{:.4f}"), budget])
    header = ["model", "quantization", "bytes", "x fp32", "AUC", "dAUC [95% CI]", "% of full", ">= 99%",
              ">= 99.9%", "logloss", "NE", "calibration", "pred. rate", "obs. rate", "budget"]
    text = "\n".join(f"- {x}" for x in lines) + "\n\n" + _table(header, body, "llrrrlrllrrrrrl")
    return text + (_dp_md(dp, acc) if dp else "")


def _dp_md(dp: list[dict[str, Any]], acc: dict[str, Any]) -> str:
    """The privacy settings, the AUC cost and the training rows/s cost of the DP-SGD rows of the accuracy table."""
    body = []
    for m in dp:
        d = m.get("dp") or {}
        if not m.get("scored"):
            body.append([m["name"], f"not scored ({m.get('error', '')})"] + [NA] * 9)
            continue
        ci = m.get("dauc_ci") or [None, None]
        dauc = NA if _num(m.get("dauc")) is None else \
            f"{m['dauc']:+.5f} [{_f(ci[0], '{:+.5f}')}, {_f(ci[1], '{:+.5f}')}]"
        body.append([m["name"], _f(m.get("auc"), "{:.5f}"), dauc, _f(d.get("epsilon"), "{:.3f}"),
                     _f(d.get("delta"), "{:.0e}"), _f(d.get("clip"), "{:g}"), _f(d.get("noise_multiplier"), "{:.3f}"),
                     _int(d.get("steps")), _f(d.get("q"), "{:.4f}"), _int(m.get("train_rows_per_s")),
                     _f(m.get("train_slowdown"), "{:.1f}x")])
    return ("\n\nDP-SGD models (`ctredge train --dp-epsilon E`; README, Differential privacy), scored on the same "
            f"rows; dAUC against {acc.get('reference')}; rows/s = training rows x epochs / training seconds, and "
            "its cost against the reference's training:\n\n" + _table(
                ["model", "AUC", "dAUC [95% CI]", "epsilon", "delta", "clip", "noise mult.", "steps", "q",
                 "train rows/s", "slower"], body, "lrlrrrrrrrr"))


def _baselines_line(acc: dict[str, Any]) -> str:
    """The accuracy section's line on the baselines: what they are fit on and how long it took, or why not."""
    base = acc.get("baselines")
    if not base:
        return "Baselines: not run (`ctredge bench` fits them unless `--skip baselines`)."
    if base.get("status") != "measured":
        return f"Baselines: {_not_measured(base.get('reason'))}."
    fits = ", ".join(f"{m['name']} {_f(m.get('fit_seconds'), '{:.1f}')} s" for m in acc.get("models", [])
                     if m.get("kind") == "baseline")
    return (f"Baselines (rows marked *baseline*, no bytes or latency): fit by `ctredge bench` on the trained "
            f"artifact's {_int(base.get('train_rows'))} training rows, tuned on its {_int(base.get('valid_rows'))} "
            f"valid rows, scored on these {_int(base.get('test_rows'))} rows; dAUC against "
            f"{base.get('reference') or 'no reference (its predictions were not available)'}; fit {fits} "
            f"(+{_f(base.get('read_seconds'), '{:.1f}')} s reading the rows).")


def _cells_table(cells: list[dict[str, Any]]) -> str:
    body = [[c["model"], c.get("runtime", NA), c.get("provider", NA), str(c.get("batch")), _f(c.get("p50_ms")),
             _f(c.get("p99_ms")), _f(c.get("mean_ms")), _int(c.get("rows_per_s")),
             _f(c.get("speedup_vs_tf"), "{:.2f}x"), _f(c.get("cpu_per_wall"), "{:.2f}"), _int(c.get("runs"))]
            for c in cells]
    return _table(["model", "runtime", "provider", "batch", "p50 ms", "p99 ms", "mean ms", "rows/s", "x TF (p50)",
                   "CPU/wall", "calls"], body, "lllrrrrrrrr")


def _inproc_md(results: dict[str, Any]) -> str:
    inproc, reason = _section(results, "inproc")
    if inproc is None:
        return _not_measured(reason)
    st, tf, cpu = inproc.get("settings", {}), inproc.get("tensorflow", {}), inproc.get("cpu", {})
    ort = inproc.get("onnxruntime", {})
    lines = [f"Settings: {st.get('intra_op_threads')} intra-op thread(s), {st.get('inter_op_threads')} inter-op, "
             f"spinning {'on' if st.get('spinning') else 'off'}; {st.get('seconds_per_cell')} s timed per cell in "
             f"{st.get('rounds')} interleaved rounds after {st.get('warmup')} warm-up calls; inputs: "
             f"{st.get('inputs', 'real rows')} (`{st.get('data')}`).",
             f"CPU: {cpu.get('model', NA)}; flags: {' '.join(cpu.get('flags', [])) or NA}.",
             f"ONNX Runtime {ort.get('version', NA)}."]
    if tf.get("skipped"):
        lines.append(f"TensorFlow full model: not measured ({tf['skipped']}).")
    else:
        lines.append(f"TensorFlow {tf.get('version', NA)}: {tf.get('serving', 'SavedModel signature')}; "
                     f"intra-op {tf.get('intra_op_threads')}, inter-op {tf.get('inter_op_threads')} "
                     + ("(applied)." if tf.get("applied") else f"(NOT applied: {tf.get('note', '')})."))
    for s in inproc.get("skipped", []):
        lines.append(f"Skipped: {s}.")
    diffs = inproc.get("max_abs_diff_vs_tf") or {}
    if diffs:
        lines.append("Max |output - TensorFlow's| on one batch: " + ", ".join(
            f"{k} {v:.2g}" for k, v in diffs.items()) + ".")
    out = "\n".join(f"- {x}" for x in lines) + "\n\n" + _cells_table(inproc.get("cells", []))
    sp = inproc.get("speedup_vs_tf") or {}
    if sp:
        batches = sorted({int(b) for v in sp.values() for b in v})
        out += "\n\nSpeed-up against the TensorFlow full model (TF p50 / model p50, CPU):\n\n" + _table(
            ["model"] + [f"batch {b}" for b in batches],
            [[m] + [_f(v.get(str(b)), "{:.2f}x") for b in batches] for m, v in sorted(sp.items(),
                                                                                    key=lambda kv: _order(kv[0]))])
    return out


def _grpc_table(rows: list[dict[str, Any]], all_rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        fl = None if _is_floor(r) else _floor_of(all_rows, r)
        body.append([r.get("server", "ctredge"), r.get("model", NA) + (" (floor)" if _is_floor(r) and
                                                                      r.get("model") != FLOOR_MODEL else ""),
                     r.get("kind", NA), _int(r.get("rows_per_request")), _int(r.get("concurrency")),
                     r.get("batching", NA), r.get("provider", "cpu"), _f(r.get("p50_ms")), _f(r.get("p95_ms")),
                     _f(r.get("p99_ms")), _int(r.get("req_per_s")), _int(r.get("predictions_per_s")),
                     _int(r.get("errors")), _int(r.get("processes")),
                     _f(_ratio(r.get("p50_ms"), (fl or {}).get("p50_ms")), "{:.2f}x"),
                     _f(_ratio(r.get("predictions_per_s"), (fl or {}).get("predictions_per_s")), "{:.2f}x"),
                     "client saturated" if r.get("client_saturated") else ""])
    return _table(["server", "model", "kind", "rows/req", "concurrency", "batching", "provider", "p50 ms", "p95 ms",
                   "p99 ms", "req/s", "preds/s", "errors", "client procs", "p50 x floor", "preds/s x floor",
                   "note"], body, "lllrrllrrrrrrrrrl")


def _grpc_md(results: dict[str, Any]) -> str:
    data, reason = _section(results, "grpc")
    rows = _grpc_rows(results)
    if data is None or not rows:
        return _not_measured(reason or "no rows")
    mine = [r for r in rows if r.get("server", "ctredge") == "ctredge" and r.get("provider", "cpu") == "cpu"]
    mine.sort(key=lambda r: (r.get("kind") != "row", r.get("kind", ""), r.get("rows_per_request") or 0, _order(r.get("model", "")),
                             r.get("batching", ""), r.get("concurrency") or 0))
    st = results.get("settings") or {}
    lines = ["Closed loop: N requests in flight over pre-built requests; p50/p95/p99 per request, predictions/s = "
             "rows scored per second. The floor is the same server with a no-op model; x floor compares rows "
             "with the same kind, rows per request, concurrency, batching and provider."]
    if st.get("pinning"):
        lines.append(f"Pinning: {st['pinning']}.")
    saturated = [r for r in mine if r.get("client_saturated")]
    if saturated:
        lines.append(f"Note: in {len(saturated)} row(s) the load generator was saturated (marked 'client "
                     f"saturated'): those figures are a lower bound on what the server can do.")
    return "\n".join(f"- {x}" for x in lines) + "\n\n" + (_grpc_table(mine, rows) if mine else
                                                           "No ctredge CPU rows.")


def _footprint_md(results: dict[str, Any]) -> str:
    fp, reason = _section(results, "footprint")
    if fp is None:
        return _not_measured(reason)
    body = [[m.get("model", NA), _int(m.get("bytes")), _f(_ratio(m.get("bytes"), 1 << 20), "{:.2f}"),
             _f(_ratio(m.get("rss_bytes"), 1 << 20), "{:.1f}"), _f(m.get("cold_start_s"), "{:.2f}")]
            for m in sorted((x for x in fp if isinstance(x, dict)), key=lambda x: _order(x.get("model", "")))]
    return ("- Bytes on disk; server RSS with the model loaded; cold start = process start to the first "
            "successful inference.\n\n" + _table(["model", "bytes", "MiB", "server RSS MiB", "cold start s"], body))


def _ours_vs_peer(results: dict[str, Any]) -> list[dict[str, Any]]:
    """ctredge rows to set against the peer's: the ones measured interleaved with it (``peer.paired``)
    when present, else the gRPC section's."""
    peer, _ = _section(results, "peer")
    paired = [r for r in ((peer or {}).get("paired") or []) if isinstance(r, dict)]
    return paired + [r for r in _grpc_rows(results) if r.get("server") == "pytriton"] if paired \
        else _grpc_rows(results)


def _peer_md(results: dict[str, Any]) -> str:
    peer, reason = _section(results, "peer")
    rows = _ours_vs_peer(results)
    theirs = [r for r in rows if r.get("server") == "pytriton"]
    if not theirs:
        return _not_measured(reason if peer is None else (peer.get("reason") or "no PyTriton rows"))
    body = []
    for t in sorted(theirs, key=lambda r: (r.get("kind", ""), _order(r.get("model", "")), r.get("batching", ""),
                                           r.get("concurrency") or 0)):
        key = list(_grpc_key(t))
        key[4] = "ctredge"
        ours = next((r for r in rows if _grpc_key(r) == tuple(key) and r.get("model") == t.get("model")), None)
        body.append([t.get("model", NA), t.get("kind", NA), _int(t.get("rows_per_request")),
                     _int(t.get("concurrency")), t.get("batching", NA), _f((ours or {}).get("p50_ms")),
                     _f(t.get("p50_ms")), _int((ours or {}).get("predictions_per_s")),
                     _int(t.get("predictions_per_s")),
                     _f(_ratio((ours or {}).get("predictions_per_s"), t.get("predictions_per_s")), "{:.2f}x"),
                     "client saturated" if t.get("client_saturated") or (ours or {}).get("client_saturated")
                     else ""])
    head = [f"PyTriton ({(peer or {}).get('version') or (peer or {}).get('server', 'pytriton')}) serving the same "
            "ONNX model through Triton's C++ gRPC frontend and dynamic batcher, ONNX Runtime in the Python "
            "callable; same load generator, same requests, same run; the two servers run side by side on the same "
            "cores and are measured in alternating rounds."]
    if peer and peer.get("reason"):
        head.append(str(peer["reason"]))
    return "\n".join(f"- {x}" for x in head) + "\n\n" + _table(
        ["model", "kind", "rows/req", "concurrency", "batching", "ctredge p50 ms", "PyTriton p50 ms",
         "ctredge preds/s", "PyTriton preds/s", "ctredge / PyTriton", "note"], body, "llrrlrrrrrl")


def _perf_analyzer_md(results: dict[str, Any]) -> str:
    """Triton's perf_analyzer against ctredge (and PyTriton): :func:`ctredge.benchmarks.perf_analyzer.markdown`."""
    from ctredge.benchmarks.perf_analyzer import markdown

    pa, reason = _section(results, "perf_analyzer")
    return _not_measured(reason) if pa is None else markdown(pa)


def _gpu_md(results: dict[str, Any]) -> str:
    gpu, reason = _section(results, "gpu")
    inproc, _ = _section(results, "inproc")
    cells = [c for c in (inproc or {}).get("cells", []) if c.get("provider", "cpu") != "cpu"]
    cells += list((gpu or {}).get("cells") or [])
    grpc = [r for r in _grpc_rows(results) if r.get("provider", "cpu") != "cpu"] + list((gpu or {}).get("grpc") or [])
    if not cells and not grpc:
        return _not_measured(reason if gpu is None else (gpu.get("reason") or "no GPU rows"))
    out = []
    if gpu and gpu.get("device"):
        out.append(f"- Device: {gpu['device']}.")
    if cells:
        out.append("In-process:\n\n" + _cells_table(cells))
    if grpc:
        out.append("gRPC:\n\n" + _grpc_table(grpc, _grpc_rows(results) + grpc))
    return "\n\n".join(out)


def _explain_md(results: dict[str, Any]) -> str:
    """The ``attributions`` output's cost (x of a plain request) and the picture of held-out rows' attributions."""
    ex, reason = _section(results, "explain")
    if ex is None:
        return _not_measured(reason)
    body = []
    for m in ex.get("models") or []:
        for r in m.get("results") or []:
            body.append([m["model"], _int(r.get("batch")), _int(r.get("rows_run")), _f(r.get("plain_ms")),
                         _f(r.get("attributions_ms")), _f(r.get("x"), "{:.2f}x"), _f(r.get("ort_plain_ms")),
                         _f(r.get("ort_explained_ms")), _f(r.get("ort_x"), "{:.2f}x")])
    first = (ex.get("models") or [{}])[0]
    head = [f"`attributions[b, g] = ctr(x_b) - ctr(x_b with group g at its baseline)`, "
            f"G = {len(first.get('groups') or [])} groups, asked for with `requested_outputs` "
            f"(README, Explanations); rows: {ex.get('rows_source', NA)}.",
            f"Through the server: an in-process `ctredge serve` over loopback gRPC, plain and explained requests "
            f"interleaved, median of {ex.get('calls', NA)} calls each; ORT run: the same session settings, "
            "B rows against the B x (G + 1) rows of one explained run."]
    text = "\n".join(f"- {x}" for x in head) + "\n\n" + _table(
        ["model", "batch", "rows run", "plain ms", "+ attributions ms", "cost", "ORT plain ms",
         "ORT B x (G+1) ms", "ORT cost"], body, "lrrrrrrrr")
    if ex.get("picture"):
        text += (f"\n\n![attributions of held-out rows]({ex['picture']})\n\n"
                 f"`{first.get('model', NA)}` on held-out rows {first.get('held_out', {}).get('rows')} "
                 "(first clicked and unclicked rows; red raised the score, blue lowered it).")
    return text


def _targets_md(results: dict[str, Any]) -> str:
    return _table(["target", "model", "measured", "status"],
                  [[t["target"], t["model"], t["measured"], t["status"]] for t in targets(results)], "llll")


def _machine_md(machine: dict[str, Any], settings: dict[str, Any]) -> str:
    libs = machine.get("libraries") or {}
    lines = [f"Host: {machine.get('hostname', NA)}; CPU: {machine.get('cpu_model', NA)} "
             f"({machine.get('cores', NA)} cores, affinity {machine.get('affinity', NA)}); flags: "
             f"{' '.join(machine.get('cpu_flags') or []) or NA}.",
             f"OS: {machine.get('platform', NA)}; libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items()) + ".",
             f"Date: {machine.get('date', NA)}; command: `{settings.get('command') or machine.get('command_line')}`."]
    if machine.get("load_average"):
        lines.append("Load average at report time: " + ", ".join(f"{x:.2f}" for x in machine["load_average"]) + ".")
    for k, v in settings.items():
        if k != "command":
            lines.append(f"{k}: {v}")
    return "\n".join(f"- {x}" for x in lines)


def render_markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """``report.md`` text for a results dict (sections missing from it read "not measured")."""
    machine = results.get("machine") or {}
    settings = results.get("settings") or {}
    plots = plots or {}

    def img(key: str, title: str) -> str:
        v = plots.get(key)
        if v and v.endswith(".png"):
            return f"\n\n![{title}]({v})"
        return f"\n\nPlot '{title}': {v}." if v else ""

    parts = [
        "# ctredge benchmark report",
        f"{machine.get('date', NA)} · {machine.get('hostname', NA)} · {machine.get('cpu_model', NA)} · "
        f"{machine.get('cores', NA)} cores",
        "## Summary", summary_table(results),
        "## Accuracy", _accuracy_md(results) + img("auc_vs_bytes", "AUC vs bytes"),
        "## In-process latency", _inproc_md(results) + img("latency_vs_batch", "latency vs batch size"),
        "## gRPC end to end", _grpc_md(results) + img("throughput_vs_concurrency", "throughput vs concurrency"),
        "## Footprint", _footprint_md(results),
        "## Peer: PyTriton", _peer_md(results),
        "## perf_analyzer", _perf_analyzer_md(results),
        "## GPU", _gpu_md(results),
        "## Explanations: the cost of attributions", _explain_md(results),
        "## Targets", _targets_md(results),
        "## Machine and settings", _machine_md(machine, settings),
    ]
    if plots.get("note"):
        parts.insert(3, plots["note"])
    return "\n\n".join(parts) + "\n"


def summary_table(results: dict[str, Any]) -> str:
    """The summary table (Markdown) that opens ``report.md``; the pipeline prints it too."""
    return _summary(results)


# ------------------------------------------------------------------ entry point
def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; return ``report.md``'s path.

    Takes the results dict (schema in the module docstring; any section may be
    missing) and the output folder (created).  ``machine`` is filled in from
    :func:`machine_info` where the results do not carry one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    machine = machine_info()
    machine.update(results.get("machine") or {})
    results["machine"] = machine
    from ctredge.benchmarks.plots import write_plots

    plots = write_plots(results, out)
    results_json = {**results, "targets": targets(results), "plots": plots,
                    "report_format": "ctredge.bench-report/1"}
    (out / "report.json").write_text(json.dumps(_jsonable(results_json), indent=2, allow_nan=False) + "\n",
                                     encoding="utf-8")
    md = out / "report.md"
    md.write_text(render_markdown(results, plots), encoding="utf-8")
    log.info("report: %s", md)
    return md


__all__ = ["FLOOR_MODEL", "write_report", "render_markdown", "summary_table", "targets", "machine_info"]
