"""What each part of the training recipe buys: train the recipe with one part taken away at a time.

``python -m ctredge.benchmarks.ablation --data clicks.tsv [--eval-data more.tsv] [--steps all] --out DIR``

Every step is ``ctredge train``'s own function on the same data plan (same
split, seed 0), one epoch with early stopping as the recipe does, scored on
the test rows and, with ``--eval-data`` (e.g. ``ctredge datagen ... --sample-seed 1``:
new rows of the same world), on those rows too, where a difference of 0.003 is
resolved.  Steps (each the recipe minus, or plus, one thing):

=================  ==========================================================
``recipe``         the defaults of TrainConfig and ModelConfig
``no-wide``        no wide part (the fitted hashed logistic regression in the graph)
``all-pairs``      the wide part crosses every pair of fields (no screen on the valid rows)
``no-decay``       constant learning rate 1e-3 (the old default)
``batch-1024``     batch 1024 (the old default)
``min-count-1``    every id keeps its own embedding row
``no-attributes``  the history without its items' category, brand, shop
``no-matches``     no explicit history / vocabulary matches
``no-recency``     attention without recency embeddings
``old-recipe``     all of the above off: the model and settings before issue 11
=================  ==========================================================

The two baselines (hashed LR, LightGBM) are fit on the first step's training rows
and scored on the same rows, for the table's last two lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ctredge.errors import CtrEdgeError
from ctredge.tables import markdown_table

STEPS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "recipe": ({}, {}),
    "no-wide": ({}, {"wide": False}),
    "all-pairs": ({}, {"wide_select": False}),
    "no-decay": ({"learning_rate": 1e-3, "lr_decay_epochs": 0}, {}),
    "batch-1024": ({"batch_size": 1024}, {}),
    "min-count-1": ({"min_count": 1}, {}),
    "no-attributes": ({}, {"history_attributes": False}),
    "no-matches": ({}, {"history_match": False, "vocabulary_match": False}),
    "no-recency": ({}, {"recency_dim": 0}),
    "old-recipe": ({"learning_rate": 1e-3, "lr_decay_epochs": 0, "batch_size": 1024, "min_count": 1},
                   {"history_attributes": False, "history_match": False, "vocabulary_match": False,
                    "recency_dim": 0, "wide": False}),
}


def run(data: str, out: str, *, eval_data: str | None = None, steps: Sequence[str] = tuple(STEPS),
        model: str = "dcnv2", epochs: int = 2, seed: int = 0) -> dict[str, Any]:
    """Train each step and score it; writes ``OUT/ablation.json`` and ``.md``.  Raises what training raises."""
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, evaluate, train

    rows = []
    for name in steps:
        if name not in STEPS:
            raise CtrEdgeError(f"ablation: unknown step {name!r}; expected some of {list(STEPS)}")
        t_over, m_over = STEPS[name]
        cfg = TrainConfig(data=(data,), out=str(Path(out) / name), epochs=epochs, seed=seed, verbose=0, **t_over)
        t0 = time.perf_counter()
        m = train(cfg, ModelConfig(model=model, **m_over))["metrics"]
        row = {"step": name, "valid_auc": m["valid_auc"], "test_auc": m["test_auc"], "test_logloss": m["test_logloss"],
               "best_epoch": m["best_epoch"], "seconds": round(time.perf_counter() - t0, 1)}
        if eval_data:
            e = evaluate(cfg.out, eval_data)
            row.update(eval_auc=e["auc"], eval_logloss=e["logloss"], eval_rows=int(e.get("rows", 0)) or None)
        logging.getLogger("ctredge.ablation").info("%s: %s", name, row)
        rows.append(row)
    result = {"data": data, "eval_data": eval_data, "model": model, "epochs": epochs, "seed": seed, "rows": rows,
              "baselines": _baselines(str(Path(out) / steps[0]), eval_data) if rows else []}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (Path(out) / "ablation.md").write_text(render(result) + "\n")
    return result


def _baselines(artifact: str, eval_data: str | None) -> list[dict[str, Any]]:
    """Hashed LR and LightGBM fit on the first step's training rows, scored on its test rows and ``eval_data``."""
    from ctredge.artifacts import read_manifest
    from ctredge.benchmarks.baselines import baselines
    from ctredge.dataplan import DataPlan
    from ctredge.features import FeatureSpec
    from ctredge.reader import read_all

    manifest = read_manifest(artifact)
    spec = FeatureSpec.load(str(Path(artifact) / "feature_spec.json"))
    test = DataPlan.from_manifest(manifest["data"]).read("test", spec)
    out = {r["name"]: {"step": r["name"], "test_auc": r["auc"], "test_logloss": r["logloss"]}
           for r in baselines(manifest, spec, test, bootstrap=0)["rows"] if r.get("scored")}
    if eval_data:
        for r in baselines(manifest, spec, read_all(eval_data, spec), bootstrap=0)["rows"]:
            if r.get("scored") and r["name"] in out:
                out[r["name"]].update(eval_auc=r["auc"], eval_logloss=r["logloss"])
    return list(out.values())


def render(result: dict[str, Any]) -> str:
    """The ablation table as markdown."""
    head = ["step", "valid AUC", "test AUC", "test logloss"] + (["eval AUC", "eval logloss"]
                                                                 if result["eval_data"] else []) + ["epoch kept"]
    body = []
    for r in result["rows"]:
        cells = [r["step"], f"{r['valid_auc']:.5f}", f"{r['test_auc']:.5f}", f"{r['test_logloss']:.5f}"]
        if result["eval_data"]:
            cells += [f"{r['eval_auc']:.5f}", f"{r['eval_logloss']:.5f}"]
        body.append(cells + [str(r["best_epoch"])])
    for b in result.get("baselines", []):
        cells = [f"{b['step']} (baseline)", "-", f"{b['test_auc']:.5f}", f"{b['test_logloss']:.5f}"]
        if result["eval_data"]:
            cells += [f"{b['eval_auc']:.5f}", f"{b['eval_logloss']:.5f}"] if "eval_auc" in b else ["-", "-"]
        body.append(cells + ["-"])
    return markdown_table(head, body)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.ablation", description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval-data", help="more rows of the same world, scored after training")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {list(STEPS)}")
    ap.add_argument("--model", default="dcnv2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = run(args.data, args.out, eval_data=args.eval_data, steps=[s for s in args.steps.split(",") if s],
                     model=args.model, epochs=args.epochs, seed=args.seed)
    except CtrEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
