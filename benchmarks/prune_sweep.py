"""What the pruning knobs cost before any fine-tuning: the wide part's sparsity and the vocabulary's min count.

``python -m ctredge.benchmarks.prune_sweep TRAINED [--wide 0,0.5,0.75,0.9,0.95] [--min-counts 5,10,20,40,80]
[--out DIR]``

On a trained artifact (``ctredge train``), in memory and one knob at a time:

* **wide**: the wide part's ``round(s * n)`` smallest-magnitude weights set to 0
  (:func:`ctredge.compress.prune.prune_wide`, what ``compress all --wide-sparsity`` does);
* **min count**: with the wide part at ``--wide-at`` (0.9, the default of ``compress all``),
  every embedding bucket seen fewer than N times in the training rows shares its
  feature's row 0 (the remap of ``compress all --vocab-min-count``), with the rows kept.

Each setting is scored on the artifact's valid and test rows (exact AUC).  The
valid AUC is what chose ``compress all``'s defaults; the test AUC is shown, not
used.  No fine-tuning: ``compress all`` fine-tunes the pruned model with
distillation afterwards, which recovers part of any loss.  Writes
``prune_sweep.md`` / ``.json`` with ``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ctredge.tables import markdown_table


def sweep(trained: str, wide: Sequence[float], min_counts: Sequence[int], wide_at: float) -> list[dict[str, Any]]:
    """Rows ``{"knob", "value", "rows_kept" (embedding rows or wide weights), "valid_auc", "test_auc"}``."""
    from ctredge.compress.prune import prune_wide
    from ctredge.train import layers as L
    from ctredge.train.loop import score
    from ctredge.train.train import TrainedModel
    from ctredge.train.wide import wide_layer
    from ctredge.vocab import count_rows

    t = TrainedModel.load(trained)
    _, held = t.read_rows()
    layer = wide_layer(t.model)
    table = layer.table.numpy().copy() if layer is not None else None
    out = []
    for s in (wide if layer is not None else ()):
        layer.table.assign(table)
        rec = prune_wide(t.model, s)
        r = score(t.model, held.valid, held.test)
        out.append({"knob": "wide sparsity", "value": s, "rows_kept": rec["nonzero_after"] if rec else
                    int(np.count_nonzero(table)), "valid_auc": r["valid_auc"], "test_auc": r["test_auc"]})
    if layer is not None:
        layer.table.assign(table)
        prune_wide(t.model, wide_at)
    emb = next((x for x in t.model.layers if isinstance(x, L.SharedEmbedding) and x.remap is not None), None)
    if emb is not None and min_counts:
        spec = t.spec
        counts, _ = count_rows(iter([held.train]), spec)
        remap = emb.remap.numpy().copy()
        row0 = np.repeat(spec.offsets, spec.buckets)
        for m in min_counts:
            keep = counts >= m
            keep[spec.offsets] = True
            emb.remap.assign(np.where(keep, remap, remap[row0]).astype(np.int32))
            r = score(t.model, held.valid, held.test)
            out.append({"knob": f"min count (wide at {wide_at:g})", "value": m,
                        "rows_kept": int(np.unique(emb.remap.numpy()).size), "valid_auc": r["valid_auc"],
                        "test_auc": r["test_auc"]})
        emb.remap.assign(remap)
    if layer is not None:
        layer.table.assign(table)
    return out


def render(rows: list[dict[str, Any]]) -> str:
    return markdown_table(["knob", "value", "kept (wide weights / embedding rows)", "valid AUC", "test AUC"],
                          [[r["knob"], f"{r['value']:g}", f"{r['rows_kept']:,}", f"{r['valid_auc']:.5f}",
                            f"{r['test_auc']:.5f}"] for r in rows])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ctredge.benchmarks.prune_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("trained", help="a train artifact folder")
    ap.add_argument("--wide", default="0,0.5,0.75,0.9,0.95", help="wide-part sparsities")
    ap.add_argument("--min-counts", default="5,10,20,40,80", help="vocabulary minimum counts")
    ap.add_argument("--wide-at", type=float, default=0.9, help="the wide sparsity under the min-count rows")
    ap.add_argument("--out", help="folder for prune_sweep.md / .json")
    args = ap.parse_args(argv)
    rows = sweep(args.trained, [float(x) for x in args.wide.split(",") if x],
                 [int(x) for x in args.min_counts.split(",") if x], args.wide_at)
    text = render(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prune_sweep.md").write_text(f"# Pruning knobs before fine-tuning: {args.trained}\n\n{text}\n")
        (out / "prune_sweep.json").write_text(json.dumps({"trained": args.trained, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
