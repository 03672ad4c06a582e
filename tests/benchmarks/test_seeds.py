"""python -m ctredge.benchmarks.seeds on tiny data: one split for every seed, spreads, the determinism check."""

import json

import numpy as np
import pytest

from ctredge.benchmarks import seeds as S
from ctredge.dataplan import DataPlan
from ctredge.datagen import generate
from ctredge.features import FeatureSpec
from ctredge.reader import read_all, sidecar_path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("seeds") / "clicks.tsv"
    generate(str(path), rows=6000, seed=3, history=True, click_rate=0.2)
    return path


def test_split_files_hold_exactly_the_default_split_rows(data, tmp_path):
    paths = S.split_files(data, tmp_path / "split")
    spec = FeatureSpec.load(sidecar_path(data, "spec"))
    plan = DataPlan.from_files([str(data)], seed=0)
    for part in S.PARTS:
        want, got = plan.read(part, spec), read_all(paths[part], spec)
        assert np.array_equal(want.labels, got.labels) and np.array_equal(want.feeds["cat"], got.feeds["cat"])
    mtime = paths["test"].stat().st_mtime_ns
    assert S.split_files(data, tmp_path / "split")["test"].stat().st_mtime_ns == mtime  # reused


def test_spread_of_figures():
    sp = S.spread([0.70, 0.72, 0.71])
    assert sp["mean"] == pytest.approx(0.71) and sp["min"] == 0.70 and sp["max"] == 0.72
    assert sp["sd"] == pytest.approx(0.01) and S.spread([0.5])["sd"] == 0.0


@pytest.mark.slow
def test_seeds_report_and_the_same_seed_trains_identically(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert S.main(["--data", str(data), "--out", str(out), "--models", "seed", "--seeds", "0,1", "--epochs", "1",
                   "--repeat"]) == 0
    result = json.loads((out / "seeds.json").read_text())
    model = result["models"]["seed"]
    assert set(model["per_seed"]) == {"0", "1"} and model["test_auc"]["n"] == 2
    assert model["test_auc"]["min"] <= model["test_auc"]["mean"] <= model["test_auc"]["max"]
    det = result["determinism"]
    assert det["identical"], det  # same seed, same machine: the same AUCs, run after run
    printed = capsys.readouterr().out
    assert "| seed (test AUC) | 2 |" in printed and "trained twice on this machine: every recorded figure identical" in printed
