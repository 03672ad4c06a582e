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
from typing import Any, Callable, Sequence

from ctredge.errors import ArtifactError
from ctredge.tables import index_table, markdown_table, train_table

log = logging.getLogger("ctredge")

Progress = Callable[[int, int], None]
TRAIN_HEADER = ["model", "test AUC", "test logloss", "calibration", "epochs", "s/epoch", "params"]


#: the held-out file's sample seed is the run's seed plus this (another sample of the same world)
EVAL_SAMPLE_OFFSET = 1000


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
    #: fit the learnable ceiling in datagen (scikit-learn; about a minute on the demo data)
    ceiling: bool = True
    #: a held-out file of the same world to judge the variants on (compress all --eval-data)
    eval_data: str | None = None
    #: without eval_data: rows of a held-out file of the same world that datagen draws (sample seed
    #: seed + EVAL_SAMPLE_OFFSET) to judge the variants on; 0 = the test rows.  20k test rows resolve about
    #: +-0.001 of dAUC, 200k about +-0.0004: enough for a 0.0005 budget when the loss is near 0
    eval_rows: int = 200_000
    #: DP-SGD models of the first architecture, one per epsilon, scored in the bench's accuracy table (() = none)
    dp_epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)


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
    truth = stage_datagen(data, cfg.rows, cfg.seed, cfg.force, progress, ceiling=cfg.ceiling)
    table = markdown_table(TRAIN_HEADER, [train_table(name, stage_train(data, out / f"trained-{name}", name,
                                                                         cfg.epochs, cfg.seed, cfg.force))
                                          for name in cfg.models])
    ceiling = ceiling_lines(truth)
    dp_dirs = [stage_train_dp(data, out / f"trained-{cfg.models[0]}-dp{e:g}", cfg.models[0], e, cfg.seed, cfg.force)
               for e in cfg.dp_epsilons]
    echo(table)
    echo(ceiling)
    variants = bench = ""
    first = cfg.models[0]
    if not cfg.skip_compress:
        eval_data = cfg.eval_data
        if eval_data is None and cfg.eval_rows:
            eval_data = str(out / "data" / "held-out.tsv")
            stage_datagen(Path(eval_data), cfg.eval_rows, cfg.seed, cfg.force, progress,
                          sample_seed=cfg.seed + EVAL_SAMPLE_OFFSET)
        index = stage_compress(out / f"trained-{first}", out / "repository", cfg.force, eval_data=eval_data)
        unpublished = not_published(index)
        variants = (f"## Compressed variants of `{first}` (`ctredge compress all`)\n\n{index_table(index)}\n\n"
                    + (unpublished + "\n" if unpublished else ""))
        echo(index_table(index))
        if unpublished:
            echo(unpublished)
        if not cfg.skip_bench:
            summary = stage_bench(out, data, first, cfg, dp_trained=[str(d) for d in dp_dirs])
            echo(summary)
            bench = (f"## Benchmark (`ctredge bench{' --full' if cfg.full else ''}`)\n\n{summary}\n\n"
                     f"Every table, the plots and the settings: [bench/report.md](bench/report.md).\n")
    report = out / "report.md"
    report.write_text(f"# ctredge pipeline report\n\n`ctredge pipeline --out {cfg.out} --rows {cfg.rows} "
                      f"--seed {cfg.seed} --models {','.join(cfg.models)} --epochs {cfg.epochs}"
                      f"{' --full' if cfg.full else ''}{' --no-ceiling' if not cfg.ceiling else ''}"
                      f"{' --eval-data ' + cfg.eval_data if cfg.eval_data else f' --eval-rows {cfg.eval_rows}'}"
                      f" --dp-epsilons {','.join(f'{e:g}' for e in cfg.dp_epsilons)}`, {time.perf_counter() - t0:.0f} s\n\n"
                      f"## Training (synthetic data with history)\n\n{table}\n\n{ceiling}\n\n{variants}\n{bench}")
    echo(f"report: {report} ({time.perf_counter() - t0:.0f} s)")
    return report


def ceiling_lines(truth: dict[str, Any]) -> str:
    """The Bayes-optimal figures (all rows and the test rows) and the learnable ceiling of a datagen truth file."""
    lines = [f"Bayes-optimal (true probabilities) on all {truth['rows']:,} rows: AUC {truth['bayes_auc']:.4f}, "
             f"logloss {truth['bayes_logloss']:.4f}; click rate {truth['click_rate']:.4f}"]
    test = (truth.get("scopes") or {}).get("test")
    if test:
        lines.append(f"Bayes-optimal on the {test['rows']:,} test rows the models are scored on: AUC "
                     f"{test['bayes_auc']:.4f}, logloss {test['bayes_logloss']:.4f}")
    c = truth.get("ceiling")
    if c and c.get("status") == "measured":
        lines.append(f"learnable ceiling (logistic regression on the planted structure, fit on the "
                     f"{c['train_rows']:,} train rows, C={c['C']}) on the same {c['test_rows']:,} test rows: "
                     f"AUC {c['test_auc']:.4f}, logloss {c['test_logloss']:.4f}")
    elif c:
        lines.append(f"learnable ceiling: skipped ({c.get('reason')})")
    return "\n\n".join(lines)


