"""k-fold comparison of ctredge's training recipe with the cheap baselines on a small click log.

``python -m ctredge.benchmarks.kfold --data FILE [--spec criteo] [--folds 5] [--models dcnv2] --out DIR``

A click log of a few thousand rows (the 1,000 shared Criteo rows, say) gives a
test split of a few hundred rows, where one AUC moves by several hundredths
from split to split.  Here every row is a test row exactly once: the rows are
shuffled (``--seed``) into ``folds`` folds; fold ``k`` is the test file, a
``valid_fraction`` of the other rows the validation file and the rest the
training file.  Each model is trained with ``ctredge train``'s own function
(its defaults: the recipe a user gets), the baselines (hashed LR, LightGBM)
are fit on the same training and validation rows, and all are scored on the
same test rows.  Reported per model: the AUC of each fold, their mean and
standard deviation, the pooled AUC and logloss of the out-of-fold predictions
(every row predicted by the one model that did not train on it), and the
paired difference to the hashed LR per fold.

The fold files are written under ``DIR/folds`` (the rows stay where the user
put them: nothing here is meant to be committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge import metrics as M
from ctredge.errors import ConfigError, CtrEdgeError, DataError
from ctredge.reader import read_all, resolve_spec
from ctredge.tables import markdown_table

log = logging.getLogger("ctredge.kfold")


def _lines(path: str) -> list[bytes]:
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open  # type: ignore[assignment]
    with opener(path, "rb") as fh:
        return [line if line.endswith(b"\n") else line + b"\n" for line in fh if line.strip()]


def fold_files(data: str, out: Path, folds: int, seed: int, valid_fraction: float) -> list[dict[str, str]]:
    """Write ``folds`` (train, valid, test) file triples of ``data``'s rows; return their paths.

    Raises:
        ConfigError: fewer than 2 folds, or a fraction outside (0, 0.5).
        DataError: too few rows for the folds.
    """
    if folds < 2:
        raise ConfigError(f"kfold: --folds must be >= 2, got {folds}")
    if not 0 < valid_fraction < 0.5:
        raise ConfigError(f"kfold: --valid-fraction must be in (0, 0.5), got {valid_fraction}")
    lines = _lines(data)
    if len(lines) < 10 * folds:
        raise DataError(f"kfold: {data} has {len(lines)} rows; expected at least {10 * folds} for {folds} folds")
    order = np.random.default_rng(seed).permutation(len(lines))
    fold_of = np.empty(len(lines), dtype=np.int64)
    fold_of[order] = np.arange(len(lines)) % folds
    out.mkdir(parents=True, exist_ok=True)
    triples = []
    for k in range(folds):
        rest = order[fold_of[order] != k]
        n_valid = max(1, int(round(valid_fraction * len(rest))))
        parts = {"test": np.sort(order[fold_of[order] == k]), "valid": np.sort(rest[:n_valid]),
                 "train": np.sort(rest[n_valid:])}
        paths = {}
        for part, idx in parts.items():
            path = out / f"fold-{k}" / f"{part}.tsv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"".join(lines[i] for i in idx))
            paths[part] = str(path)
        paths["rows"] = json.dumps({p: len(i) for p, i in parts.items()})
        triples.append(paths)
    return triples


def run(data: str, out: str, *, spec: str | None = None, buckets: int = 100_000, folds: int = 5,
        models: Sequence[str] = ("dcnv2",), seed: int = 0, valid_fraction: float = 0.125,
        epochs: int | None = None, all_pairs: bool = False) -> dict[str, Any]:
    """Train ``models`` and the baselines on every fold; return (and write) the figures.

    ``all_pairs``: the wide part crosses every pair of fields (``ModelConfig.wide_select`` off).

    Writes ``OUT/kfold.json`` and ``OUT/kfold.md``.  Raises what training raises.
    """
    from ctredge.benchmarks.baselines import baselines, missing_packages
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, train
    from ctredge.train.loop import keras_predict
    from ctredge.train.train import load_trained

    out_dir = Path(out)
    triples = fold_files(data, out_dir / "folds", folds, seed, valid_fraction)
    the_spec = resolve_spec(data, spec, buckets=buckets)
    missing = missing_packages()
    names = list(models) + ([] if missing else ["baseline-lr", "baseline-lgbm"])
    preds: dict[str, list[np.ndarray]] = {n: [] for n in names}
    per_fold: dict[str, list[float]] = {n: [] for n in names}
    labels: list[np.ndarray] = []
    t0 = time.perf_counter()
    for k, paths in enumerate(triples):
        test = read_all(paths["test"], the_spec)
        labels.append(test.labels)
        manifest = None
        for name in models:
            kwargs = {} if epochs is None else {"epochs": epochs}
            cfg = TrainConfig(data=(paths["train"],), valid=(paths["valid"],), test=(paths["test"],), spec=spec,
                              criteo_buckets=buckets, out=str(out_dir / f"fold-{k}" / f"trained-{name}"),
                              seed=seed, verbose=0, **kwargs)
            manifest = train(cfg, ModelConfig(model=name, wide_select=not all_pairs))
            model, _, _ = load_trained(cfg.out)
            p = keras_predict(model, test.feeds)
            preds[name].append(p)
            per_fold[name].append(M.auc(test.labels, p))
            log.info("fold %d: %s AUC %.4f", k, name, per_fold[name][-1])
        if not missing and manifest is not None:
            res = baselines(manifest, the_spec, test, keep_predictions=True)
            for row in res["rows"]:
                if not row.get("scored"):
                    raise DataError(f"kfold: fold {k}: {row['name']} failed: {row.get('error')}")
                preds[row["name"]].append(row.pop("predictions"))
                per_fold[row["name"]].append(row["auc"])
    y = np.concatenate(labels)
    summary = []
    for name in names:
        aucs = np.asarray(per_fold[name])
        row = {"model": name, "fold_auc": [round(a, 5) for a in aucs], "mean_auc": float(aucs.mean()),
               "sd_auc": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0}
        if len(preds[name]) == len(labels):
            p = np.concatenate(preds[name])
            row.update(pooled_auc=M.auc(y, p), pooled_logloss=M.logloss(y, p))
        if "baseline-lr" in per_fold and name != "baseline-lr" and len(per_fold["baseline-lr"]) == len(aucs):
            d = aucs - np.asarray(per_fold["baseline-lr"])
            row.update(d_vs_lr_mean=float(d.mean()), d_vs_lr_sd=float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                       folds_beating_lr=int((d > 0).sum()))
        summary.append(row)
    result = {"data": data, "spec": spec, "folds": folds, "seed": seed, "rows": int(len(y)),
              "clicks": int(y.sum()), "fold_rows": [json.loads(t["rows"]) for t in triples],
              "baselines": "measured" if not missing else f"not measured: {', '.join(missing)} not installed",
              "models": summary, "seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "kfold.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "kfold.md").write_text(render(result) + "\n")
    return result


def render(result: dict[str, Any]) -> str:
    """The k-fold table as markdown."""
    rows = []
    for r in result["models"]:
        d = r.get("d_vs_lr_mean")
        rows.append([r["model"], f"{r['mean_auc']:.4f} ± {r['sd_auc']:.4f}",
                     f"{r['pooled_auc']:.4f}" if "pooled_auc" in r else "-",
                     f"{r['pooled_logloss']:.4f}" if "pooled_logloss" in r else "-",
                     "-" if d is None else f"{d:+.4f} ± {r['d_vs_lr_sd']:.4f} ({r['folds_beating_lr']}/"
                                           f"{len(r['fold_auc'])} folds)",
                     " ".join(f"{a:.3f}" for a in r["fold_auc"])])
    head = (f"{result['folds']}-fold on {result['rows']:,} rows ({result['clicks']:,} clicks) of "
            f"`{result['data']}`, seed {result['seed']}; baselines {result['baselines']}\n\n")
    return head + markdown_table(["model", "AUC mean ± sd over folds", "pooled AUC", "pooled logloss",
                                  "AUC - hashed LR per fold", "per fold"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.kfold", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--spec", help="FeatureSpec JSON or 'criteo' (default: <data>.spec.json)")
    ap.add_argument("--buckets", type=int, default=100_000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--models", default="dcnv2")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--all-pairs", action="store_true", help="the wide part crosses every pair (no screen)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(args.data, args.out, spec=args.spec, buckets=args.buckets, folds=args.folds,
                     models=[m for m in args.models.split(",") if m], seed=args.seed, epochs=args.epochs,
                     all_pairs=args.all_pairs)
    except CtrEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
