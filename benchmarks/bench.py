"""``ctredge bench``: accuracy, in-process latency, gRPC load, footprint, peer and GPU, into one report.

``ctredge bench --repository REPO --data TEST.tsv --out REPORT [--trained DIR] [--full]``

Sections (each can be skipped; a failed section is reported with its reason and the rest go on):

1. **accuracy** (:mod:`.accuracy`): the full Keras model (with ``--trained``) and
   every variant in the repository; with them (unless ``--skip baselines``) the
   cheap baselines of :mod:`.baselines` (hashed LR, LightGBM), fit on the
   trained artifact's training rows and scored on the same rows.
2. **inproc** (:mod:`.inproc`): the full model as TensorFlow serves it (a
   SavedModel signature) against the ONNX Runtime variants at batch 1, 16, 256,
   4096, in a fresh process so TensorFlow's thread settings hold.
3. **grpc** (:mod:`.load`, :mod:`.procs`): ``ctredge serve`` in its own process
   pinned to its cores, the closed-loop load generator on the others, 1-row and
   1-user x 256-candidate ranking requests at each concurrency, with dynamic
   batching on (and off with ``--full``), and the no-op ``floor`` model served by
   the same server for the floor ratios.
4. **footprint**: bytes, server RSS with the model alone, cold start.
5. **peer** (``--peer pytriton``, on with ``--full``): the same ONNX model through
   PyTriton in its own virtual environment, same load generator; ranking
   requests are sent to it as expanded rows (it does not broadcast).
   **perf_analyzer** (:mod:`.perf_analyzer`): Triton's own load generator
   against ctredge (the model and the floor) and, with the peer, PyTriton;
   its ``--input-data`` files are written into ``OUT/perf_analyzer/``.  Without
   ``make perf-tools`` it is skipped ("perf_analyzer not installed").
6. **gpu** (``--providers cpu,cuda``): in-process and gRPC runs on the CUDA
   execution provider against the CPU, when this onnxruntime has it.
7. **explain** (:mod:`.explain_cost`): what the ``attributions`` output costs
   (x of a plain request, batch 1 and 64, in-process server over gRPC) for
   ``ctr-fp32`` (every model with ``--full``), and a picture of the
   attributions of four of the same held-out rows the accuracy section scores.

Default (quick, what ``make run`` runs): ``ctr-fp32``, ``ctr-int8``, ``ctr-edge``
and the floor, a few seconds per cell.  ``--full``: every variant, batching on
and off, the peer.  Progress goes to the console; the report is ``report.md``,
``report.json`` and PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ctredge.errors import CtrEdgeError

log = logging.getLogger("ctredge.bench")

QUICK_MODELS = ("ctr-fp32", "ctr-int8", "ctr-edge")
FLOOR = "floor"
GPU_MODELS = ("ctr-fp32", "ctr-fp16")


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one ``ctredge bench`` run (recorded in report.json)."""

    repository: str
    data: str
    out: str
    trained: str | None = None
    full: bool = False
    models: tuple[str, ...] | None = None  # None: QUICK_MODELS, or every variant with --full
    seconds: float | None = None  # per gRPC cell; None: 2 (quick) or 5 (full)
    inproc_seconds: float | None = None  # per in-process cell; None: 0.5 (quick) or 1.5 (full)
    concurrency: tuple[int, ...] = (1, 8, 64)
    kinds: tuple[str, ...] = ("row", "ranking")
    ranking_rows: int = 256  # candidates per ranking request, rows per batch request
    batching: tuple[str, ...] | None = None  # None: ("on",) quick, ("on", "off") full
    batches: tuple[int, ...] = (1, 16, 256, 4096)
    providers: tuple[str, ...] = ("cpu",)
    peer: str | None = None  # "pytriton"; None: on with --full
    peer_venv: str = ".venv-pytriton"
    sections: tuple[str, ...] = ("accuracy", "baselines", "inproc", "grpc", "footprint", "peer", "perf_analyzer",
                                 "gpu", "explain")
    perf_venv: str = ".venv-perf"
    bootstrap: int = 200
    seed: int = 0
    pin: bool = True
    warmup_s: float = 0.5
    rounds: int | None = None  # interleaved rounds per gRPC cell; None: 2 (quick) or 3 (full)
    dp_trained: tuple[str, ...] = ()  # DP-SGD train artifacts scored beside the full model (accuracy section)

    def resolved(self, available: Sequence[str]) -> "BenchConfig":
        """Fill the defaults that depend on ``--full`` and on the repository's models."""
        from dataclasses import replace

        models = self.models or (tuple(available) if self.full else tuple(m for m in QUICK_MODELS
                                                                           if m in available))
        missing = [m for m in models if m not in available]
        if missing:
            raise CtrEdgeError(f"--models: {missing} not in the repository {self.repository}; it has {list(available)}")
        return replace(self, models=models,
                       seconds=self.seconds or (5.0 if self.full else 2.0),
                       rounds=self.rounds or (3 if self.full else 2),
                       inproc_seconds=self.inproc_seconds or (1.5 if self.full else 0.5),
                       batching=self.batching or (("on", "off") if self.full else ("on",)),
                       peer=self.peer if self.peer is not None else ("pytriton" if self.full else None))