def not_published(index: dict[str, Any]) -> str:
    """One line per variant ``compress all`` did not write, with why (empty when every one was written)."""
    lines = [f"- `{e['name']}` not published: {e.get('not_written') or e.get('refused') or 'over budget'}"
             for e in index["models"] if not e.get("written")]
    return ("Not published:\n\n" + "\n".join(lines)) if lines else ""


def stage_datagen(data: Path, rows: int, seed: int, force: bool, progress: Progress | None = None, *,
                  ceiling: bool = False, sample_seed: int | None = None) -> dict[str, Any]:
    """The synthetic click log with history at ``data``: reused when its truth sidecar says same rows and seed.

    The truth file's test-part figures use ``seed`` as the split seed (the
    pipeline trains with it).  Returns the truth sidecar (row count, click rate,
    Bayes-optimal AUC/logloss on all rows and the test rows, and with
    ``ceiling`` the learnable ceiling).  ``sample_seed``: other rows of the same
    world (``ctredge datagen --sample-seed``), for a held-out file.
    """
    from ctredge.datagen import generate
    from ctredge.reader import sidecar_path

    truth_path = Path(sidecar_path(data, "truth"))
    if not force and data.is_file() and truth_path.is_file():
        truth = json.loads(truth_path.read_text())
        test_split = ((truth.get("scopes") or {}).get("test") or {}).get("split") or {}
        if (truth.get("rows") == rows and truth.get("seed") == seed and truth.get("history")
                and truth.get("sample_seed", seed) == (seed if sample_seed is None else sample_seed)
                and test_split.get("seed") == seed
                and (not ceiling or "ceiling" in truth)):
            log.info("reusing %s (%d rows, seed %d)", data, rows, seed)
            return truth
    data.parent.mkdir(parents=True, exist_ok=True)
    log.info("datagen: %d rows with history -> %s%s", rows, data, " (and the learnable ceiling)" if ceiling else "")
    return generate(str(data), rows=rows, seed=seed, history=True, progress=progress, split_seed=seed,
                    ceiling=ceiling, sample_seed=sample_seed)


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


#: DP-SGD epochs of the pipeline's DP models (the epoch count the DP settings were chosen at)
DP_EPOCHS = 1


def stage_train_dp(data: Path, out: Path, model: str, epsilon: float, seed: int, force: bool) -> Path:
    """Train ``model`` with DP-SGD to ``epsilon`` (TrainConfig's other DP settings) into ``out``, or reuse it.

    Reused when its verified manifest says the same file content, architecture, epsilon and epochs.
    Returns ``out``.
    """
    from ctredge.dataplan import DataFile, DataPlan
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, train

    if not force and out.exists():
        try:
            manifest = _read_train_manifest(out)
            same = ([f.sha256 for f in DataPlan.from_manifest(manifest["data"]).files] == [DataFile.of(data).sha256]
                    and manifest["config"]["train"]["epochs"] == DP_EPOCHS and manifest["extra"]["model"] == model
                    and manifest["config"]["train"].get("dp_epsilon") == epsilon)
            if same:
                log.info("reusing %s (manifest verified)", out)
                return out
        except (ArtifactError, KeyError) as exc:
            log.info("retraining %s: %s", out, exc)
    log.info("train: %s with DP-SGD, epsilon %g -> %s", model, epsilon, out)
    train(TrainConfig(data=(str(data),), out=str(out), epochs=DP_EPOCHS, seed=seed, dp_epsilon=float(epsilon),
                      verbose=1 if sys.stdout.isatty() else 2), ModelConfig(model=model))
    return out


def _read_train_manifest(folder: Path) -> dict[str, Any]:
    from ctredge.artifacts import read_manifest

    return read_manifest(folder, stage="train")


def stage_compress(trained_dir: Path, repo: Path, force: bool, *, eval_data: str | None = None) -> dict[str, Any]:
    """``compress all`` of a trained artifact; returns the repository's index.

    Only variants the budget verdict publishes are written ("met", or "not
    resolved" with the point estimate within budget); the index says why for
    the rest.  The trained model is loaded and its rows read once, then shared
    by the exports, the pruning and every variant's scoring.
    """
    from ctredge.compress.variants import CompressConfig, compress_all

    log.info("compress all: %s -> %s", trained_dir, repo)
    return compress_all(trained_dir, repo, CompressConfig(eval_data=eval_data), force=force)


def stage_bench(out: Path, data: Path, first: str, cfg: PipelineConfig, *, dp_trained: Sequence[str] = ()) -> str:
    """``ctredge bench`` of the pipeline's repository (and the DP models beside it); returns the summary table."""
    from ctredge.benchmarks.bench import BenchConfig, run_bench
    from ctredge.benchmarks.report import summary_table

    bench = BenchConfig(repository=str(out / "repository"), data=str(data), out=str(out / "bench"),
                        trained=str(out / f"trained-{first}"), full=cfg.full, seconds=cfg.bench_seconds,
                        dp_trained=tuple(dp_trained))
    return summary_table(run_bench(bench))


__all__ = ["PipelineConfig", "run_pipeline", "stage_datagen", "stage_train", "stage_train_dp", "stage_compress", "stage_bench",
           "ceiling_lines", "not_published"]
