"""benchmarks/text.py without training anything: the data is reused when its truth says so, the table prints
every figure, and the module imports no torch until the encoder is exported."""

from __future__ import annotations

import json
import subprocess
import sys

from ctredge.benchmarks import text as tb

RESULT = {
    "rows": 1000, "seed": 3, "epochs": 2, "cpus": 2, "seconds": 1.0,
    "auc": {"plain_test_auc": 0.8, "plain_test_logloss": 0.11, "text_test_auc": 0.81, "text_test_logloss": 0.105,
            "test_rows": 100, "bayes_auc": 0.87, "bayes_auc_without_text_term": 0.84},
    "reach": {"rows": 500, "bayes_auc": 0.87, "bayes_auc_without_text_term": 0.84, "with_cosine_auc": 0.85,
              "cosine_weight": 3.0, "cosine_auc_same_concept": 0.8},
    "stacked": {"folds": [{"scored": "odd", "rows": 50, "plain_auc": 0.79, "plain_plus_cosine_auc": 0.8,
                           "text_auc": 0.805}]},
    "encoder": {"sentences": 12, "max_abs_diff": 1e-7, "min_cosine": 0.9999999},
    "latency": [{"batch": 1, "request": "batch 1", "plain_ms": 1.0, "text_raw_query_ms": 4.0, "text_query_emb_ms": 1.1,
                 "added_raw_ms": 3.0, "added_emb_ms": 0.1, "calls": 10}],
}


def test_table_shows_the_auc_difference_the_reach_and_the_latency():
    md = tb.table(RESULT)
    assert "| difference | +0.0100 | -0.00500 |" in md
    assert "plus 3 x the query-title cosine, 0.8500" in md
    assert "| odd (50) | 0.7900 | 0.8000 | 0.8050 |" in md
    assert "| batch 1 | 1.000 | 4.000 | +3.000 | 1.100 | +0.100 |" in md


def test_the_data_is_generated_once(tmp_path):
    path = str(tmp_path / "t.tsv")
    first = tb._data(path, 2000, 3)
    assert first["text"]["relevant_rows"] > 0
    mtime = (tmp_path / "t.tsv").stat().st_mtime_ns
    again = tb._data(path, 2000, 3)
    assert again["data_sha256"] == first["data_sha256"] and (tmp_path / "t.tsv").stat().st_mtime_ns == mtime
    other = tb._data(path, 1500, 3)
    assert other["rows"] == 1500


def test_importing_the_benchmark_loads_no_torch():
    code = ("import json, sys\nimport ctredge.benchmarks.text, ctredge.export.text_encoder\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
