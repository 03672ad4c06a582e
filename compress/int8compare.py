"""Compare static int8 configurations on a trained model: which default is safe with and without VNNI.

``python -m ctredge.compress.int8compare runs/demo/trained-dcnv2 [--work runs/demo/repository-work]``

For each configuration (U8S8, U8S8 with ``reduce_range``, U8U8; optionally
``--exclude`` node fragments kept in float) it builds the ``ctr-int8`` kind
(``int8-static+emb-int8``) from the full model's ONNX export, calibrated on the
valid rows as ``compress all`` does, and prints one Markdown row: AUC on the
test rows and its difference from the fp32 export (which equals Keras:
validated at export), the fused-vs-simulated difference
(:func:`ctredge.compress.int8check.fused_vs_simulated`), the int16 pair-sum
overflow on the calibration rows (:func:`ctredge.compress.int8check.saturation_risk`),
bytes, and the in-process median latency at batch 1 and 256 (one thread,
ctredge's session settings).  ``--out FILE`` also writes the figures as JSON.
The CPU is printed with the table (the latency and the fused figures depend on it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS: dict[str, dict[str, Any]] = {
    "u8s8": {"static_weight_type": "int8", "reduce_range": False},
    "u8s8-reduce-range": {"static_weight_type": "int8", "reduce_range": True},
    "u8u8": {"static_weight_type": "uint8", "reduce_range": False},
}


def median_latency_ms(session: Any, feeds: dict[str, np.ndarray], batch: int, seconds: float) -> float:
    """Median wall time of ``session.run`` on the first ``batch`` rows of ``feeds`` over about ``seconds``."""
    part = {k: v[:batch] for k, v in feeds.items()}
    session.run(None, part)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        session.run(None, part)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def compare(trained_dir: str, work: str, *, exclude: tuple[str, ...] = (), seconds: float = 1.0) -> dict[str, Any]:
    """Build and measure every configuration of :data:`CONFIGS` (+ exclusions); returns the figures."""
    from ctredge import metrics as M
    from ctredge.compress.int8check import fused_vs_simulated, saturation_risk
    from ctredge.compress.quantize import QuantizeConfig, quantize
    from ctredge.compress.scoring import ort_predict
    from ctredge.cpuinfo import cpu_isa
    from ctredge.export.validate import cpu_session
    from ctredge.train.train import TrainedModel

    trained = TrainedModel.load(trained_dir)
    _, held = trained.read_rows()
    test, valid = held.test, held.valid
    calib = valid.take(np.arange(min(4096, len(valid))))
    calibration = [calib.take(np.arange(i, min(i + 256, len(calib)))).feeds for i in range(0, len(calib), 256)]
    src = Path(work) / "export-full" / "model.onnx"
    feeds = {k: v for k, v in test.feeds.items()}
    p32 = ort_predict(src, feeds)
    auc32 = M.auc(test.labels, p32)
    configs = dict(CONFIGS)
    if exclude:
        for name, base in CONFIGS.items():
            configs[f"{name}+exclude"] = {**base, "static_exclude_nodes": tuple(exclude)}
    rows = []
    for name, over in configs.items():
        model = quantize(src, "int8-static+emb-int8", calibration, QuantizeConfig(**over))
        session = cpu_session(model)
        p = ort_predict(session, feeds)
        fused = fused_vs_simulated(model, feeds, test.labels, p_fused=p)
        risk = saturation_risk(model, calib.feeds)
        rows.append({"config": name, "settings": over, "auc": M.auc(test.labels, p), "dauc_vs_fp32": None,
                     "fused": fused, "overflow_fraction": risk["overflow_fraction"], "layers": risk["layers"],
                     "bytes": len(model.SerializeToString()),
                     "latency_ms": {b: median_latency_ms(session, feeds, b, seconds) for b in (1, 256)}})
        rows[-1]["dauc_vs_fp32"] = rows[-1]["auc"] - auc32
    return {"cpu": cpu_isa(), "fp32_auc": auc32, "test_rows": len(test), "calibration_rows": len(calib),
            "fp32_bytes": src.stat().st_size,
            "fp32_latency_ms": {b: median_latency_ms(cpu_session(str(src)), feeds, b, seconds) for b in (1, 256)},
            "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The figures of :func:`compare` as a Markdown table (plus the CPU line)."""
    from ctredge.cpuinfo import describe_isa

    lines = [f"CPU: {describe_isa(result['cpu'])}; {result['test_rows']} test rows, "
             f"{result['calibration_rows']} calibration rows; fp32 AUC {result['fp32_auc']:.5f}, "
             f"{result['fp32_bytes']:,} bytes, {result['fp32_latency_ms'][1]:.3f} / "
             f"{result['fp32_latency_ms'][256]:.3f} ms at batch 1 / 256", "",
             "| config | AUC | dAUC vs fp32 | AUC simulated | max abs fused-sim | int16 overflow (outputs, worst layer)"
             " | worst layer pairs | bytes | ms b1 | ms b256 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        worst = max(r["layers"], key=lambda lay: lay["outputs"], default=None)
        of = r["overflow_fraction"]
        lines.append(f"| {r['config']} | {r['auc']:.5f} | {r['dauc_vs_fp32']:+.5f} | {r['fused']['auc_simulated']:.5f}"
                     f" | {r['fused']['max_abs_diff']:.5f} | {'n/a' if of is None else f'{of:.4f}'}"
                     f"{'' if worst is None else ' (' + worst['node'] + ')'} | "
                     f"{'-' if worst is None else format(worst['pairs'], '.4f')} | {r['bytes']:,} | "
                     f"{r['latency_ms'][1]:.3f} | {r['latency_ms'][256]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m ctredge.compress.int8compare", description=__doc__.split("\n")[0])
    ap.add_argument("trained")
    ap.add_argument("--work", help="folder with export-full/ (default: <trained>/../repository-work)")
    ap.add_argument("--exclude", default="", help="comma-separated node-name fragments kept in float (extra rows)")
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per latency figure")
    ap.add_argument("--out", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    work = args.work or str(Path(args.trained).parent / "repository-work")
    result = compare(args.trained, work, exclude=tuple(e for e in args.exclude.split(",") if e),
                     seconds=args.seconds)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
