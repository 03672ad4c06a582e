"""The ``ctredge`` command line: the one place that knows every stage.

Each subcommand imports its stage inside its handler, so ``ctredge datagen``
never loads TensorFlow and (later) ``ctredge serve`` neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ctredge.errors import CtrEdgeError

log = logging.getLogger("ctredge")


def _progress_bar(label: str) -> Callable[[int, int], None]:
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty() and done < total:
            return
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        rate = done / max(time.perf_counter() - start, 1e-9)
        end = "\n" if done >= total else ""
        print(f"\r{label} [{bar:<30}] {done:,}/{total:,} rows  {rate:,.0f} rows/s", end=end,
              file=sys.stderr, flush=True)

    return show


# ---------------------------------------------------------------- datagen
def cmd_datagen(args: argparse.Namespace) -> int:
    from ctredge.datagen import generate

    truth = generate(args.out, rows=args.rows, seed=args.seed, history=args.history,
                     click_rate=args.click_rate, progress=_progress_bar("datagen"))
    print(json.dumps({k: truth[k] for k in ("rows", "click_rate", "bayes_auc", "bayes_logloss") if k in truth}, indent=2))
    return 0


# ---------------------------------------------------------------- train / evaluate
def _model_config(args: argparse.Namespace) -> Any:
    from ctredge.train.models import ModelConfig

    kwargs: dict[str, Any] = {"model": args.model}
    if args.embedding_dim is not None:
        kwargs["embedding_dim"] = args.embedding_dim
    return ModelConfig(**kwargs)


def cmd_train(args: argparse.Namespace) -> int:
    from ctredge.train.train import TrainConfig, train

    cfg = TrainConfig(
        data=tuple(args.data), out=args.out, valid=tuple(args.valid or ()), test=tuple(args.test or ()),
        spec=args.spec, criteo_buckets=args.buckets, batch_size=args.batch_size, epochs=args.epochs,
        learning_rate=args.learning_rate, patience=args.patience, seed=args.seed,
        split_valid=args.split_valid, split_test=args.split_test, skip_bad_rows=args.skip_bad_rows,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    manifest = train(cfg, _model_config(args))
    m = manifest["metrics"]
    print(_table(["model", "test AUC", "test logloss", "calibration", "valid AUC", "epochs", "s/epoch"],
                 [[args.model, f"{m['test_auc']:.5f}", f"{m['test_logloss']:.5f}", f"{m['test_calibration']:.3f}",
                   f"{m['valid_auc']:.5f}", str(m["epochs"]), f"{m['seconds_per_epoch']:.1f}"]]))
    if m.get("bad_rows_skipped"):
        print(f"skipped {m['bad_rows_skipped']} malformed row(s)")
    print(f"artifact: {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ctredge.train.train import evaluate

    m = evaluate(args.dir, args.data, skip_bad_rows=args.skip_bad_rows)
    print(_table(["rows", "AUC", "logloss", "calibration", "normalized entropy", "click rate"],
                 [[f"{m['rows']:,}", f"{m['auc']:.5f}", f"{m['logloss']:.5f}", f"{m['calibration']:.3f}",
                   f"{m['normalized_entropy']:.4f}", f"{m['click_rate']:.4f}"]]))
    return 0


# ---------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from ctredge.export.onnx import ExportConfig, export

    cfg = ExportConfig(opset=args.opset, atol=args.atol, name=args.name, version=args.version)
    manifest = export(args.dir, args.out, cfg)
    diffs = manifest["metrics"]["validation_max_abs_diff"]
    print(f"exported {args.dir} -> {args.out}/model.onnx  (opset {cfg.opset}, {manifest['extra']['nodes']} nodes, "
          f"{manifest['extra']['onnx_bytes']:,} bytes)")
    print("validated against Keras: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in diffs.items()))
    return 0


# ---------------------------------------------------------------- pipeline
def cmd_pipeline(args: argparse.Namespace) -> int:
    """datagen (with history) -> train each model -> metrics table against the Bayes ceiling."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data" / "clicks.tsv"
    truth = _stage_datagen(data, args.rows, args.seed, args.force)
    rows = []
    for name in args.models.split(","):
        manifest = _stage_train(data, out / f"trained-{name}", name, args.epochs, args.seed, args.force)
        m = manifest["metrics"]
        rows.append([name, f"{m['test_auc']:.4f}", f"{m['test_logloss']:.4f}", f"{m['test_calibration']:.3f}",
                     str(m["epochs"]), f"{m['seconds_per_epoch']:.1f}",
                     f"{manifest['extra']['params']['total']:,}"])
    table = _table(["model", "test AUC", "test logloss", "calibration", "epochs", "s/epoch", "params"], rows)
    ceiling = (f"Bayes-optimal (true probabilities) on all {truth['rows']:,} rows: AUC {truth['bayes_auc']:.4f}, "
               f"logloss {truth['bayes_logloss']:.4f}; click rate {truth['click_rate']:.4f}")
    report = out / "report.md"
    report.write_text(f"# ctredge pipeline report\n\n`ctredge pipeline --out {args.out} --rows {args.rows} "
                      f"--seed {args.seed} --models {args.models} --epochs {args.epochs}`\n\n{table}\n\n{ceiling}\n")
    print(table)
    print(ceiling)
    print(f"report: {report}")
    return 0


