"""The cheap baselines of ``ctredge bench``: fit on the DataPlan's train rows, scored on its test rows (no time asserted)."""

import builtins

import numpy as np
import pytest

from ctredge.benchmarks import baselines as B
from ctredge.benchmarks.report import render_markdown, targets
from ctredge.dataplan import DataPlan
from ctredge.datagen import generate
from ctredge.features import FeatureSpec

pytest.importorskip("sklearn")
pytest.importorskip("lightgbm")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """4,000 synthetic rows with history (planted signal), split as ``ctredge train`` splits them."""
    root = tmp_path_factory.mktemp("baselines")
    data = root / "clicks.tsv"
    generate(str(data), rows=4000, seed=0, history=True, click_rate=0.2)
    spec = FeatureSpec.load(str(root / "clicks.spec.json"))
    p = DataPlan.from_files([str(data)], seed=0)
    return {"data": data, "spec": spec, "plan": p, "manifest": {"data": p.to_manifest()},
            "test": p.read("test", spec)}


@pytest.fixture(scope="module")
def fitted(plan):
    ref = np.random.default_rng(0).random(len(plan["test"]))  # a reference model that knows nothing
    return B.baselines(plan["manifest"], plan["spec"], plan["test"], reference=ref, reference_name="random",
                       bootstrap=20, rows_source="test split")


def test_both_baselines_fit_and_beat_random_on_a_planted_signal(fitted, plan):
    assert fitted["status"] == "measured", fitted["reason"]
    rows = {r["name"]: r for r in fitted["rows"]}
    assert list(rows) == [B.LR_MODEL, B.LGBM_MODEL]
    for r in rows.values():
        assert r["scored"], r.get("error")
        assert r["kind"] == "baseline" and r["bytes"] is None
        assert 0 < r["logloss"] < 1 and 0.5 < r["calibration"] < 1.5 and 0 < r["normalized_entropy"] < 1.05
        assert r["test_rows"] == len(plan["test"]) and r["fit_seconds"] >= 0
        assert r["dauc"] is not None and r["dauc_ci"][0] <= r["dauc"] <= r["dauc_ci"][1]
    assert rows[B.LR_MODEL]["auc"] > 0.55
    assert rows[B.LGBM_MODEL]["auc"] > 0.5
    assert rows[B.LR_MODEL]["info"]["C"] in B.LR_GRID


def test_the_rows_used_are_exactly_the_plans_parts(plan, monkeypatch):
    seen = {}

    def spy(name):
        def fit(enc, train, valid, test):
            seen[name] = (train, valid, test)
            return np.full(len(test), float(train.labels.mean())), {}
        return fit

    monkeypatch.setattr(B, "FITTERS", {n: spy(n) for n in B.BASELINES})
    out = B.baselines(plan["manifest"], plan["spec"], plan["test"], bootstrap=0)
    assert out["status"] == "measured"
    parts = plan["plan"].read_parts(plan["spec"])
    key = lambda b: set(zip(b.file_no.tolist(), b.line_no.tolist()))  # noqa: E731
    for name in B.BASELINES:
        train, valid, test = seen[name]
        assert key(train) == key(parts["train"]) and key(valid) == key(parts["valid"])
        assert key(test) == key(parts["test"])
        assert not key(train) & key(test) and not key(valid) & key(test)
        np.testing.assert_array_equal(train.feeds["cat"], parts["train"].feeds["cat"])
    assert out["train_rows"] == len(parts["train"]) and out["valid_rows"] == len(parts["valid"])


def test_history_features_use_only_the_inputs(plan):
    from ctredge.benchmarks.baseline_features import Encoder

    spec, train = plan["spec"], plan["plan"].read("train", plan["spec"])
    enc = Encoder.fit(spec, train)
    h = enc.history(plan["test"])
    assert {"hist_len", "item_in_hist", "category_in_hist"} <= set(h)
    item = spec.item_feature_index
    hist, cand = plan["test"].feeds["hist"], plan["test"].feeds["cat"][:, item]
    np.testing.assert_array_equal(h["item_in_hist"], (hist == cand[:, None]).any(axis=1))
    x = enc.sparse(plan["test"])
    assert x.shape[0] == len(plan["test"]) and (x.sum(axis=1) > 0).all()


def test_missing_packages_are_reported_and_nothing_is_fit(plan, monkeypatch):
    real_import = builtins.__import__

    def no_lightgbm(name, *args, **kwargs):
        if name == "lightgbm" or name.startswith("lightgbm."):
            raise ImportError("No module named 'lightgbm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightgbm)
    out = B.baselines(plan["manifest"], plan["spec"], plan["test"])
    assert out["status"] == "not measured" and "lightgbm" in out["reason"] and "baselines" in out["reason"]
    assert out["rows"] == []


def test_no_plan_or_training_rows_as_test_rows_is_not_measured(plan):
    assert B.baselines(None, plan["spec"], plan["test"])["status"] == "not measured"
    out = B.baselines(plan["manifest"], plan["spec"], plan["test"], rows_source="training file")
    assert out["status"] == "not measured" and "training file" in out["reason"]


def test_the_report_shows_baseline_rows_and_keeps_them_out_of_the_budget(fitted):
    acc = {"reference": "keras-full", "rows": 400, "rows_source": "test split", "bootstrap": 20, "seed": 0,
           "models": [{"name": "keras-full", "kind": "keras", "auc": 0.6, "dauc": 0.0, "dauc_ci": [0, 0],
                       "bytes": 10, "scored": True}] + fitted["rows"],
           "baselines": {k: v for k, v in fitted.items() if k != "rows"}}
    md = render_markdown({"accuracy": acc})
    assert "baseline-lr (baseline)" in md and "baseline-lgbm (baseline)" in md
    assert "fit by `ctredge bench`" in md
    assert all(t["model"] not in B.BASELINES for t in targets({"accuracy": acc}))
    missing = render_markdown({"accuracy": {**acc, "models": acc["models"][:1],
                                            "baselines": {"status": "not measured", "reason": "lightgbm not "
                                                                                              "installed"}}})
    assert "Baselines: not measured (lightgbm not installed)" in missing
