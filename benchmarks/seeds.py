"""Noise shown: each model trained with several seeds on the same rows, and each compressed variant's dAUC.

``python -m ctredge.benchmarks.seeds --data FILE.tsv --out DIR [--models dcnv2,deepfm,seed]
[--seeds 0,1,2] [--epochs 3] [--compress] [--eval-data HELD_OUT.tsv] [--repeat]``

1. The rows are split **once** (``ctredge train``'s default split of ``FILE``:
   :class:`ctredge.reader.SplitSpec` with ``--split-seed``, 0.1/0.1) into
   ``DIR/split/{train,valid,test}.tsv``, so every seed trains, picks its epoch
   and is tested on exactly the same rows; only the seed of initialisation and
   shuffling changes (``TrainConfig.seed``; with files for valid and test the
   split seed plays no part).
2. Each model is trained with each seed (``DIR/trained-<model>-s<seed>``; an
   artifact whose verified manifest has the same files, seed and epochs is reused).
3. ``--repeat`` trains the first model with the first seed a second time, in a
   fresh folder, and compares every recorded figure: the same seed on the same
   machine must give the same AUCs (``determinism`` in the result).
4. ``--compress`` runs ``compress all`` on the first model of every seed
   (``DIR/repo-s<seed>``; on ``--eval-data`` rows when given) and lists each
   variant's dAUC with its paired 95% interval and budget verdict per seed.

Writes ``DIR/seeds.json`` and ``DIR/seeds.md`` and prints the tables: per model
the mean test AUC, its spread (min..max and sample standard deviation) and each
seed's figure; per variant the same for dAUC, with each seed's interval.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge.tables import markdown_table, seeds_table

log = logging.getLogger("ctredge.benchmarks")

PARTS = ("train", "valid", "test")


def split_files(data: str | os.PathLike[str], out: Path, split_seed: int = 0, valid: float = 0.1,
                test: float = 0.1) -> dict[str, Path]:
    """Write the rows of ``data`` into ``out/{train,valid,test}.tsv`` by ``ctredge train``'s split (same rows).

    Each part gets the data's ``.spec.json`` beside it.  Files that exist with a
    ``split.json`` naming the same input (sha256) and split are reused.  Returns
    the paths by part.
    """
    from ctredge.artifacts import sha256_file
    from ctredge.reader import SplitSpec, open_text, sidecar_path

    out.mkdir(parents=True, exist_ok=True)
    paths = {p: out / f"{p}.tsv" for p in PARTS}
    record = {"data": str(Path(data).resolve()), "sha256": sha256_file(data),
              "split": {"seed": split_seed, "valid": valid, "test": test}}
    done = out / "split.json"
    if done.is_file() and json.loads(done.read_text()) == record and all(p.is_file() for p in paths.values()):
        return paths
    split = SplitSpec(seed=split_seed, valid=valid, test=test)
    with open_text(data) as fh:
        lines = fh.read().splitlines(keepends=True)
    codes = split.codes(np.zeros(len(lines), dtype=np.int64), np.arange(1, len(lines) + 1, dtype=np.int64))
    spec = sidecar_path(data, "spec")
    for code, part in enumerate(PARTS):
        with open(paths[part], "wb") as f:
            f.writelines(line for line, c in zip(lines, codes) if c == code)
        if os.path.isfile(spec):
            shutil.copyfile(spec, sidecar_path(paths[part], "spec"))
    done.write_text(json.dumps(record))
    return paths


def train_seed(paths: dict[str, Path], out: Path, model: str, seed: int, epochs: int) -> dict[str, Any]:
    """Train ``model`` with ``seed`` on the split files into ``out`` (reused when its manifest matches)."""
    from ctredge.artifacts import read_manifest
    from ctredge.dataplan import DataFile
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, train

    if out.exists():
        try:
            m = read_manifest(out, stage="train")
            shas = sorted(f["sha256"] for f in m["data"]["files"])
            if (shas == sorted(DataFile.of(p).sha256 for p in paths.values()) and m["extra"]["model"] == model
                    and m["config"]["train"]["seed"] == seed and m["config"]["train"]["epochs"] == epochs):
                log.info("reusing %s", out)
                return m
        except Exception as exc:  # any problem: train anew
            log.info("retraining %s: %s", out, exc)
    log.info("train %s seed %d -> %s", model, seed, out)
    cfg = TrainConfig(data=(str(paths["train"]),), valid=(str(paths["valid"]),), test=(str(paths["test"]),),
                      out=str(out), epochs=epochs, seed=seed, verbose=0)
    return train(cfg, ModelConfig(model=model))


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max and sample standard deviation (0 for one value) of a list of figures."""
    v = [float(x) for x in values]
    return {"mean": statistics.fmean(v), "min": min(v), "max": max(v),
            "sd": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v), "values": v}


def _recorded(manifest: dict[str, Any]) -> dict[str, Any]:
    m = manifest["metrics"]
    return {k: m.get(k) for k in ("test_auc", "test_logloss", "valid_auc", "valid_logloss", "epochs", "best_epoch")} | {
        "history": m.get("history")}


