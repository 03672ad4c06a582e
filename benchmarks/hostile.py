"""The hostile-client harness: issue 12's attacks against ``ctredge serve``, one at a time, measured.

::

    python -m ctredge.benchmarks.hostile --repository REPO [--model ctr-fp32] [--out DIR] [--quick]
        [--model-control-mode explicit] [--idle-seconds 30] [--attacks a,b,...] [--server-args "..."]

Starts ``python -m ctredge.cli serve --repository REPO --port 0 --metrics-port 0``
(plus ``--model-control-mode`` and ``--server-args`` when given) in a child
process (:class:`~ctredge.benchmarks.procs.ServerProcess`), then replays each
attack of :mod:`ctredge.benchmarks.hostile_attacks` and records, per attack:

* the status codes the hostile calls got (count of each), the first 200
  characters of the first error message, and the attack's own figures;
* ``wall_s``: the wall time of the hostile calls;
* the server's ``VmRSS`` (``/proc/PID/status``) just before, right after, and
  after ``--idle-seconds`` of idling (30 s; 3 s with ``--quick``);
* the p50/p99 of the *probe*: a separate process sending ordinary 1-row
  requests (zeros: valid ids) one after the other, every 10 ms at most, to the
  same model; ``quiet`` is the ``--quiet-seconds`` just before the attack,
  ``attack`` every probe call that overlapped the hostile calls.  The probe
  runs in its own process so the harness's own work (building 50 MB messages,
  2,000 asyncio calls) does not slow it down through the GIL; it still shares
  the machine's cores with the server and the harness.

A server that died (or stopped serving the model) is restarted before the next
attack, and the row says so.  Results go to ``DIR/hostile.json`` and a Markdown
table ``DIR/hostile.md`` (also printed).  The harness reports; it never judges
timings.  All traffic goes to 127.0.0.1, every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import queue
import re
import signal
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ctredge.benchmarks import hostile_attacks as A
from ctredge.benchmarks import hostile_calls as H
from ctredge.benchmarks.procs import ServerProcess, read_proc_status
from ctredge.errors import CtrEdgeError
from ctredge.features import METADATA_KEY, FeatureSpec

log = logging.getLogger("ctredge.benchmarks")

METRICS_LINE = re.compile(r"metrics on http://(?P<host>[^\s/]+):(?P<port>\d+)/metrics")
PROBE_INTERVAL_S = 0.01
PROBE_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- the probe stream
def _probe_main(url: str, payload: bytes, running: Any, stop: Any, queue: Any, ready: Any) -> None:
    """Child process: sequential ModelInfer calls while ``running`` is set; samples ``(t0, seconds, code)``.

    ``ready`` is set after the first call (answered or not).
    """
    import grpc

    batch: list[tuple[float, float, str]] = []
    last_flush = time.monotonic()
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(H.MODEL_INFER, request_serializer=None, response_deserializer=None)
        while not stop.is_set():
            if not running.wait(0.05):
                if batch:
                    queue.put(batch)
                    batch = []
                continue
            t0 = time.monotonic()
            try:
                call(payload, timeout=PROBE_TIMEOUT_S)
                code = "OK"
            except grpc.RpcError as exc:
                code = getattr(exc.code(), "name", "UNKNOWN")
            dt = time.monotonic() - t0
            batch.append((t0, dt, code))
            ready.set()
            now = time.monotonic()
            if now - last_flush > 0.1:
                queue.put(batch)
                batch, last_flush = [], now
            time.sleep(max(0.0, PROBE_INTERVAL_S - dt))
    if batch:
        queue.put(batch)


class Probe:
    """The ordinary request stream in a child process; :meth:`window` gives latency figures for a time span."""

    def __init__(self, url: str, payload: bytes):
        ctx = multiprocessing.get_context("spawn")
        self._running, self._stop, self._queue, ready = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Event()
        self._proc = ctx.Process(target=_probe_main,
                                 args=(url, payload, self._running, self._stop, self._queue, ready),
                                 daemon=True, name="ctredge-hostile-probe")
        self.samples: list[tuple[float, float, str]] = []
        self._proc.start()
        self._running.set()
        if not ready.wait(PROBE_TIMEOUT_S + 30):  # imports, then the first call: quiet windows start after it
            log.warning("the probe process sent no request within %.0f s", PROBE_TIMEOUT_S + 30)

    def pause(self) -> None:
        """Stop sending (the call in flight finishes)."""
        self._running.clear()

    def resume(self) -> None:
        """Send again."""
        self._running.set()

    def _drain(self) -> None:
        """Move what the child has sent into :attr:`samples` (bounded: the child keeps sending)."""
        time.sleep(0.25)  # the child flushes every 0.1 s
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            try:
                self.samples.extend(self._queue.get_nowait())
            except queue.Empty:
                return

    def window(self, t0: float, t1: float, *, overlap: bool = False) -> dict[str, Any]:
        """p50/p99 (ms), count and non-OK count of the calls that started in ``[t0, t1]`` (or overlapped it)."""
        self._drain()
        if overlap:
            picked = [s for s in self.samples if s[0] <= t1 and s[0] + s[1] >= t0]
        else:
            picked = [s for s in self.samples if t0 <= s[0] <= t1]
        lat = sorted(s[1] * 1e3 for s in picked if s[2] == "OK")
        return {"n": len(picked), "ok": len(lat), "errors": len(picked) - len(lat),
                "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99), "max_ms": round(lat[-1], 3) if lat else None}

    def close(self) -> None:
        """Stop the child process (killed if it does not end within the call timeout)."""
        self._stop.set()
        self._running.set()
        self._proc.join(timeout=PROBE_TIMEOUT_S + 5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return round(sorted_values[k], 3)


# ----------------------------------------------------------------------------- server and model
def model_spec(repository: str | Path, model: str) -> FeatureSpec:
    """The FeatureSpec in the ONNX metadata (``ctredge.feature_spec``) of ``model``'s latest version.

    Raises:
        CtrEdgeError: no such model, or a model without ctredge metadata.
    """
    import onnxruntime as ort

    from ctredge.benchmarks.accuracy import repository_models

    found = [m for m in repository_models(repository) if m["name"] == model]
    if not found:
        raise CtrEdgeError(f"{repository}: no model folder {model!r} with a version holding model.onnx")
    session = ort.InferenceSession(found[0]["path"], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in meta:
        raise CtrEdgeError(f"{found[0]['path']}: no {METADATA_KEY} metadata (not a ctredge model)")
    return FeatureSpec.from_json(meta[METADATA_KEY])


def _metrics_url(srv: ServerProcess, timeout: float = 10.0) -> str | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            m = METRICS_LINE.search(srv.stderr_path.read_text(errors="replace"))
        except OSError:
            m = None
        if m:
            return f"http://127.0.0.1:{m.group('port')}/metrics"
        time.sleep(0.05)
    return None


def _option(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


class Harness:
    """Runs attacks against one ``ctredge serve`` child process (restarted when an attack ends it)."""

    def __init__(self, repository: str | Path, model: str, *, server_args: Sequence[str] = (), quick: bool = False,
                 idle_seconds: float = 30.0, quiet_seconds: float = 2.0, log_dir: Path | None = None):
        self.repository, self.model, self.quick = str(repository), model, quick
        self.idle_seconds, self.quiet_seconds = idle_seconds, quiet_seconds
        self.server_args = ["--metrics-port", "0", *server_args]
        self.log_dir = log_dir
        self.spec = model_spec(repository, model)
        self.ordinary = H.ordinary_request(self.spec, model)
        mb = _option(self.server_args, "--max-message-mb")
        if mb is None:
            from ctredge.serve.server import DEFAULT_MAX_MESSAGE_BYTES
            self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        else:
            self.max_message_bytes = int(mb) * 1024 * 1024
        grace = _option(self.server_args, "--grace-seconds")
        self.grace_seconds = float(grace) if grace else 5.0
        self.srv: ServerProcess | None = None
        self.probe: Probe | None = None
        self.starts = 0
        self.metrics_url: str | None = None

    def start(self) -> None:
        """(Re)start the server and the probe."""
        self.stop()
        self.starts += 1
        self.srv = ServerProcess(self.repository, self.server_args, model=self.model, request=self.ordinary,
                                 log_dir=self.log_dir, label=f"hostile-server-{self.starts}").start()
        self.metrics_url = _metrics_url(self.srv)
        self.probe = Probe(self.srv.url, self.ordinary)

    def stop(self) -> None:
        """Stop the probe and the server (SIGTERM, then SIGKILL)."""
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        if self.srv is not None:
            self.srv.stop()
            self.srv = None

    def serving(self) -> bool:
        """The server process is alive and answers the ordinary request OK."""
        if self.srv is None or self.srv.proc is None or self.srv.proc.poll() is not None:
            return False
        ctx = self._ctx()
        try:
            return H.call_raw(ctx, self.ordinary, timeout=10)[0] == "OK"
        finally:
            ctx.close()

    def _ctx(self) -> H.Ctx:
        assert self.srv is not None and self.srv.url is not None and self.srv.pid is not None
        return H.Ctx(url=self.srv.url, pid=self.srv.pid, model=self.model, spec=self.spec,
                     metrics_url=self.metrics_url, max_message_bytes=self.max_message_bytes, quick=self.quick,
                     grace_seconds=self.grace_seconds)

    def _rss(self) -> int | None:
        alive = self.srv is not None and self.srv.proc is not None and self.srv.proc.poll() is None
        return read_proc_status(self.srv.pid).get("VmRSS") if alive and self.srv.pid else None

    def run_one(self, attack: A.Attack) -> dict[str, Any]:
        """One attack: quiet probe window, RSS before, the calls, RSS after, idle wait, RSS idle."""
        restarted = False
        if not self.serving():
            self.start()
            restarted = True
        assert self.probe is not None
        self.probe.resume()
        q0 = time.monotonic()
        time.sleep(self.quiet_seconds)
        t0 = time.monotonic()
        rss_before = self._rss()
        if not attack.probe:
            self.probe.pause()
        ctx = self._ctx()
        error = None
        try:
            outcome = attack.fn(ctx)
        except Exception as exc:  # a harness-side failure is reported, not raised: the other attacks still run
            log.exception("attack %s failed in the harness", attack.name)
            outcome, error = H.Outcome(), f"{type(exc).__name__}: {exc}"[:H.MESSAGE_CHARS]
        finally:
            ctx.close()
        t1 = time.monotonic()
        rss_after = self._rss()
        w0, w1 = outcome.window or (t0, t1)
        self.probe.resume()
        if attack.terminal and self.srv is not None and self.srv.proc is not None:
            try:
                exit_code = self.srv.proc.wait(timeout=self.grace_seconds + 30)
            except Exception:
                exit_code = None
            outcome.extra["server_exit_code"] = exit_code
            outcome.extra["server_exit_after_attack_s"] = round(time.monotonic() - t1, 3)
        if self._rss() is not None:
            time.sleep(self.idle_seconds)
        rss_idle = self._rss()
        quiet = self.probe.window(q0, t0)
        during = self.probe.window(w0, w1, overlap=True) if attack.probe else None
        alive = self.srv is not None and self.srv.proc is not None and self.srv.proc.poll() is None
        codes = dict(outcome.codes.most_common())
        return {"attack": attack.name, "group": attack.group, "description": attack.description,
                "calls": sum(codes.values()), "code": next(iter(codes), None), "codes": codes,
                "message": outcome.message, "wall_s": round(w1 - w0, 4), "rss_before": rss_before,
                "rss_after": rss_after, "rss_idle": rss_idle, "probe_quiet": quiet, "probe_attack": during,
                "server_alive_after": alive, "server_restarted_before": restarted, "harness_error": error,
                "extra": {**outcome.extra, **({"probe_ok_during": during["ok"]}
                                               if during and "stats_success_delta" in outcome.extra else {})}}

    def run(self, attacks: Sequence[A.Attack]) -> list[dict[str, Any]]:
        """Every attack in order (a terminal one is moved last); the server is stopped at the end."""
        ordered = [a for a in attacks if not a.terminal] + [a for a in attacks if a.terminal]
        rows = []
        try:
            self.start()
            for a in ordered:
                log.info("attack %s: %s", a.name, a.description)
                rows.append(self.run_one(a))
                log.info("attack %s: %s", a.name, rows[-1]["codes"])
        finally:
            self.stop()
        return rows


# ----------------------------------------------------------------------------- report
def _mb(v: int | None) -> str:
    return "-" if v is None else f"{v / 1e6:,.0f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _cell(text: Any, limit: int = 90) -> str:
    s = str(text).replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= limit else s[:limit - 1] + "…"


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table (status counts, first message, wall time, RSS MB, probe ms)."""
    lines = [f"# Hostile-client run: {report['model']} in {report['repository']}", "",
             f"server: `{' '.join(report['server_command'])}`; idle wait {report['idle_seconds']} s; "
             f"quiet window {report['quiet_seconds']} s; quick: {report['quick']}", "",
             "| # | attack | statuses | first message | wall s | RSS MB before / after / idle "
             "| probe p50/p99 ms quiet | probe p50/p99 ms during (n, errors) | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        codes = ", ".join(f"{k} {v}" for k, v in r["codes"].items()) or "-"
        q, d = r["probe_quiet"], r["probe_attack"]
        during = "paused" if d is None else f"{_ms(d['p50_ms'])} / {_ms(d['p99_ms'])} ({d['n']}, {d['errors']})"
        notes = dict(r["extra"])
        if r["harness_error"]:
            notes["harness_error"] = r["harness_error"]
        if not r["server_alive_after"]:
            notes["server_alive_after"] = False
        if r["server_restarted_before"]:
            notes["restarted_before"] = True
        lines.append(f"| {r['group']} | {r['attack']} | {codes} | {_cell(r['message'] or '-')} | {r['wall_s']:.2f} "
                     f"| {_mb(r['rss_before'])} / {_mb(r['rss_after'])} / {_mb(r['rss_idle'])} "
                     f"| {_ms(q['p50_ms'])} / {_ms(q['p99_ms'])} | {during} "
                     f"| {_cell(json.dumps(notes, default=str) if notes else '', 160)} |")
    return "\n".join(lines) + "\n"


def select(names: str | None) -> list[A.Attack]:
    """The attacks named (comma-separated), all of them when None.

    Raises:
        CtrEdgeError: an unknown name.
    """
    if not names:
        return list(A.ATTACKS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in A.BY_NAME]
    if unknown:
        raise CtrEdgeError(f"unknown attack(s) {unknown}; known: {[a.name for a in A.ATTACKS]}")
    return [A.BY_NAME[n] for n in wanted]


def run_harness(repository: str | Path, model: str, out: str | Path, *, quick: bool = False,
                idle_seconds: float | None = None, quiet_seconds: float | None = None,
                model_control_mode: str | None = None, attacks: str | None = None,
                server_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run the attacks, write ``out/hostile.json`` and ``out/hostile.md``; returns the report dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(server_args)
    if model_control_mode:
        extra = ["--model-control-mode", model_control_mode, *extra]
    idle = idle_seconds if idle_seconds is not None else (3.0 if quick else 30.0)
    quiet = quiet_seconds if quiet_seconds is not None else (1.0 if quick else 2.0)
    harness = Harness(repository, model, server_args=extra, quick=quick, idle_seconds=idle, quiet_seconds=quiet,
                      log_dir=out / "logs")
    command = [sys.executable, "-m", "ctredge.cli", "serve", "--repository", str(repository), "--port", "0",
               *harness.server_args]
    t0 = time.time()
    rows = harness.run(select(attacks))
    report = {"repository": str(repository), "model": model, "quick": quick, "idle_seconds": idle,
              "quiet_seconds": quiet, "model_control_mode": model_control_mode, "server_command": command,
              "max_message_bytes": harness.max_message_bytes, "started_unix": t0,
              "seconds": round(time.time() - t0, 1), "server_starts": harness.starts, "rows": rows}
    (out / "hostile.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "hostile.md").write_text(markdown(report))
    return report


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``python -m ctredge.benchmarks.hostile``."""
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", required=True)
    p.add_argument("--model", default="ctr-fp32")
    p.add_argument("--out", default="runs/hostile")
    p.add_argument("--quick", action="store_true", help="fewer calls per attack, 3 s idle wait")
    p.add_argument("--idle-seconds", type=float, help="idle wait before the last RSS reading (default 30; quick 3)")
    p.add_argument("--quiet-seconds", type=float, help="probe window before each attack (default 2; quick 1)")
    p.add_argument("--model-control-mode", choices=("none", "poll", "explicit"),
                   help="passed to ctredge serve (default: the server's default)")
    p.add_argument("--attacks", help="comma-separated subset, in this order (default: all): "
                                     + ",".join(a.name for a in A.ATTACKS))
    p.add_argument("--server-args", default="", help="more ctredge serve arguments, e.g. \"--max-message-mb 16\"")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupted)  # unwind (stopping the server and the probe) on SIGTERM too
    report = run_harness(args.repository, args.model, args.out, quick=args.quick, idle_seconds=args.idle_seconds,
                         quiet_seconds=args.quiet_seconds, model_control_mode=args.model_control_mode,
                         attacks=args.attacks, server_args=shlex.split(args.server_args))
    print(markdown(report))
    print(f"written: {Path(args.out) / 'hostile.json'}, {Path(args.out) / 'hostile.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
