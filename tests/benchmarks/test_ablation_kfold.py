"""benchmarks/ablation.py and benchmarks/kfold.py on tiny data: every step trains, tables render, folds partition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctredge.benchmarks import ablation, kfold
from ctredge.datagen import generate
from ctredge.errors import ConfigError, DataError


def test_fold_files_put_every_row_in_one_test_fold(tmp_path):
    data = tmp_path / "clicks.tsv"
    generate(str(data), rows=300, seed=3)
    triples = kfold.fold_files(str(data), tmp_path / "folds", 3, seed=0, valid_fraction=0.2)
    lines = data.read_bytes().splitlines()
    tests = [open(t["test"], "rb").read().splitlines() for t in triples]
    assert sorted(x for t in tests for x in t) == sorted(lines)
    for t in triples:
        parts = [set(open(t[p], "rb").read().splitlines()) for p in ("train", "valid", "test")]
        assert sum(map(len, parts)) == len(lines) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    with pytest.raises(ConfigError, match="folds"):
        kfold.fold_files(str(data), tmp_path / "f", 1, 0, 0.2)
    with pytest.raises(DataError, match="at least"):
        kfold.fold_files(str(data), tmp_path / "f", 40, 0, 0.2)


@pytest.mark.slow
def test_ablation_trains_each_step_and_renders(tmp_path):
    data = tmp_path / "clicks.tsv"
    generate(str(data), rows=3000, seed=1, history=True)
    result = ablation.run(str(data), str(tmp_path / "out"), eval_data=str(data), steps=["recipe", "no-matches"],
                          epochs=1)
    assert [r["step"] for r in result["rows"]] == ["recipe", "no-matches"]
    for r in result["rows"]:
        assert 0 < r["test_auc"] < 1 and 0 < r["eval_auc"] < 1
    saved = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert saved["rows"][0]["test_auc"] == pytest.approx(result["rows"][0]["test_auc"])
    assert "no-matches" in (tmp_path / "out" / "ablation.md").read_text()
    assert np.isfinite([b["test_auc"] for b in result["baselines"]]).all()
    with pytest.raises(Exception, match="unknown step"):
        ablation.run(str(data), str(tmp_path / "o2"), steps=["nope"])