def run_seeds(data: str, out: str | os.PathLike[str], models: Sequence[str], seeds: Sequence[int], epochs: int, *,
              split_seed: int = 0, compress: bool = False, eval_data: str | None = None,
              repeat: bool = False) -> dict[str, Any]:
    """Train every model with every seed on one split; optionally repeat one run and compress each seed's first model.

    Returns the result written to ``out/seeds.json`` (see the module docstring).
    """
    t0 = time.perf_counter()
    root = Path(out)
    paths = split_files(data, root / "split", split_seed)
    result: dict[str, Any] = {"data": str(data), "split": {"seed": split_seed, "valid": 0.1, "test": 0.1},
                              "seeds": list(seeds), "epochs": epochs, "models": {}, "variants": {}}
    manifests: dict[tuple[str, int], dict[str, Any]] = {}
    for model in models:
        per = {}
        for s in seeds:
            manifests[model, s] = train_seed(paths, root / f"trained-{model}-s{s}", model, s, epochs)
            per[s] = _recorded(manifests[model, s])
            log.info("%s seed %d: test AUC %.5f", model, s, per[s]["test_auc"])
        result["models"][model] = {"per_seed": {str(s): r for s, r in per.items()},
                                   "test_auc": spread([r["test_auc"] for r in per.values()]),
                                   "valid_auc": spread([r["valid_auc"] for r in per.values()])}
    if repeat:
        model, s = models[0], seeds[0]
        again_dir = root / f"repeat-{model}-s{s}"
        if again_dir.exists():
            shutil.rmtree(again_dir)
        again = _recorded(train_seed(paths, again_dir, model, s, epochs))
        first = result["models"][model]["per_seed"][str(s)]
        same = {k: first[k] == again[k] for k in first}
        result["determinism"] = {"model": model, "seed": s, "identical": all(same.values()), "fields": same,
                                 "first": first, "again": again}
        log.info("determinism: %s seed %d trained twice: %s", model, s,
                 "identical" if all(same.values()) else f"DIFFERENT {[k for k, v in same.items() if not v]}")
    if compress:
        from ctredge.compress.variants import CompressConfig, compress_all

        by_variant: dict[str, dict[str, Any]] = {}
        for s in seeds:
            index = compress_all(root / f"trained-{models[0]}-s{s}", root / f"repo-s{s}",
                                 CompressConfig(eval_data=eval_data, measure_rss=False, seed=0))
            for e in index["models"]:
                v = by_variant.setdefault(e["name"], {"per_seed": {}})
                v["per_seed"][str(s)] = {"dauc": e["dauc"], "dauc_ci": e["dauc_ci"], "verdict": e.get("verdict"),
                                         "written": e.get("written"), "size_bytes": e.get("size_bytes"),
                                         "rows": index["reference"]["test_rows"],
                                         "rows_source": index["reference"].get("rows_source")}
        for v in by_variant.values():
            v["dauc"] = spread([r["dauc"] for r in v["per_seed"].values()])
        result["variants"] = by_variant
        result["compressed_model"] = models[0]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (root / "seeds.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (root / "seeds.md").write_text(report(result) + "\n")
    return result


def _row(name: str, sp: dict[str, Any], each: list[str], fmt: str) -> dict[str, Any]:
    return {"name": name, "seeds": sp["n"], "value": fmt.format(sp["mean"]),
            "spread": f"{fmt.format(sp['min'])}..{fmt.format(sp['max'])}, sd {sp['sd']:.5f}", "each": ", ".join(each)}


def report(result: dict[str, Any]) -> str:
    """The Markdown tables of a :func:`run_seeds` result."""
    rows = []
    for model, r in result["models"].items():
        each = [f"s{s}: {x['test_auc']:.5f}" for s, x in r["per_seed"].items()]
        rows.append(_row(f"{model} (test AUC)", r["test_auc"], each, "{:.5f}"))
    out = [f"Seeds {result['seeds']} on one split of `{result['data']}` (split seed {result['split']['seed']}, "
           f"0.1/0.1), {result['epochs']} epochs; test AUC mean and spread over seeds.", "", seeds_table(rows)]
    if result.get("variants"):
        vrows = []
        for name, v in result["variants"].items():
            each = [f"s{s}: {x['dauc']:+.5f} [{x['dauc_ci'][0]:+.5f}, {x['dauc_ci'][1]:+.5f}] {x['verdict']}"
                    for s, x in v["per_seed"].items()]
            vrows.append(_row(f"{name} (dAUC)", v["dauc"], each, "{:+.5f}"))
        first = next(iter(next(iter(result["variants"].values()))["per_seed"].values()))
        out += ["", f"Compressed variants of `{result['compressed_model']}` per seed: dAUC against that seed's "
                    f"full Keras model with its paired bootstrap 95% interval and budget verdict, on "
                    f"{first['rows']:,} rows ({first['rows_source']}).", "", seeds_table(vrows)]
    det = result.get("determinism")
    if det:
        out += ["", f"Determinism: `{det['model']}` seed {det['seed']} trained twice on this machine: "
                    + ("every recorded figure identical (test AUC "
                       f"{det['first']['test_auc']:.5f})" if det["identical"] else
                       "DIFFERENT in " + ", ".join(k for k, v in det["fields"].items() if not v)
                       + f" (test AUC {det['first']['test_auc']:.5f} vs {det['again']['test_auc']:.5f})")]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.seeds", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="click log with its .spec.json (e.g. ctredge datagen --history)")
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="dcnv2,deepfm,seed")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--compress", action="store_true", help="compress all of the first model of every seed")
    p.add_argument("--eval-data", help="with --compress: judge the variants on this held-out file")
    p.add_argument("--repeat", action="store_true", help="train the first model/seed twice and compare")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("ctredge").setLevel(logging.INFO)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        print(f"--seeds: expected comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    result = run_seeds(args.data, args.out, args.models.split(","), seeds, args.epochs, split_seed=args.split_seed,
                       compress=args.compress, eval_data=args.eval_data, repeat=args.repeat)
    print(report(result))
    print(f"written: {Path(args.out) / 'seeds.json'}, {Path(args.out) / 'seeds.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
