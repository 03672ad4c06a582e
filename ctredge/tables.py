"""Markdown tables the command line prints and the pipeline report embeds (standard library only)."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def verdict_cell(entry: dict[str, Any]) -> str:
    """The budget column of one variant: its verdict and whether (and how) it was published.

    ``met``; ``not resolved (published)``; ``missed (not written)``; ``REFUSED: ...``;
    entries written before verdicts existed show ``yes``/``NO`` from ``within_budget``.
    """
    if entry.get("refused"):
        return "REFUSED: " + entry["refused"]
    verdict = entry.get("verdict")
    if verdict is None:
        return "yes" if entry.get("within_budget") else "NO"
    if not entry.get("written", True):
        return f"{verdict} (not written)"
    published = entry.get("published")
    if verdict == "met":
        return "met"
    return f"{verdict} (published{': over budget, allowed' if published == 'over budget (allowed)' else ''})"


def index_table(index: dict[str, Any]) -> str:
    """A repository's ``index.json`` (``ctredge compress all``) as a Markdown table plus its reference lines."""
    fp32 = next((e["size_bytes"] for e in index["models"] if e["name"] == "ctr-fp32"), None)
    rows = []
    for e in index["models"]:
        ratio = f"{e['size_bytes'] / fp32:.3f}" if fp32 else "-"
        rss = f"{e['rss_bytes'] / 2**20:.1f}" if e.get("rss_bytes") else "-"
        rows.append([e["name"], e["quantization"], f"{e['size_bytes']:,}", ratio, rss, f"{e['test_auc']:.5f}",
                     f"{e['dauc']:+.5f} [{e['dauc_ci'][0]:+.5f}, {e['dauc_ci'][1]:+.5f}]", verdict_cell(e)])
    ref = index["reference"]
    rows_source = ref.get("rows_source", "test split")
    where = (f"every row of the eval file {ref['eval_data']['path']}" if rows_source == "eval file" and
             ref.get("eval_data") else "the held-out test rows")
    lines = [f"reference: full Keras model, AUC {ref['keras_test_auc']:.5f} on {ref['test_rows']:,} rows "
             f"({where}); budget: dAUC >= -{ref['budget']} judged on the paired bootstrap 95% interval "
             f"(met: lower bound >= -budget; missed: upper bound < -budget or point loss over "
             f"{_factor(ref)} budgets; else not resolved)"]
    bayes = ref.get("bayes")
    if bayes:
        lines.append(f"Bayes-optimal on the same rows: AUC {bayes['bayes_auc']:.4f}, logloss "
                     f"{bayes['bayes_logloss']:.4f}")
        ceiling = bayes.get("ceiling") or {}
        if ceiling.get("status") == "measured":
            lines.append(f"learnable ceiling (logistic regression on the planted structure) on the same rows: "
                         f"AUC {ceiling['test_auc']:.4f}, logloss {ceiling['test_logloss']:.4f}")
    notes = [f"{e['name']}: not written: {e['not_written']}" for e in index["models"] if e.get("not_written")]
    notes += [f"{e['name']}: " + "; ".join(e["flags"]) for e in index["models"] if e.get("flags")]
    return markdown_table(["variant", "quantization", "bytes", "x fp32", "RSS MiB", "AUC", "dAUC [95% CI]",
                           "budget verdict"], rows) + "\n" + "\n".join(lines + notes)


def _factor(ref: dict[str, Any]) -> str:
    rule = (ref.get("verdict_rule") or {}).get("missed", "")
    return rule.split("point loss > ")[-1].split(" x")[0] if "point loss > " in rule else "4"


def seeds_table(rows: Sequence[dict[str, Any]]) -> str:
    """``python -m ctredge.benchmarks.seeds``: one row per model (mean ± spread over seeds) or variant (dAUC)."""
    out = []
    for r in rows:
        out.append([r["name"], str(r["seeds"]), r["value"], r["spread"], r["each"]])
    return markdown_table(["model / variant", "seeds", "mean", "spread (min..max, sd)", "per seed"], out)


def train_table(name: str, manifest: dict[str, Any]) -> list[str]:
    """One row of the pipeline's training table from a ``train`` manifest."""
    m = manifest["metrics"]
    return [name, f"{m['test_auc']:.4f}", f"{m['test_logloss']:.4f}", f"{m['test_calibration']:.3f}",
            str(m["epochs"]), f"{m['seconds_per_epoch']:.1f}", f"{manifest['extra']['params']['total']:,}"]


__all__ = ["markdown_table", "index_table", "train_table", "verdict_cell", "seeds_table"]
