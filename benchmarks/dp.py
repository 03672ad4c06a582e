"""The cost of differential privacy: test AUC, logloss and training rows/s of DP-SGD at several epsilons.

``python -m ctredge.benchmarks.dp --data FILE.tsv --out DIR [--epsilons 1,3,8] [--epochs 1]
[--batch-size 256] [--clip C] [--seed 0]``

Every run trains on the same rows (``ctredge train``'s default split of ``FILE``
with ``--seed``) the same small model (dcnv2, embedding 8, one cross layer, MLP
64), one epoch by default:

* ``non-DP (default)``: ordinary training with the default data layers (min-count
  vocabulary, wide part, history attributes), for reference;
* ``non-DP``: ordinary training of the model DP trains (those layers off, as
  :func:`ctredge.train.dp.private_configs` turns them off); the dAUC of each DP
  run is against this one, so it is the cost of clipping and noise alone;
* ``DP eps=E``: ``ctredge train --dp-epsilon E`` (delta 1/n rounded down to a
  power of ten, TrainConfig's DP-SGD settings: clip 30 unless ``--clip``, Poisson
  batches of 1024, SGD with momentum).

Rows/s is training rows x epochs / training seconds (the per-epoch validation
scoring included, the same for every run).  Writes ``DIR/dp.json`` and
``DIR/dp.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge.tables import markdown_table

log = logging.getLogger("ctredge.benchmarks")

#: the small model every run of the benchmark trains
SMALL = {"model": "dcnv2", "embedding_dim": 8, "cross_layers": 1, "mlp_units": (64,)}


def _row(name: str, manifest: dict[str, Any], base_auc: float | None) -> dict[str, Any]:
    m = manifest["metrics"]
    dp = m.get("dp") or {}
    seconds = m["train_seconds"]
    return {"run": name, "test_auc": m["test_auc"], "test_logloss": m["test_logloss"],
            "dauc": None if base_auc is None else m["test_auc"] - base_auc,
            "train_rows": m["train_rows"], "epochs": m["epochs"], "train_seconds": seconds,
            "rows_per_s": m["train_rows"] * m["epochs"] / seconds if seconds else None,
            "epsilon": dp.get("epsilon"), "epsilon_target": dp.get("epsilon_target"), "delta": dp.get("delta"),
            "clip": dp.get("clip"), "noise_multiplier": dp.get("noise_multiplier"), "steps": dp.get("steps"),
            "q": dp.get("q"), "sampling": dp.get("sampling")}


def run_dp(data: str, out: str, epsilons: Sequence[float], *, epochs: int = 1, batch_size: int = 256,
           clip: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Train the non-DP references and one DP model per epsilon on the same split; returns what ``dp.json`` holds."""
    from ctredge.train.dp import private_configs
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, train

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_cfg = TrainConfig(data=(str(data),), out="", epochs=epochs, batch_size=batch_size, seed=seed, verbose=0)
    clip = base_cfg.dp_clip if clip is None else float(clip)
    small = ModelConfig(**SMALL)
    private_train, private_model = private_configs(base_cfg, small)
    runs: list[tuple[str, TrainConfig, ModelConfig]] = [
        ("non-DP (default)", base_cfg, small),
        ("non-DP", private_train, private_model),
        *((f"DP eps={e:g}", dataclasses.replace(base_cfg, dp_epsilon=float(e), dp_clip=clip), small) for e in epsilons),
    ]
    rows, base_auc = [], None
    for i, (name, cfg, mcfg) in enumerate(runs):
        folder = root / f"run{i}-{name.split(' ')[0].lower()}{'' if cfg.dp_epsilon is None else f'-{cfg.dp_epsilon:g}'}"
        log.info("%s -> %s", name, folder)
        manifest = train(dataclasses.replace(cfg, out=str(folder)), mcfg)
        if name == "non-DP":
            base_auc = manifest["metrics"]["test_auc"]
        rows.append(_row(name, manifest, base_auc if cfg.dp_epsilon is not None else None))
        log.info("%s: test AUC %.5f", name, rows[-1]["test_auc"])
    result = {"data": str(data), "epochs": epochs, "batch_size": batch_size, "clip": clip, "seed": seed,
              "dp_sgd": {"batch_size": base_cfg.dp_batch_size, "optimizer": "sgd",
                         "learning_rate": base_cfg.dp_learning_rate, "momentum": base_cfg.dp_momentum},
              "split": {"seed": seed, "valid": 0.1, "test": 0.1}, "model": SMALL,
              "machine": f"{platform.machine()}, {platform.python_version()}", "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1),
              "command": "python -m ctredge.benchmarks.dp " + " ".join(sys.argv[1:])}
    (root / "dp.json").write_text(json.dumps(result, indent=2))
    (root / "dp.md").write_text(table(result) + "\n")
    return result


def _rows_per_s(manifest: dict[str, Any]) -> float | None:
    """Training rows x epochs / training seconds (validation scoring included), from a train manifest."""
    m = manifest.get("metrics") or {}
    seconds = m.get("train_seconds")
    return m["train_rows"] * m["epochs"] / seconds if seconds and m.get("train_rows") else None


