"""In-process latency: the full model as TensorFlow serves it against every ONNX Runtime variant.

:func:`inproc_latency` times one ``predict`` call — numpy rows in, click
probabilities out, no network — per model and batch size:

* **TensorFlow** (``keras-full``): the trained Keras model wrapped in a
  ``tf.function`` with the FeatureSpec's input signature, saved as a SavedModel
  (``tf.saved_model.save``, signature ``serving_default``), loaded back with
  ``tf.saved_model.load`` and called through that signature — what TF Serving
  runs, not ``keras predict``.  Intra-op threads are set to ``threads`` and
  inter-op threads to 1 (ONNX Runtime's settings) and recorded; TensorFlow only
  accepts them before its runtime starts, so when it has already started in this
  process the result says ``applied: false`` (use :func:`inproc_latency_isolated`
  or ``python -m ctredge.benchmarks.inproc`` for a fresh process).  Placed on the
  CPU.  Each call includes ``tf.constant`` of the inputs and ``.numpy()`` of the
  output, as ONNX Runtime's timing includes its numpy in/out.
* **ONNX Runtime**: every model of the repository (or those named), one session
  per provider with the serving settings: ``threads`` intra-op threads (default
  1), 1 inter-op thread, spinning off.  ``"cuda"`` asks for the
  ``CUDAExecutionProvider`` (CPU as fallback) and records what
  ``get_providers()`` reports; it is skipped, with a line saying why, when
  ONNX Runtime has no CUDA provider or the session falls back to the CPU.

Inputs are real rows: the first ``max(batches)`` rows of ``data_path`` read
and hashed by the hub reader with each model's FeatureSpec (tiled when the file
is shorter); a batch of ``b`` cycles through up to 16 disjoint slices of ``b``
rows, the same slices for every model.

Timing: every (model, provider, batch) is warmed up (``warmup`` calls), then
timed in ``rounds`` interleaved rounds — within a round each batch size visits
every model in turn (the starting model rotates per round) for a burst of
``seconds / rounds`` (at least one call) — so background load hits all models
alike.  A cell gets about ``seconds`` of timed calls: large batches get fewer
calls.  Per cell: p50, p99, mean milliseconds, rows/s (= batch / mean
latency), calls, and ``cpu_per_wall`` (this process's CPU seconds per wall
second during the cell's bursts: ~1 means one busy thread, > 1 more threads
than asked for); the speed-up against the TensorFlow full model
(TF p50 / model p50, same batch).  Each model's output on one batch is
compared with TensorFlow's (``max_abs_diff_vs_tf``) so a timed model that
computes something else is visible.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ctredge.benchmarks.accuracy import FULL_MODEL, model_order, repository_models
from ctredge.benchmarks.latency import cpu_flags
from ctredge.errors import ConfigError, DataError
from ctredge.features import METADATA_KEY, OUTPUT_CTR, FeatureSpec
from ctredge.reader import read_all, resolve_spec

log = logging.getLogger("ctredge.benchmarks")

DEFAULT_BATCHES = (1, 16, 256, 4096)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MAX_SLICES = 16

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]


def _ort_session(path: str, provider: str, threads: int) -> tuple[Any, list[str]]:
    """(session, providers it actually uses) with the serving settings."""
    import onnxruntime as ort

    from ctredge.onnxrt import ort_session_options

    opts = ort_session_options(intra_op_threads=threads)
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
    return sess, list(sess.get_providers())


def _tf_runner(trained_dir: str | os.PathLike[str], threads: int,
               workdir: str) -> tuple[Runner | None, dict[str, Any]]:
    """The full model behind a SavedModel serving signature, or (None, reason)."""
    try:
        import tensorflow as tf
    except ImportError as exc:
        return None, {"skipped": f"TensorFlow is not installed ({exc})"}
    info: dict[str, Any] = {"version": tf.__version__, "intra_op_threads": threads, "inter_op_threads": 1,
                            "device": "/CPU:0",
                            "serving": "tf.saved_model.load(...).signatures['serving_default'] of a tf.function "
                                       "with the FeatureSpec's input signature"}
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        info["applied"] = True
    except RuntimeError as exc:
        info["applied"] = False
        info["note"] = (f"TensorFlow had already started in this process ({exc}); it runs with "
                        f"intra={tf.config.threading.get_intra_op_parallelism_threads()} and "
                        f"inter={tf.config.threading.get_inter_op_parallelism_threads()} (0 = TF's default: "
                        f"all cores); run in a fresh process for matched threads")
        log.warning("inproc: %s", info["note"])
    from ctredge.train.train import load_trained

    model, spec, _ = load_trained(trained_dir)
    names = spec.input_names()
    sig = [tf.TensorSpec(shape, dtype=dt, name=name) for name, (dt, shape) in spec.input_signature().items()]

    class Serving(tf.Module):
        def __init__(self, keras_model: Any) -> None:
            super().__init__()
            self.model = keras_model

        @tf.function(input_signature=sig)
        def serve(self, *tensors: Any) -> dict[str, Any]:
            out = self.model(dict(zip(names, tensors)), training=False)
            if isinstance(out, dict):
                out = out[OUTPUT_CTR]
            return {OUTPUT_CTR: tf.identity(out)}

    module = Serving(model)
    path = os.path.join(workdir, "saved_model")
    with tf.device("/CPU:0"):
        tf.saved_model.save(module, path, signatures={"serving_default": module.serve.get_concrete_function()})
        loaded = tf.saved_model.load(path)
    fn = loaded.signatures["serving_default"]
    info["saved_model_bytes"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        with tf.device("/CPU:0"):
            out = fn(**{k: tf.constant(v) for k, v in feeds.items()})
        return out[OUTPUT_CTR].numpy()

    run.loaded = loaded  # type: ignore[attr-defined]  (keeps the SavedModel's resources alive)
    return run, info


def _feeds_for(spec: FeatureSpec, data_path: str, batches: Sequence[int]) -> tuple[dict[int, list], dict[str, Any]]:
    """Per batch size, up to 16 disjoint feed dicts of real rows (the same for every model)."""
    pool = max(batches)
    rows = read_all(data_path, spec, limit=pool)
    if len(rows) == 0:
        raise DataError(f"no rows in {data_path} to time the models with")
    info = {"rows_read": len(rows), "tiled": len(rows) < pool}
    idx = np.resize(np.arange(len(rows)), pool)
    feeds = {}
    for b in batches:
        n = max(1, min(MAX_SLICES, pool // b))
        feeds[b] = [{k: np.ascontiguousarray(v[idx[i * b:(i + 1) * b]]) for k, v in rows.feeds.items()}
                    for i in range(n)]
    return feeds, info


def _stats(times: list[float], batch: int) -> dict[str, Any]:
    a = np.asarray(times) * 1e3
    mean = float(a.mean())
    return {"runs": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": mean, "min_ms": float(a.min()), "rows_per_s": batch / mean * 1e3,
            "timed_s": float(a.sum() / 1e3)}


def inproc_latency(repository: str | os.PathLike[str], trained_dir: str | os.PathLike[str] | None,
                   data_path: str | os.PathLike[str], *, models: Sequence[str] | None = None,
                   batches: Sequence[int] = DEFAULT_BATCHES, seconds: float = 1.0,
                   providers: Sequence[str] = ("cpu",), threads: int = 1, rounds: int = 5,
                   warmup: int = 3) -> dict[str, Any]:
    """Time the TensorFlow full model and each ONNX Runtime variant on the same real rows.

    Takes the repository, the trained artifact (None: no TensorFlow row), the
    data file, the model names to time (default: all, ``keras-full`` included),
    batch sizes, timed seconds per (model, provider, batch) cell, ONNX Runtime
    providers (``cpu``, ``cuda``), intra-op threads, rounds and warm-up calls.
    Total time is about ``seconds`` x cells plus the SavedModel export.
    Returns::

        {"settings": {...}, "cpu": cpu_flags(), "tensorflow": {...}, "onnxruntime": {"version"},
         "cells": [{"model", "runtime": "tensorflow" | "onnxruntime", "provider", "provider_actual",
                    "batch", "runs", "p50_ms", "p99_ms", "mean_ms", "min_ms", "rows_per_s",
                    "timed_s", "cpu_per_wall", "speedup_vs_tf"}],
         "speedup_vs_tf": {model: {"1": x, "256": y, ...}},   # CPU provider, p50 ratio
         "max_abs_diff_vs_tf": {model: float}, "skipped": [str], "seconds": float}

    Raises:
        ConfigError: bad batches/seconds/threads, an unknown provider or model name.
        DataError: the data cannot be read.
    """
    t_start = time.perf_counter()
    batches = _checked(batches, seconds, threads, rounds, warmup, providers)
    import onnxruntime as ort

    data_path = str(data_path)
    workdir = tempfile.TemporaryDirectory(prefix="ctredge-inproc-")
    try:
        runners, skipped, tf_info = _runners(repository, trained_dir, data_path, models, providers, threads,
                                             workdir.name)
        rows_info = _attach_feeds(runners, data_path, batches)
        check_b = min(batches, key=lambda b: abs(b - 16))
        diffs = _check_and_warm(runners, batches, check_b, warmup)
        log.info("inproc: warmed up %d model(s) x %d batch size(s); timing %.1fs per cell in %d rounds",
                 len(runners), len(batches), seconds, rounds)
        cells, speedup = _cells(runners, *_timed_rounds(runners, batches, seconds, rounds))
    finally:
        workdir.cleanup()

    return {
        "settings": {"batches": batches, "seconds_per_cell": seconds, "rounds": rounds, "warmup": warmup,
                     "providers": list(providers), "intra_op_threads": threads, "inter_op_threads": 1,
                     "spinning": False, "data": data_path, **rows_info,
                     "inputs": "real rows of the data, hashed by the hub reader; the same rows for every model",
                     "check_batch": check_b},
        "cpu": cpu_flags(),
        "tensorflow": tf_info,
        "onnxruntime": {"version": ort.__version__, "available_providers": ort.get_available_providers()},
        "cells": cells,
        "speedup_vs_tf": speedup,
        "max_abs_diff_vs_tf": diffs,
        "skipped": skipped,
        "seconds": time.perf_counter() - t_start,
    }


def _checked(batches: Sequence[int], seconds: float, threads: int, rounds: int, warmup: int,
             providers: Sequence[str]) -> list[int]:
    """The sorted distinct batch sizes.  Raises :class:`ConfigError` for any setting out of range."""
    out = sorted({int(b) for b in batches})
    if not out or out[0] < 1:
        raise ConfigError(f"inproc: batch sizes must be >= 1, got {list(batches)}")
    if not seconds > 0 or threads < 1 or rounds < 1 or warmup < 0:
        raise ConfigError(f"inproc: need seconds > 0, threads >= 1, rounds >= 1, warmup >= 0; got "
                          f"seconds={seconds}, threads={threads}, rounds={rounds}, warmup={warmup}")
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ConfigError(f"inproc: unknown provider(s) {unknown}; expected some of {list(PROVIDERS)}")
    return out


def _runners(repository: Any, trained_dir: Any, data_path: str, models: Sequence[str] | None,
             providers: Sequence[str], threads: int, workdir: str) -> tuple[list[dict[str, Any]], list[str], dict]:
    """One runner per (model, provider) that can be timed: ``(runners, skipped lines, TensorFlow info)``.

    A runner is ``{model, runtime, provider, provider_actual, run, spec}``.

    Raises:
        ConfigError: an unknown model name, or nothing to time.
    """
    import onnxruntime as ort

    repo_models = repository_models(repository)
    available = ([FULL_MODEL] if trained_dir is not None else []) + [m["name"] for m in repo_models]
    wanted = list(models) if models is not None else available
    missing = [m for m in wanted if m not in available]
    if missing:
        raise ConfigError(f"inproc: unknown model(s) {missing}; available: {available}")
    skipped: list[str] = []
    runners: list[dict[str, Any]] = []
    tf_info: dict[str, Any] = {"skipped": "no trained artifact given"} if trained_dir is None else {}
    if FULL_MODEL in wanted:
        log.info("inproc: exporting the full model to a SavedModel and loading its serving signature")
        run, tf_info = _tf_runner(trained_dir, threads, workdir)
        if run is None:
            skipped.append(f"{FULL_MODEL}: {tf_info['skipped']}")
            log.info("inproc: skipping %s: %s", FULL_MODEL, tf_info["skipped"])
        else:
            spec = FeatureSpec.load(str(Path(trained_dir) / "feature_spec.json"))
            runners.append({"model": FULL_MODEL, "runtime": "tensorflow", "provider": "cpu",
                            "provider_actual": "tensorflow CPU", "run": run, "spec": spec})
    have_ort = ort.get_available_providers()
    for m in repo_models:
        if m["name"] not in wanted:
            continue
        for provider in providers:
            if PROVIDERS[provider] not in have_ort:
                line = (f"{m['name']} on {provider}: ONNX Runtime {ort.__version__} has no "
                        f"{PROVIDERS[provider]} (available: {', '.join(have_ort)})")
                if line not in skipped:
                    skipped.append(line)
                    log.info("inproc: skipping %s", line)
                continue
            sess, actual = _ort_session(m["path"], provider, threads)
            if actual[0] != PROVIDERS[provider]:
                skipped.append(f"{m['name']} on {provider}: the session runs on {actual} instead")
                log.info("inproc: skipping %s", skipped[-1])
                continue
            meta = sess.get_modelmeta().custom_metadata_map
            spec = FeatureSpec.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else resolve_spec(data_path)

            def run(feeds: dict[str, np.ndarray], _s: Any = sess) -> np.ndarray:
                return _s.run([OUTPUT_CTR], feeds)[0]

            runners.append({"model": m["name"], "runtime": "onnxruntime", "provider": provider,
                            "provider_actual": actual[0], "run": run, "spec": spec})
    if not runners:
        raise ConfigError(f"inproc: nothing to time ({'; '.join(skipped) or 'no models'})")
    return runners, skipped, tf_info


def _attach_feeds(runners: list[dict[str, Any]], data_path: str, batches: Sequence[int]) -> dict[str, Any]:
    """Give every runner its feeds (read once per distinct FeatureSpec); returns what was read."""
    cache: dict[str, tuple[dict[int, list], dict[str, Any]]] = {}
    rows_info: dict[str, Any] = {}
    for r in runners:
        key = r["spec"].to_json()
        if key not in cache:
            cache[key] = _feeds_for(r["spec"], data_path, batches)
        r["feeds"], rows_info = cache[key]
    return rows_info


def _check_and_warm(runners: list[dict[str, Any]], batches: Sequence[int], check_b: int,
                    warmup: int) -> dict[str, float]:
    """Each model's max |difference| from TensorFlow on one batch, then ``warmup`` calls per batch size."""
    ref_runner = next((r for r in runners if r["runtime"] == "tensorflow"), None)
    ref_out = ref_runner["run"](ref_runner["feeds"][check_b][0]) if ref_runner else None
    diffs: dict[str, float] = {}
    for r in runners:
        out = r["run"](r["feeds"][check_b][0])
        if ref_out is not None and r is not ref_runner:
            diffs[f"{r['model']}@{r['provider']}"] = float(np.max(np.abs(np.asarray(out) - ref_out)))
        for b in batches:
            for i in range(max(1, warmup) if b < 1024 else 1):
                r["run"](r["feeds"][b][i % len(r["feeds"][b])])
    return diffs


