"""The main job, ``ctredge pipeline`` (what ``make run`` runs): datagen -> train -> compress all -> bench.

Each stage's artifact is reused when its manifest says it was made from the
same inputs (``--force`` redoes them).  The first model's trained artifact is
loaded once, with its held-out rows read once from its data plan, and handed
in memory to the stages that need it (export, pruning, every variant's
scoring); ``bench`` then takes the accuracy figures ``compress all`` recorded in
``index.json`` and measures only latency, throughput and memory anew.  The
stages import TensorFlow (and the rest) inside these functions: importing this
module loads nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ctredge.errors import ArtifactError
from ctredge.tables import index_table, markdown_table, train_table

log = logging.getLogger("ctredge")

Progress = Callable[[int, int], None]
TRAIN_HEADER = ["model", "test AUC", "test logloss", "calibration", "epochs", "s/epoch", "params"]


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of one ``ctredge pipeline`` run (its command-line flags)."""

    out: str = "runs/demo"
    rows: int = 200_000
    seed: int = 0
    models: tuple[str, ...] = ("dcnv2", "deepfm", "seed")
    epochs: int = 3
    force: bool = False
    skip_compress: bool = False
    skip_bench: bool = False
    full: bool = False
    bench_seconds: float | None = None


def run_pipeline(cfg: PipelineConfig, *, progress: Progress | None = None,
                 echo: Callable[[str], None] = print) -> Path:
    """Run every stage of ``cfg`` into ``cfg.out``; print each table as it is ready; write ``report.md``.

    Takes the config, a datagen progress callback and where the tables go.
    Returns the report's path.  Raises what the stages raise.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data" / "clicks.tsv"
    truth = stage_datagen(data, cfg.rows, cfg.seed, cfg.force, progress)
    table = markdown_table(TRAIN_HEADER, [train_table(name, stage_train(data, out / f"trained-{name}", name,
                                                                         cfg.epochs, cfg.seed, cfg.force))
                                          for name in cfg.models])
    ceiling = (f"Bayes-optimal (true probabilities) on all {truth['rows']:,} rows: AUC {truth['bayes_auc']:.4f}, "
               f"logloss {truth['bayes_logloss']:.4f}; click rate {truth['click_rate']:.4f}")
    echo(table)
    echo(ceiling)
    variants = bench = ""
    first = cfg.models[0]
    if not cfg.skip_compress:
        index = stage_compress(out / f"trained-{first}", out / "repository", cfg.force)
        variants = f"## Compressed variants of `{first}` (`ctredge compress all`)\n\n{index_table(index)}\n"
        echo(index_table(index))
        if not cfg.skip_bench:
            summary = stage_bench(out, data, first, cfg)
            echo(summary)
            bench = (f"## Benchmark (`ctredge bench{' --full' if cfg.full else ''}`)\n\n{summary}\n\n"
                     f"Every table, the plots and the settings: [bench/report.md](bench/report.md).\n")
    report = out / "report.md"
    report.write_text(f"# ctredge pipeline report\n\n`ctredge pipeline --out {cfg.out} --rows {cfg.rows} "
                      f"--seed {cfg.seed} --models {','.join(cfg.models)} --epochs {cfg.epochs}"
                      f"{' --full' if cfg.full else ''}`, {time.perf_counter() - t0:.0f} s\n\n"
                      f"## Training (synthetic data with history)\n\n{table}\n\n{ceiling}\n\n{variants}\n{bench}")
    echo(f"report: {report} ({time.perf_counter() - t0:.0f} s)")
    return report


def stage_datagen(data: Path, rows: int, seed: int, force: bool, progress: Progress | None = None) -> dict[str, Any]:
    """The synthetic click log with history at ``data``: reused when its truth sidecar says same rows and seed.

    Returns the truth sidecar (row count, click rate, Bayes-optimal AUC/logloss).
    """
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
    return generate(str(data), rows=rows, seed=seed, history=True, progress=progress)


def stage_train(data: Path, out: Path, model: str, epochs: int, seed: int, force: bool) -> dict[str, Any]:
    """Train ``model`` on ``data`` into ``out``, or reuse ``out`` when its verified manifest matches.

    It matches when it was trained on this file's content (sha256) with the same
    epochs and architecture.  Returns the artifact's manifest.
    """
    from ctredge.dataplan import DataFile, DataPlan
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, train

    if not force and out.exists():
        try:
            manifest = _read_train_manifest(out)
            same_data = [f.sha256 for f in DataPlan.from_manifest(manifest["data"]).files] == [
                DataFile.of(data).sha256]
            if same_data and manifest["config"]["train"]["epochs"] == epochs and manifest["extra"]["model"] == model:
                log.info("reusing %s (manifest verified)", out)
                return manifest
        except (ArtifactError, KeyError) as exc:
            log.info("retraining %s: %s", out, exc)
    log.info("train: %s -> %s", model, out)
    cfg = TrainConfig(data=(str(data),), out=str(out), epochs=epochs, seed=seed,
                      verbose=1 if sys.stdout.isatty() else 2)
    return train(cfg, ModelConfig(model=model))


def _read_train_manifest(folder: Path) -> dict[str, Any]:
    from ctredge.artifacts import read_manifest

    return read_manifest(folder, stage="train")


def stage_compress(trained_dir: Path, repo: Path, force: bool) -> dict[str, Any]:
    """``compress all`` of a trained artifact (every variant, over budget allowed); returns the repository's index.

    The trained model is loaded and its rows read once, then shared by the
    exports, the pruning and every variant's scoring.
    """
    from ctredge.compress.variants import CompressConfig, compress_all

    log.info("compress all: %s -> %s", trained_dir, repo)
    return compress_all(trained_dir, repo, CompressConfig(allow_over_budget=True), force=force)


def stage_bench(out: Path, data: Path, first: str, cfg: PipelineConfig) -> str:
    """``ctredge bench`` of the pipeline's repository; returns the summary table."""
    from ctredge.benchmarks.bench import BenchConfig, run_bench
    from ctredge.benchmarks.report import summary_table

    bench = BenchConfig(repository=str(out / "repository"), data=str(data), out=str(out / "bench"),
                        trained=str(out / f"trained-{first}"), full=cfg.full, seconds=cfg.bench_seconds)
    return summary_table(run_bench(bench))


__all__ = ["PipelineConfig", "run_pipeline", "stage_datagen", "stage_train", "stage_compress", "stage_bench"]
