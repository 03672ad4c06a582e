"""Markdown tables the command line prints and the pipeline report embeds (standard library only)."""

from __future__ import annotations

from typing import Any, Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def index_table(index: dict[str, Any]) -> str:
    """A repository's ``index.json`` (``ctredge compress all``) as a Markdown table plus its reference line."""
    fp32 = next((e["size_bytes"] for e in index["models"] if e["name"] == "ctr-fp32"), None)
    rows = []
    for e in index["models"]:
        ratio = f"{e['size_bytes'] / fp32:.3f}" if fp32 else "-"
        rss = f"{e['rss_bytes'] / 2**20:.1f}" if e.get("rss_bytes") else "-"
        rows.append([e["name"], e["quantization"], f"{e['size_bytes']:,}", ratio, rss, f"{e['test_auc']:.5f}",
                     f"{e['dauc']:+.5f} [{e['dauc_ci'][0]:+.5f}, {e['dauc_ci'][1]:+.5f}]",
                     "REFUSED: " + e["refused"] if e.get("refused") else "yes" if e["within_budget"] else "NO"])
    ref = index["reference"]
    return (markdown_table(["variant", "quantization", "bytes", "x fp32", "RSS MiB", "test AUC", "dAUC [95% CI]",
                            "within budget"], rows)
            + f"\nreference: full Keras model, test AUC {ref['keras_test_auc']:.5f} on {ref['test_rows']:,} rows; "
              f"budget dAUC >= -{ref['budget']}")


def train_table(name: str, manifest: dict[str, Any]) -> list[str]:
    """One row of the pipeline's training table from a ``train`` manifest."""
    m = manifest["metrics"]
    return [name, f"{m['test_auc']:.4f}", f"{m['test_logloss']:.4f}", f"{m['test_calibration']:.3f}",
            str(m["epochs"]), f"{m['seconds_per_epoch']:.1f}", f"{manifest['extra']['params']['total']:,}"]


__all__ = ["markdown_table", "index_table", "train_table"]