def _timed_rounds(runners: list[dict[str, Any]], batches: Sequence[int], seconds: float,
                  rounds: int) -> tuple[dict, dict, dict]:
    """Interleaved bursts (the starting model rotates per round): ``(call times, CPU s, wall s)`` per cell."""
    times: dict[tuple[int, int], list[float]] = {(i, b): [] for i in range(len(runners)) for b in batches}
    cpu_s: dict[tuple[int, int], float] = dict.fromkeys(times, 0.0)
    wall_s: dict[tuple[int, int], float] = dict.fromkeys(times, 0.0)
    burst = seconds / rounds
    for rnd in range(rounds):
        for b in batches:
            order = list(range(len(runners)))
            order = order[rnd % len(order):] + order[:rnd % len(order)]
            for i in order:
                c0, w0 = time.process_time(), time.perf_counter()
                _burst(runners[i]["run"], runners[i]["feeds"][b], times[(i, b)], w0 + burst)
                cpu_s[(i, b)] += time.process_time() - c0
                wall_s[(i, b)] += time.perf_counter() - w0
        log.info("inproc: round %d/%d done", rnd + 1, rounds)
    return times, cpu_s, wall_s


def _burst(run: Runner, feeds: list[dict[str, np.ndarray]], ts: list[float], end: float) -> None:
    """Call ``run`` on the feeds in turn until ``end`` (at least once), appending each call's seconds to ``ts``."""
    k = len(ts)
    while True:
        f = feeds[k % len(feeds)]
        t0 = time.perf_counter()
        run(f)
        t1 = time.perf_counter()
        ts.append(t1 - t0)
        k += 1
        if t1 >= end:
            break