# ------------------------------------------------------------------ helpers
def _section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one section; on failure record ``{"status": "failed", "reason": ...}`` and go on."""
    t0 = time.perf_counter()
    log.info("== %s", name)
    try:
        results[name] = fn()
    except Exception as exc:  # a section's failure must not lose the others
        log.error("%s failed: %s", name, exc)
        log.debug("%s", traceback.format_exc())
        results[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    log.info("== %s done in %.1fs", name, time.perf_counter() - t0)


def _spec_of(path: str) -> Any:
    from ctredge.export.onnx import load_spec_from_onnx

    spec = load_spec_from_onnx(path)
    if spec is None:
        raise CtrEdgeError(f"{path} has no ctredge FeatureSpec in its metadata; ctredge bench needs ctredge models")
    return spec


def _latest_onnx(repository: Path, model: str) -> str:
    """The newest ``model.onnx`` of ``model`` (:class:`ctredge.layout.RepositoryLayout`)."""
    from ctredge.layout import RepositoryLayout

    layout = RepositoryLayout(repository)
    version = layout.latest(model)
    if version is None:
        raise CtrEdgeError(f"{layout.model_dir(model)}: no version folder with a model.onnx")
    return str(layout.model_path(model, version))


def _rename(requests: list[bytes], model: str) -> list[bytes]:
    """The same serialized requests addressed to ``model``."""
    from tritonclient.grpc import service_pb2 as pb

    out = []
    for raw in requests:
        req = pb.ModelInferRequest.FromString(raw)
        req.model_name = model
        out.append(req.SerializeToString())
    return out


def _bench_repository(cfg: BenchConfig, models: Sequence[str], spec: Any, work: Path) -> Path:
    """A repository of symlinks to ``models`` plus the no-op floor model (same FeatureSpec)."""
    from ctredge.benchmarks.floor import write_noop_model

    repo = work / "repository"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    src = Path(cfg.repository).resolve()
    for m in models:
        (repo / m).symlink_to(src / m, target_is_directory=True)
    write_noop_model(spec, repo, name=FLOOR)
    return repo


# ------------------------------------------------------------------ sections
def _combine(runs: list[dict[str, Any]], rows_per_request: int) -> dict[str, Any]:
    """One cell from its interleaved rounds: counts summed, rates over the summed time, percentiles the median."""
    import statistics

    seconds = sum(r["seconds"] for r in runs) or float("nan")
    errors: dict[str, int] = {}
    for r in runs:
        for code, n in (r["errors"] if isinstance(r["errors"], dict) else {}).items():
            errors[code] = errors.get(code, 0) + n
    out = dict(runs[-1])
    out.update({
        "requests": sum(r["requests"] for r in runs), "ok": sum(r["ok"] for r in runs), "seconds": seconds,
        "req_per_s": sum(r["requests"] for r in runs) / seconds,
        "predictions_per_s": sum(r["ok"] for r in runs) * rows_per_request / seconds,
        "errors": sum(errors.values()), "errors_by_code": errors,
        "client_saturated": any(r.get("client_saturated") for r in runs),
        "rounds": [{k: r.get(k) for k in ("p50_ms", "p99_ms", "predictions_per_s", "seconds")} for r in runs],
    })
    for key in ("p50_ms", "p95_ms", "p99_ms", "mean_ms"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    out["max_ms"] = max((r["max_ms"] for r in runs if r.get("max_ms") is not None), default=None)
    return out


def _grpc(cfg: BenchConfig, repo: Path, models: Sequence[str], requests: dict[str, list[bytes]],
          plan: dict[str, Any], provider: str = "cpu") -> list[dict[str, Any]]:
    """Every (batching, kind, concurrency) cell for the floor and ``models``, one server per batching mode.

    Within a cell the (batching mode, model) pairs are measured in ``cfg.rounds`` interleaved rounds
    (floor, model 1, ..., then the other mode's server, then again), so drifting background load hits them
    alike; see :func:`_combine`.
    """
    from ctredge.benchmarks.load import rows_per_request, run_load
    from ctredge.benchmarks.procs import ServerProcess

    import contextlib

    rows = []
    server_cpus = plan["server_cpus"] if plan["pinned"] else None
    client_cpus = plan["client_cpus"] if plan["pinned"] else None
    names = (FLOOR, *models)
    with contextlib.ExitStack() as stack:
        # one server per batching mode, side by side on the same cores (an idle one costs nothing), so the
        # modes are measured in the same alternating rounds as the models
        servers = {}
        for batching in cfg.batching:
            srv = stack.enter_context(ServerProcess(repo, ["--batching", batching, "--providers", provider],
                                                    cpus=server_cpus, label=f"bench-{provider}-{batching}"))
            servers[batching] = srv
            log.info("server %s (batching %s, provider %s) on %s", srv.url, batching, provider,
                     server_cpus or "any core")
        for kind in cfg.kinds:
            reqs = {m: _rename(requests[kind], m) for m in names}
            per = rows_per_request(kind, cfg.ranking_rows)
            for c in cfg.concurrency:
                runs: dict[tuple[str, str], list[dict[str, Any]]] = {(b, m): [] for b in servers for m in names}
                for _ in range(cfg.rounds):
                    for (b, m), got in runs.items():
                        got.append(run_load(servers[b].url, reqs[m], concurrency=c,
                                            duration_s=cfg.seconds / cfg.rounds, rows_per_request=per,
                                            warmup_s=cfg.warmup_s, cpus=client_cpus))
                for (b, m), got in runs.items():
                    r = _combine(got, per)
                    rows.append({**r, "model": m, "kind": kind, "rows_per_request": per, "concurrency": c,
                                 "batching": b, "server": "ctredge", "provider": provider, "floor": m == FLOOR})
                    log.info("grpc %-16s %-7s c=%-3d batching %-3s %s: p50 %.3f ms p99 %.3f ms, %.0f preds/s%s",
                             m, kind, c, b, provider, r["p50_ms"] or float("nan"), r["p99_ms"] or float("nan"),
                             r["predictions_per_s"], " (client saturated)" if r.get("client_saturated") else "")
    return rows


def _footprint(cfg: BenchConfig, repo: Path, models: Sequence[str], requests: dict[str, list[bytes]],
               plan: dict[str, Any]) -> list[dict[str, Any]]:
    from ctredge.benchmarks.procs import baseline_rss, footprint

    cpus = plan["server_cpus"] if plan["pinned"] else None
    out = []
    base = baseline_rss(["--providers", "cpu"], cpus=cpus)
    for model in (FLOOR, *models):
        f = footprint(repo, model, _rename(requests["row"][:1], model)[0], extra_args=["--providers", "cpu"],
                      cpus=cpus, n_requests=100)
        f["bytes"] = f.get("onnx_bytes")
        f["rss_bytes"] = f.get("rss_after_bytes")
        f["empty_server_rss_bytes"] = base.get("rss_bytes")
        f["floor"] = model == FLOOR
        out.append(f)
    return out


def _peer(cfg: BenchConfig, repo: Path, spec: Any, plan: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    from ctredge.benchmarks.load import build_requests, rows_per_request, run_load
    from ctredge.benchmarks.peer_pytriton import PeerError, PeerServer, ensure_venv

    if cfg.peer != "pytriton":
        return {"status": "skipped", "reason": f"unknown peer {cfg.peer!r}; expected 'pytriton'"}
    model = "ctr-fp32" if (repo / "ctr-fp32").exists() else cfg.models[0]
    try:
        python = ensure_venv(Path(cfg.peer_venv))
    except PeerError as exc:
        return {"status": "skipped", "reason": f"the PyTriton environment could not be built: {exc}",
                "server": "pytriton"}
    from ctredge.benchmarks.procs import ServerProcess

    server_cpus = plan["server_cpus"] if plan["pinned"] else None
    client_cpus = plan["client_cpus"] if plan["pinned"] else None
    rows, paired = [], []
    with PeerServer(_latest_onnx(repo, model), python=python, cpus=server_cpus, batching=True) as peer, \
            ServerProcess(repo, ["--batching", "on", "--providers", "cpu"], cpus=server_cpus,
                          label="bench-vs-peer") as ours:
        for kind in cfg.kinds:
            per = rows_per_request(kind, cfg.ranking_rows)
            theirs_reqs = build_requests(spec, cfg.data, peer.model_name, kind, rows=cfg.ranking_rows, count=64,
                                         form="ids", expand_ranking=True)
            our_reqs = build_requests(spec, cfg.data, model, kind, rows=cfg.ranking_rows, count=64, form="ids")
            for c in cfg.concurrency:
                runs: dict[str, list[dict[str, Any]]] = {"ctredge": [], "pytriton": []}
                for _ in range(cfg.rounds):  # alternating rounds: drifting load hits both alike
                    for name, url, reqs in (("ctredge", ours.url, our_reqs), ("pytriton", peer.url, theirs_reqs)):
                        runs[name].append(run_load(url, reqs, concurrency=c, duration_s=cfg.seconds / cfg.rounds,
                                                   rows_per_request=per, warmup_s=cfg.warmup_s, cpus=client_cpus))
                for name, target in (("ctredge", paired), ("pytriton", rows)):
                    r = _combine(runs[name], per)
                    target.append({**r, "model": model, "kind": kind, "rows_per_request": per, "concurrency": c,
                                   "batching": "on", "server": name, "provider": "cpu"})
                log.info("peer %-7s c=%-3d: ctredge p50 %.3f ms %.0f preds/s | pytriton p50 %.3f ms %.0f preds/s",
                         kind, c, paired[-1]["p50_ms"] or float("nan"), paired[-1]["predictions_per_s"],
                         rows[-1]["p50_ms"] or float("nan"), rows[-1]["predictions_per_s"])
        info = {"settings": peer.settings(), "memory": peer.memory(), "ready_s": peer.ready_s, "paired": paired}
    results.setdefault("grpc", [])
    if isinstance(results["grpc"], list):
        results["grpc"].extend(rows)
    return {"status": "measured", "reason": "", "server": "pytriton", "model": model,
            "note": "PyTriton gets ranking requests as 256 expanded rows of ids (it does not broadcast the user "
                    "side); ctredge gets the user side once", **info}


def _perf_analyzer(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    """:func:`ctredge.benchmarks.perf_analyzer.bench_section` on ``ctr-fp32`` (else the first model).

    ``--full``: 1-row requests at concurrency 1, 16, 64, 256 and ranking requests at 1 and 16, ``cfg.rounds``
    rounds of 2 s windows; the quick mode: 1-row at 1 and 64, ranking at 1, one round of 1 s windows.
    """
    from ctredge.benchmarks.perf_analyzer import CONCURRENCY, RANKING_CONCURRENCY, PaConfig, bench_section

    model = "ctr-fp32" if "ctr-fp32" in cfg.models else cfg.models[0]
    return bench_section(PaConfig(repository=cfg.repository, model=model, data=cfg.data, out=str(out / "perf_analyzer"),
                                  peer=cfg.peer, peer_venv=cfg.peer_venv, perf_venv=cfg.perf_venv,
                                  concurrency=CONCURRENCY if cfg.full else (1, 64),
                                  ranking_concurrency=RANKING_CONCURRENCY if cfg.full else (1,),
                                  ranking_rows=cfg.ranking_rows, rounds=cfg.rounds if cfg.full else 1,
                                  measurement_ms=2000 if cfg.full else 1000, pin=cfg.pin))


#: calls per cell of the explain section (quick, --full)
EXPLAIN_CALLS = (100, 300)
EXPLAIN_PICTURE = "explain_attributions.png"


def _explain(cfg: BenchConfig, spec: Any, out: Path) -> dict[str, Any]:
    """:func:`ctredge.benchmarks.explain_cost.measure` for ``ctr-fp32`` (every model with ``--full``).

    The rows are the accuracy section's: the trained artifact's test split of
    ``--data`` when ``--trained`` says so, else every row of ``--data``.  The
    first model's held-out attributions are drawn into ``OUT/explain_attributions.png``.
    """
    from ctredge.artifacts import read_manifest
    from ctredge.benchmarks.accuracy import evaluation_rows
    from ctredge.benchmarks.explain_cost import measure, plot

    manifest = read_manifest(cfg.trained, stage=("train", "prune")) if cfg.trained else None
    rows, info = evaluation_rows(manifest, cfg.data, spec)
    first = "ctr-fp32" if "ctr-fp32" in cfg.models else cfg.models[0]
    models = list(cfg.models) if cfg.full else [first]
    calls = EXPLAIN_CALLS[1] if cfg.full else EXPLAIN_CALLS[0]
    measured = []
    for model in models:
        res = measure(cfg.repository, cfg.data, model=model, calls=calls, warmup=max(10, calls // 10), rows=rows)
        res.update(rows_source=info["rows_source"])
        measured.append(res)
    try:
        plot(measured[0], str(out / EXPLAIN_PICTURE))
        picture: str | None = EXPLAIN_PICTURE
    except ImportError as exc:  # matplotlib is in the bench extra; without it the table still stands
        picture = None
        log.warning("explain: no picture (%s)", exc)
    return {"models": measured, "calls": calls, "rows_source": info["rows_source"], "picture": picture}


def _gpu(cfg: BenchConfig, repo: Path, requests: dict[str, list[bytes]], plan: dict[str, Any]) -> dict[str, Any]:
    from ctredge.benchmarks.inproc import inproc_latency
    from ctredge.serve.runtime import CUDA, available_providers

    if CUDA not in available_providers():
        return {"status": "not measured",
                "reason": f"this onnxruntime has no CUDA execution provider ({available_providers()})"}
    models = [m for m in GPU_MODELS if (Path(cfg.repository) / m).is_dir()]
    inproc = inproc_latency(cfg.repository, None, cfg.data, models=models, batches=cfg.batches,
                            seconds=cfg.inproc_seconds, providers=("cpu", "cuda"))
    rows = _grpc(cfg, repo, models, requests, plan, provider="cuda")
    device = ""
    try:
        import subprocess

        device = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"status": "measured", "reason": "", "device": device, "models": models,
            "cells": inproc.get("cells", []), "inproc": inproc, "grpc": rows}


# ------------------------------------------------------------------ main
def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every section of ``cfg``; write report.md/json and plots to ``cfg.out``; return the results."""
    from ctredge.benchmarks.load import build_requests
    from ctredge.benchmarks.procs import cpu_plan
    from ctredge.benchmarks.report import machine_info, write_report

    t0 = time.perf_counter()
    repository = Path(cfg.repository)
    if not repository.is_dir():
        raise CtrEdgeError(f"--repository {repository} is not a folder (run `ctredge compress all` first)")
    if not Path(cfg.data).is_file():
        raise CtrEdgeError(f"--data {cfg.data} is not a file")
    from ctredge.benchmarks.accuracy import repository_models

    available = [m["name"] for m in repository_models(repository)]  # in the tables' order
    if not available:
        raise CtrEdgeError(f"--repository {repository} holds no model (REPO/<model>/<version>/model.onnx)")
    cfg = cfg.resolved(available)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    spec = _spec_of(_latest_onnx(repository, cfg.models[0]))
    plan = cpu_plan() if cfg.pin else {"pinned": False, "server_cpus": [], "client_cpus": [],
                                       "reason": "pinning turned off (--no-pin)"}
    results: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                     "command": " ".join(sys.argv), "pinning": plan["reason"], "cpu_plan": plan},
    }
    log.info("bench: models %s (+ floor), repository %s, data %s; %s", ", ".join(cfg.models), repository, cfg.data,
             plan["reason"])
    want = set(cfg.sections)
    if "accuracy" in want:
        from ctredge.benchmarks.accuracy import accuracy_table

        _section(results, "accuracy", lambda: accuracy_table(cfg.repository, cfg.trained, cfg.data,
                                                             bootstrap=cfg.bootstrap, seed=cfg.seed,
                                                             with_baselines="baselines" in want,
                                                             dp_trained=cfg.dp_trained))
    if "inproc" in want:
        from ctredge.benchmarks.inproc import inproc_latency_isolated

        from ctredge.benchmarks.accuracy import FULL_MODEL

        _section(results, "inproc", lambda: inproc_latency_isolated(
            cfg.repository, cfg.trained, cfg.data, models=([FULL_MODEL] if cfg.trained else []) + list(cfg.models),
            batches=cfg.batches,
            seconds=cfg.inproc_seconds, providers=("cpu",)))
    need_server = want & {"grpc", "footprint", "gpu"} or ("peer" in want and cfg.peer)
    requests: dict[str, list[bytes]] = {}
    repo = None
    if need_server:
        repo = _bench_repository(cfg, list(cfg.models), spec, work)
        for kind in cfg.kinds + (("row",) if "row" not in cfg.kinds else ()):
            requests[kind] = build_requests(spec, cfg.data, FLOOR, kind, rows=cfg.ranking_rows, count=64, form="ids")
    if "grpc" in want:
        _section(results, "grpc", lambda: _grpc(cfg, repo, cfg.models, requests, plan))
    if "footprint" in want:
        _section(results, "footprint", lambda: _footprint(cfg, repo, cfg.models, requests, plan))
    if "peer" in want:
        if cfg.peer:
            _section(results, "peer", lambda: _peer(cfg, repo, spec, plan, results))
        else:
            results["peer"] = {"status": "not measured", "reason": "no --peer given (ctredge bench --peer pytriton, "
                                                                   "or --full)"}
    if "perf_analyzer" in want:
        _section(results, "perf_analyzer", lambda: _perf_analyzer(cfg, out))
    if "gpu" in want:
        if "cuda" in cfg.providers:
            _section(results, "gpu", lambda: _gpu(cfg, repo, requests, plan))
        else:
            results["gpu"] = {"status": "not measured", "reason": "no --providers cuda (benchmarks/gpu.sh runs it on "
                                                                  "a GPU machine)"}
    if "explain" in want:
        _section(results, "explain", lambda: _explain(cfg, spec, out))
    results["settings"]["seconds_total"] = round(time.perf_counter() - t0, 1)
    report = write_report(results, out)
    if repo is not None:
        shutil.rmtree(work, ignore_errors=True)
    log.info("bench done in %.0fs: %s", time.perf_counter() - t0, report)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ctredge bench`` options."""
    p.add_argument("--repository", required=True, help="model repository (ctredge compress all)")
    p.add_argument("--data", required=True, help="click log to measure on (the training file: its test split)")
    p.add_argument("--out", required=True, help="report folder (report.md, report.json, PNGs)")
    p.add_argument("--trained", help="trained artifact folder: the full Keras model for accuracy and TF latency")
    p.add_argument("--full", action="store_true", help="every variant, batching on and off, the PyTriton peer")
    p.add_argument("--models", help="comma-separated repository models (default: ctr-fp32,ctr-int8,ctr-edge; "
                                    "--full: all)")
    p.add_argument("--seconds", type=float, help="measured seconds per gRPC cell (default 2, --full 5)")
    p.add_argument("--rounds", type=int, help="interleaved rounds the seconds of a gRPC cell are split into "
                                             "(default 2, --full 3)")
    p.add_argument("--inproc-seconds", type=float, help="seconds per in-process cell (default 0.5, --full 1.5)")
    p.add_argument("--concurrency", default="1,8,64", help="requests in flight (comma-separated)")
    p.add_argument("--batching", help="on,off (default: on; --full: on,off)")
    p.add_argument("--kinds", default="row,ranking",
                   help="gRPC request kinds: row (1 row), ranking (1 user x --rows candidates), batch (--rows rows)")
    p.add_argument("--rows", type=int, default=256, help="candidates per ranking request, rows per batch request")
    p.add_argument("--providers", default="cpu", help="cpu or cpu,cuda (GPU section)")
    p.add_argument("--peer", choices=("pytriton", "none"), help="serve the same model through a peer server too")
    p.add_argument("--skip", default="",
                   help="sections to skip: accuracy,baselines,inproc,grpc,footprint,peer,perf_analyzer,gpu,"
                        "explain")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and clients to cores")
    p.add_argument("--dp-trained", default="",
                   help="comma-separated DP-SGD train artifacts (ctredge train --dp-epsilon) to score beside the "
                        "full model on the same rows: their AUC cost, epsilon and training rows/s cost")
    p.add_argument("--bootstrap", type=int, default=200, help="paired bootstrap resamples for the dAUC interval")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    skip = {s for s in args.skip.split(",") if s}
    sections = tuple(s for s in BenchConfig.__dataclass_fields__["sections"].default if s not in skip)
    unknown = skip - set(BenchConfig.__dataclass_fields__["sections"].default)
    if unknown:
        raise CtrEdgeError(f"--skip: unknown section(s) {sorted(unknown)}")
    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise CtrEdgeError(f"--concurrency: expected comma-separated integers, got {args.concurrency!r}") from None
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or not set(kinds) <= {"row", "ranking", "batch"}:
        raise CtrEdgeError(f"--kinds: expected some of row,ranking,batch; got {args.kinds!r}")
    if args.rows < 1:
        raise CtrEdgeError(f"--rows: expected >= 1, got {args.rows}")
    batching = tuple(args.batching.split(",")) if args.batching else None
    if batching and not set(batching) <= {"on", "off"}:
        raise CtrEdgeError(f"--batching: expected on, off or on,off; got {args.batching!r}")
    return BenchConfig(repository=args.repository, data=args.data, out=args.out, trained=args.trained,
                       full=args.full, models=tuple(args.models.split(",")) if args.models else None,
                       seconds=args.seconds, inproc_seconds=args.inproc_seconds, concurrency=concurrency,
                       kinds=kinds, ranking_rows=args.rows, rounds=args.rounds,
                       dp_trained=tuple(d for d in args.dp_trained.split(",") if d),
                       batching=batching, providers=tuple(args.providers.split(",")),
                       peer=None if args.peer == "none" else args.peer if args.peer else (None if not args.full
                                                                                         else "pytriton"),
                       sections=sections, pin=not args.no_pin, bootstrap=args.bootstrap)


def main(argv: Sequence[str] | None = None) -> int:
    from ctredge.benchmarks.report import summary_table

    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ctredge").setLevel(logging.INFO)
    try:
        results = run_bench(config_from_args(args))
    except CtrEdgeError as exc:
        print(f"ctredge bench: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(results))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