def _same_split(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """Why two train manifests' test rows differ (files, split seed or fractions), or None when they are the same."""
    from ctredge.dataplan import DataPlan

    pa, pb = DataPlan.from_manifest(a.get("data")), DataPlan.from_manifest(b.get("data"))
    if [f.sha256 for f in pa.files] != [f.sha256 for f in pb.files]:
        return "trained on other files"
    sa, sb = pa.split, pb.split
    if (sa is None) != (sb is None) or (sa is not None and (sa.seed, sa.valid, sa.test) != (sb.seed, sb.valid, sb.test)):
        return "another train/valid/test split"
    return None


def dp_rows(dirs: Sequence[str], batch: Any, reference: Any, reference_manifest: dict[str, Any] | None, *,
            bootstrap: int = 200, seed: int = 0, confidence: float = 0.95) -> list[dict[str, Any]]:
    """Accuracy-table rows (``kind: "dp"``) of DP-SGD artifacts scored on the accuracy section's rows.

    Takes the DP ``train`` artifact folders, the rows (a :class:`~ctredge.reader.Batch`
    hashed with the reference's spec), the reference's predictions on them (for
    the paired dAUC; None: no dAUC), the reference's train manifest (for the
    rows/s cost and to check the DP artifact holds out the same test rows) and the
    bootstrap settings.  A folder that is not a DP artifact, holds out other rows
    or fails to score is a row with ``scored: False`` and its ``error``.
    """
    from ctredge import metrics as M
    from ctredge.artifacts import read_manifest
    from ctredge.train.loop import keras_predict
    from ctredge.train.train import load_trained

    base_rps = _rows_per_s(reference_manifest) if reference_manifest else None
    rows = []
    for d in dirs:
        t0 = time.perf_counter()
        path = Path(d)
        row: dict[str, Any] = {"name": path.name, "kind": "dp", "version": None, "path": str(path / "model.keras"),
                               "bytes": None, "scored": False}
        try:
            manifest = read_manifest(path, stage="train")
            dp = (manifest.get("metrics") or {}).get("dp")
            if not dp:
                raise ValueError(f"{path} was not trained with DP-SGD (no metrics.dp in its manifest)")
            why = _same_split(manifest, reference_manifest) if reference_manifest else None
            if why:
                raise ValueError(f"{path} holds out other test rows than the reference ({why})")
            model, spec, _ = load_trained(path)
            p = np.asarray(keras_predict(model, batch.feeds), dtype=np.float64)
            s = M.summary(batch.labels, p)
            row.update({k: s[k] for k in ("auc", "logloss", "calibration", "mean_prediction", "click_rate",
                                         "normalized_entropy")})
            if reference is not None:
                delta = M.paired_bootstrap_auc_delta(batch.labels, np.asarray(reference, np.float64), p,
                                                     resamples=bootstrap, confidence=confidence, seed=seed)
                row.update(dauc=delta.delta, dauc_ci=[delta.low, delta.high],
                           pct_of_full_auc=100.0 * s["auc"] / (s["auc"] - delta.delta))
            rps = _rows_per_s(manifest)
            row.update(scored=True, bytes=(path / "model.keras").stat().st_size,
                       quantization=f"none (Keras, DP-SGD eps {dp['epsilon']:.2f})", dp=dp,
                       train_rows_per_s=rps, train_slowdown=(base_rps / rps) if base_rps and rps else None,
                       model=manifest.get("extra", {}).get("model"))
            log.info("accuracy: %-17s AUC %.5f (DP-SGD eps %.3f, delta %.0e, clip %g, sigma %.3f)", row["name"],
                     row["auc"], dp["epsilon"], dp["delta"], dp["clip"], dp["noise_multiplier"])
        except Exception as exc:  # one artifact's failure is reported, the others still run
            row["error"] = f"{type(exc).__name__}: {exc}"
            log.warning("accuracy: %s not scored: %s", path, row["error"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def table(result: dict[str, Any]) -> str:
    """The markdown table of a :func:`run_dp` result."""
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    base_rps = next((r["rows_per_s"] for r in result["rows"] if r["run"] == "non-DP"), None)
    body = [[r["run"], f(r["test_auc"], ".4f"), f(r["dauc"], "+.4f"), f(r["test_logloss"], ".4f"),
             f(r["rows_per_s"], ",.0f"),
             "-" if r["epsilon"] is None or not base_rps else f"{base_rps / r['rows_per_s']:.1f}x slower",
             f(r["epsilon"], ".3f"), f(r["delta"], ".0e"), f(r["noise_multiplier"], ".3f"), f(r["steps"], "d")]
            for r in result["rows"]]
    return markdown_table(["run", "test AUC", "dAUC vs non-DP", "test logloss", "train rows/s", "rows/s cost",
                           "epsilon spent", "delta", "noise multiplier", "steps"], body)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.dp", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--clip", type=float, default=None, help="DP-SGD's per-example clipping norm (default: "
                                                             "TrainConfig's dp_clip, 30)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ctredge").setLevel(logging.INFO)
    result = run_dp(args.data, args.out, [float(x) for x in args.epsilons.split(",") if x.strip()],
                    epochs=args.epochs, batch_size=args.batch_size, clip=args.clip, seed=args.seed)
    print(table(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