def _cells(runners: list[dict[str, Any]], times: dict, cpu_s: dict,
           wall_s: dict) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Per-cell statistics and speed-ups against TensorFlow: ``(cells in table order, {model: {batch: x}})``."""
    cells = []
    for (i, b), ts in times.items():
        r = runners[i]
        cells.append({"model": r["model"], "runtime": r["runtime"], "provider": r["provider"],
                      "provider_actual": r["provider_actual"], "batch": b, **_stats(ts, b),
                      "cpu_per_wall": cpu_s[(i, b)] / wall_s[(i, b)] if wall_s[(i, b)] else None})
    tf_p50 = {c["batch"]: c["p50_ms"] for c in cells if c["runtime"] == "tensorflow"}
    speedup: dict[str, dict[str, float]] = {}
    for c in cells:
        c["speedup_vs_tf"] = tf_p50[c["batch"]] / c["p50_ms"] if c["batch"] in tf_p50 else None
        if c["runtime"] == "onnxruntime" and c["speedup_vs_tf"] is not None and c["provider"] == "cpu":
            speedup.setdefault(c["model"], {})[str(c["batch"])] = c["speedup_vs_tf"]
    cells.sort(key=lambda c: (model_order(c["model"]), c["provider"], c["batch"]))
    for c in cells:
        log.info("inproc: %-17s %-4s batch %5d  p50 %9.3f ms  p99 %9.3f ms  %12s rows/s  (%d calls)",
                 c["model"], c["provider"], c["batch"], c["p50_ms"], c["p99_ms"], f"{c['rows_per_s']:,.0f}",
                 c["runs"])
    return cells, speedup


def inproc_latency_isolated(repository: str | os.PathLike[str], trained_dir: str | os.PathLike[str] | None,
                            data_path: str | os.PathLike[str], *, models: Sequence[str] | None = None,
                            batches: Sequence[int] = DEFAULT_BATCHES, seconds: float = 1.0,
                            providers: Sequence[str] = ("cpu",), threads: int = 1, rounds: int = 5,
                            warmup: int = 3, timeout: float | None = None) -> dict[str, Any]:
    """:func:`inproc_latency` in a fresh Python process (so TensorFlow's thread settings apply).

    Same arguments and result; progress lines go to this process's stderr.

    Raises:
        ConfigError: the child process failed (its last output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="ctredge-inproc-") as tmp:
        out = os.path.join(tmp, "inproc.json")
        cmd = [sys.executable, "-m", "ctredge.benchmarks.inproc", "--repository", str(repository),
               "--data", str(data_path), "--batches", ",".join(str(b) for b in batches),
               "--seconds", str(seconds), "--providers", ",".join(providers), "--threads", str(threads),
               "--rounds", str(rounds), "--warmup", str(warmup), "--out", out]
        if trained_dir is not None:
            cmd += ["--trained", str(trained_dir)]
        if models is not None:
            cmd += ["--models", ",".join(models)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(out):
            raise ConfigError(f"inproc: the benchmark process failed (exit {proc.returncode}): "
                              f"{proc.stdout.strip()[-2000:]}")
        return json.loads(Path(out).read_text())


def markdown_table(result: dict[str, Any]) -> str:
    """The cells of an :func:`inproc_latency` result as a Markdown table."""
    lines = ["| model | runtime | provider | batch | p50 ms | p99 ms | mean ms | rows/s | x TF (p50) | calls |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in result["cells"]:
        x = f"{c['speedup_vs_tf']:.2f}" if c.get("speedup_vs_tf") is not None else "-"
        lines.append(f"| {c['model']} | {c['runtime']} | {c['provider']} | {c['batch']} | {c['p50_ms']:.3f} | "
                     f"{c['p99_ms']:.3f} | {c['mean_ms']:.3f} | {c['rows_per_s']:,.0f} | {x} | {c['runs']} |")
    return "\n".join(lines)


__all__ = ["DEFAULT_BATCHES", "inproc_latency", "inproc_latency_isolated", "markdown_table"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.inproc", description=__doc__.splitlines()[0])
    p.add_argument("--repository", required=True)
    p.add_argument("--trained", help="trained artifact folder (the TensorFlow full model)")
    p.add_argument("--data", required=True, help="click log whose rows are the inputs")
    p.add_argument("--models", help="comma-separated names (default: all, keras-full included)")
    p.add_argument("--batches", default=",".join(str(b) for b in DEFAULT_BATCHES))
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per model, provider and batch")
    p.add_argument("--providers", default="cpu", help="comma-separated: cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (TF and ORT)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("ctredge").setLevel(logging.INFO)
    result = inproc_latency(args.repository, args.trained, args.data,
                            models=args.models.split(",") if args.models else None,
                            batches=[int(b) for b in args.batches.split(",")], seconds=args.seconds,
                            providers=args.providers.split(","), threads=args.threads, rounds=args.rounds,
                            warmup=args.warmup)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(markdown_table(result))
    for line in result["skipped"]:
        print(f"skipped: {line}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

