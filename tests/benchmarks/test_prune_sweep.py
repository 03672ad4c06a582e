"""benchmarks/prune_sweep.py: each knob's rows on a tiny trained model, and the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest

from ctredge.benchmarks.prune_sweep import main, render, sweep
from ctredge.datagen import generate
from ctredge.train.models import ModelConfig
from ctredge.train.train import TrainConfig, load_trained, train


@pytest.mark.slow
def test_sweep_scores_each_setting_and_changes_nothing_on_disk(tmp_path):
    data = tmp_path / "clicks.tsv"
    generate(str(data), rows=4000, seed=0, history=True, click_rate=0.2)
    out = tmp_path / "trained"
    train(TrainConfig(data=(str(data),), out=str(out), batch_size=256, epochs=1, verbose=0, min_count=2,
                      split_valid=0.15, split_test=0.15),
          ModelConfig(model="dcnv2", embedding_dim=4, cross_layers=1, mlp_units=(8,), wide=True, wide_buckets=1024))
    before = [w.copy() for w in load_trained(out)[0].get_weights()]
    rows = sweep(str(out), [0.0, 0.99], [2, 50], wide_at=0.5)
    wide = [r for r in rows if r["knob"] == "wide sparsity"]
    counts = [r for r in rows if r["knob"].startswith("min count")]
    assert [r["value"] for r in wide] == [0.0, 0.99] and [r["value"] for r in counts] == [2, 50]
    # the tiny data leaves most of the table at 0 already: 99% by magnitude leaves fewer than it
    assert wide[1]["rows_kept"] < 0.5 * wide[0]["rows_kept"]
    assert counts[1]["rows_kept"] < counts[0]["rows_kept"]
    assert all(0.3 < r["valid_auc"] < 1 and 0.3 < r["test_auc"] < 1 for r in rows)
    assert all(np.array_equal(a, b) for a, b in zip(before, load_trained(out)[0].get_weights()))
    assert "| wide sparsity | 0.99 |" in render(rows)
    assert main([str(out), "--wide", "0.5", "--min-counts", "", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "prune_sweep.md").read_text().count("| wide sparsity |") == 1