def _stage_datagen(data: Path, rows: int, seed: int, force: bool) -> dict[str, Any]:
    from ctredge.datagen import generate
    from ctredge.reader import sidecar_path

    truth_path = Path(sidecar_path(data, "truth"))
    if not force and data.is_file() and truth_path.is_file():
        truth = json.loads(truth_path.read_text())
        if truth.get("rows") == rows and truth.get("seed") == seed and truth.get("history"):
            log.info("reusing %s (%d rows, seed %d)", data, rows, seed)
            return truth
    data.parent.mkdir(parents=True, exist_ok=True)
    log.info("datagen: %d rows with history -> %s", rows, data)
    return generate(str(data), rows=rows, seed=seed, history=True, progress=_progress_bar("datagen"))


def _stage_train(data: Path, out: Path, model: str, epochs: int, seed: int, force: bool) -> dict[str, Any]:
    from ctredge.artifacts import read_manifest, sha256_file
    from ctredge.errors import ArtifactError
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, train

    cfg = TrainConfig(data=(str(data),), out=str(out), epochs=epochs, seed=seed,
                      verbose=1 if sys.stdout.isatty() else 2)
    if not force and out.exists():
        try:
            manifest = read_manifest(out, stage="train")
            same_data = [f["sha256"] for f in manifest["data"]["files"]] == [sha256_file(data)]
            if same_data and manifest["config"]["train"]["epochs"] == epochs and manifest["extra"]["model"] == model:
                log.info("reusing %s (manifest verified)", out)
                return manifest
        except (ArtifactError, KeyError) as exc:
            log.info("retraining %s: %s", out, exc)
    log.info("train: %s -> %s", model, out)
    return train(cfg, ModelConfig(model=model))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctredge", description="CTR models from training to a production server.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("datagen", help="write synthetic e-commerce click logs (+ .spec.json, .truth.json)")
    d.add_argument("--rows", type=int, required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True, help="FILE.tsv")
    d.add_argument("--history", action="store_true", help="add the behaviour-history column")
    d.add_argument("--click-rate", type=float, default=0.03)
    d.set_defaults(func=cmd_datagen)

    t = sub.add_parser("train", help="train a CTR model into an artifact folder")
    t.add_argument("--data", nargs="+", required=True, help="click-log file(s), .tsv or .tsv.gz")
    t.add_argument("--valid", nargs="+")
    t.add_argument("--test", nargs="+")
    t.add_argument("--spec", help="FeatureSpec JSON, or 'criteo' (default: <data>.spec.json)")
    t.add_argument("--buckets", type=int, default=100_000, help="hash buckets per feature with --spec criteo")
    t.add_argument("--model", default="dcnv2", choices=("dcnv2", "deepfm", "seed"))
    t.add_argument("--embedding-dim", type=int)
    t.add_argument("--out", required=True)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument("--patience", type=int, default=1, help="early-stopping patience (epochs) on valid AUC")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split-valid", type=float, default=0.1)
    t.add_argument("--split-test", type=float, default=0.1)
    t.add_argument("--skip-bad-rows", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="AUC, logloss, calibration of a trained artifact")
    e.add_argument("dir")
    e.add_argument("--data", help="click log (default: the artifact's own test rows)")
    e.add_argument("--skip-bad-rows", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="export a trained artifact to ONNX, validated against Keras")
    x.add_argument("dir")
    x.add_argument("--out", required=True)
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--atol", type=float, default=1e-5)
    x.add_argument("--name", default="ctr")
    x.add_argument("--version", type=int, default=1)
    x.set_defaults(func=cmd_export)

    pl = sub.add_parser("pipeline", help="the main job: datagen -> train -> evaluate -> report")
    pl.add_argument("--out", default="runs/demo")
    pl.add_argument("--rows", type=int, default=200_000)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--models", default="dcnv2,deepfm,seed")
    pl.add_argument("--epochs", type=int, default=3)
    pl.add_argument("--force", action="store_true", help="redo stages whose artifacts already exist")
    pl.set_defaults(func=cmd_pipeline)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ctredge`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except CtrEdgeError as exc:
        print(f"ctredge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
