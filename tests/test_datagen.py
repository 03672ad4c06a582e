"""Tests of the synthetic click-log generator (ctredge/datagen.py): small, seconds."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from ctredge import datagen, metrics, reader
from ctredge.errors import ConfigError, DataError
from ctredge.features import FeatureSpec

ROWS = 3000


def _write(tmp_path, name="clicks.tsv", rows=ROWS, **kwargs):
    path = tmp_path / name
    truth = datagen.generate(str(path), rows=rows, **kwargs)
    return path, truth


def _lines(path):
    return path.read_bytes().decode().splitlines()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """3,000 rows with history, seed 0, written once for the module."""
    path, truth = _write(tmp_path_factory.mktemp("hist"), seed=0, history=True)
    return path, truth


@pytest.fixture(scope="module")
def big():
    """20,000 rows in memory: enough clicks (~600) to see the planted effects."""
    return datagen.generate_arrays(20_000, seed=1, history=True)


# ------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_bytes(tmp_path):
    a, _ = _write(tmp_path / "a", seed=7, history=True)
    b, _ = _write(tmp_path / "b", seed=7, history=True, chunk_rows=1000)   # chunking does not matter
    for suffix in (".tsv", ".spec.json", ".truth.json"):
        assert (a.parent / f"clicks{suffix}").read_bytes() == (b.parent / f"clicks{suffix}").read_bytes()


def test_different_seed_gives_different_rows(tmp_path):
    a, ta = _write(tmp_path / "a", seed=0)
    b, tb = _write(tmp_path / "b", seed=1)
    la, lb = _lines(a), _lines(b)
    assert sum(x == y for x, y in zip(la, lb)) < len(la) // 100
    assert ta["bias"] != tb["bias"]


def test_fewer_rows_are_a_prefix(tmp_path, written):
    small, _ = _write(tmp_path, rows=1234, seed=0, history=True)
    assert _lines(small) == _lines(written[0])[:1234]


def test_without_history_writes_the_same_rows_minus_the_column(tmp_path, written):
    plain, truth = _write(tmp_path, seed=0, history=False)
    with_hist = [line.rsplit("\t", 1)[0] for line in _lines(written[0])]
    assert _lines(plain) == with_hist
    assert truth["bayes_auc"] == written[1]["bayes_auc"]
    spec = FeatureSpec.load(str(tmp_path / "clicks.spec.json"))
    assert spec.history is None and spec.n_columns == 1 + 7 + 11


# ------------------------------------------------------------------ layout
def test_every_line_has_the_spec_layout(written):
    path, _ = written
    spec = FeatureSpec.load(reader.sidecar_path(path, "spec"))
    rows = [line.split("\t") for line in _lines(path)]
    assert len(rows) == ROWS
    assert all(len(r) == spec.n_columns for r in rows)
    table = np.array(rows, dtype=object)
    assert set(table[:, 0]) == {"0", "1"}
    for j, feat in enumerate(spec.dense):
        col = [v for v in table[:, 1 + j] if v != ""]
        values = [float(v) for v in col]
        if feat.integer:
            assert all(v.lstrip("-").isdigit() for v in col), feat.name
        assert all(math.isfinite(v) for v in values)
    missing = {f.name: float(np.mean(table[:, 1 + j] == "")) for j, f in enumerate(spec.dense)}
    assert 0.005 < missing["user_orders_30d"] < 0.05 and missing["price"] == 0.0
    cats = table[:, 1 + spec.n_dense:1 + spec.n_dense + spec.n_cat]
    assert all(len(v) in (0, 8) and all(ch in "0123456789abcdef" for ch in v) for v in cats.ravel())
    cat_missing = {f.name: float(np.mean(cats[:, j] == "")) for j, f in enumerate(spec.cat)}
    assert 0.0 < cat_missing["brand"] < 0.2 and cat_missing["item_id"] == 0.0
    assert 0.3 < cat_missing["query_cat"] < 0.7   # only search pages carry a query


def test_history_holds_item_ids_oldest_first(written):
    path, _ = written
    vocab = {v.decode() for v in datagen.raw_vocabulary("item_id")}
    hist = [line.split("\t")[-1] for line in _lines(path)]
    lists = [h.split(",") if h else [] for h in hist]
    assert all(set(h) <= vocab for h in lists)
    lengths = np.array([len(h) for h in lists])
    assert lengths.max() <= 20 and (lengths == 0).any() and (lengths > 5).any()
    items = {line.split("\t")[1 + 7 + 7] for line in _lines(path)}   # the item_id column
    assert items <= vocab


def test_spec_round_trips_and_hashes_in_range(written):
    path, _ = written
    spec = FeatureSpec.load(reader.sidecar_path(path, "spec"))
    assert spec == datagen.make_spec(True)
    assert spec.history is not None and spec.history.item_feature == "item_id" and spec.history.max_len == 20
    sides = {f.name: f.side for f in spec.cat}
    assert sides["user_id"] == "user" and sides["item_id"] == "item" and sides["device"] == "context"
    assert {f.name: f.integer for f in spec.dense}["price"] is False
    arrays = datagen.generate_arrays(ROWS, seed=0, history=True)
    ids = spec.hash_cat(arrays["cat_raw"])
    assert ((ids >= 0) & (ids < spec.buckets)).all()
    assert ((ids == 0) == (arrays["cat_raw"] == b"")).all()
    for feat in spec.cat:
        vocab = datagen.raw_vocabulary(feat.name)
        assert feat.buckets >= 2 * len(vocab)
        if len(vocab) <= 64:   # tiny vocabularies are collision-free
            assert len(set(spec.hash_cat(np.tile(vocab[:, None], (1, spec.n_cat)))[:, spec.cat.index(feat)])) \
                == len(vocab)


def test_reader_parses_what_generate_arrays_returns(written):
    path, _ = written
    spec = reader.resolve_spec(path)
    batch = reader.read_all(path, spec)
    arrays = datagen.generate_arrays(ROWS, seed=0, history=True)
    np.testing.assert_array_equal(batch.labels, arrays["labels"])
    np.testing.assert_array_equal(batch.feeds["dense"], arrays["dense"])   # NaN == NaN here
    np.testing.assert_array_equal(batch.feeds["cat"], spec.hash_cat(arrays["cat_raw"]))
    np.testing.assert_array_equal(batch.feeds["hist"], spec.hash_history(arrays["history"]))


def test_gzip_output_is_readable(tmp_path):
    path, _ = _write(tmp_path, name="clicks.tsv.gz", rows=500, seed=3)
    assert gzip.decompress(path.read_bytes()).count(b"\n") == 500
    assert (tmp_path / "clicks.spec.json").is_file() and (tmp_path / "clicks.truth.json").is_file()
    assert len(reader.read_all(path, reader.resolve_spec(path))) == 500


# ------------------------------------------------------------------ truth
def test_truth_matches_the_rows_written(written):
    path, truth = written
    on_disk = json.loads(open(reader.sidecar_path(path, "truth")).read())
    assert on_disk == truth
    labels = np.array([int(line.split("\t", 1)[0]) for line in _lines(path)])
    assert truth["rows"] == ROWS and truth["seed"] == 0 and truth["history"] is True
    assert truth["click_rate"] == labels.mean()
    arrays = datagen.generate_arrays(ROWS, seed=0, history=True)
    np.testing.assert_array_equal(arrays["labels"], labels)
    assert truth["bayes_auc"] == metrics.auc(labels, arrays["probs"])
    assert truth["bayes_logloss"] == metrics.logloss(labels, arrays["probs"])
    assert {"params", "bias", "sizes", "data_sha256"} <= set(truth)


def test_click_rate_and_bayes_ceiling_are_realistic(big):
    truth = big["truth"]
    assert abs(truth["click_rate"] - 0.03) < 0.008
    assert 0.72 < truth["bayes_auc"] < 0.88
    high = datagen.generate_arrays(5000, seed=1, click_rate=0.2)
    assert abs(float(high["probs"].mean()) - 0.2) < 0.02
    np.testing.assert_array_equal(high["cat_raw"], big["cat_raw"][:5000])   # same world, other bias


def test_progress_is_reported(tmp_path):
    calls = []
    _write(tmp_path, rows=40_000, chunk_rows=20_000, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (40_000, 40_000)
    assert len(calls) >= 2 and all(a[0] < b[0] for a, b in zip(calls, calls[1:]))


# ------------------------------------------------------------------ the planted model
def _rate_gap_z(labels, high, low):
    """z-score of click rate(high rows) - click rate(low rows)."""
    a, b = labels[high], labels[low]
    se = math.sqrt(a.mean() * (1 - a.mean()) / len(a) + b.mean() * (1 - b.mean()) / len(b))
    return (a.mean() - b.mean()) / se


def test_segment_by_category_interaction_drives_clicks(big):
    labels, term = big["labels"].astype(float), big["terms"]["seg_x_cat"]
    lo, hi = np.quantile(term, [0.25, 0.75])
    assert _rate_gap_z(labels, term >= hi, term <= lo) > 4
    # it is an interaction: within every segment the term varies across categories
    seg = big["ids"]["segment"]
    assert all(term[seg == s].std() > 0.2 for s in np.unique(seg))


def test_history_matching_candidate_raises_clicks(big):
    # from the observable columns only: category of the candidate vs of the most recent history item
    col = {f.name: j for j, f in enumerate(datagen.make_spec(True).cat)}
    items, cats = big["cat_raw"][:, col["item_id"]], big["cat_raw"][:, col["category"]]
    item_cat = dict(zip(items.tolist(), cats.tolist()))
    last = [h[-1] if h else None for h in big["history"]]
    last_cat = np.array([item_cat.get(x, b"?") if x is not None else b"?" for x in last])
    known = last_cat != b"?"
    match = known & (last_cat == cats)
    assert match.sum() > 1000 and (known & ~match).sum() > 1000
    assert _rate_gap_z(big["labels"].astype(float), match, known & ~match) > 4


def test_position_bias(big):
    labels, pos = big["labels"].astype(float), big["ids"]["position"]
    assert _rate_gap_z(labels, pos <= 2, pos >= 10) > 4


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, fragment", [
    ({"rows": 0}, "rows must be an integer >= 1, got 0"),
    ({"rows": -5}, "got -5"),
    ({"rows": 2.5}, "got 2.5"),
    ({"click_rate": 0.0}, "click_rate must be a number in (0, 0.5], got 0.0"),
    ({"click_rate": 0.7}, "got 0.7"),
    ({"click_rate": "0.03"}, "got '0.03'"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"chunk_rows": 0}, "chunk_rows must be an integer >= 1"),
])
def test_bad_arguments_raise_config_error(tmp_path, kwargs, fragment):
    args = {"rows": 10, **kwargs}
    with pytest.raises(ConfigError) as err:
        datagen.generate(str(tmp_path / "x.tsv"), **args)
    assert fragment in str(err.value)
    assert not (tmp_path / "x.tsv").exists()


def test_generate_arrays_checks_arguments():
    with pytest.raises(ConfigError, match="rows"):
        datagen.generate_arrays(0)
    with pytest.raises(ConfigError, match="click_rate"):
        datagen.generate_arrays(10, click_rate=1.0)


def test_unwritable_path_raises_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="cannot write synthetic click log"):
        datagen.generate(str(blocker / "clicks.tsv"), rows=10)


def test_unknown_vocabulary_raises():
    with pytest.raises(ConfigError, match="item_id"):
        datagen.raw_vocabulary("nope")


# ------------------------------------------------------------------ sample seed, scopes, ceiling
#: sha256 of ``generate(rows=3000, seed=5, history=True)`` before the sample seed existed (commit 4c81672)
SHA_3000_SEED5_HISTORY = "58acbd9f9fa6043dde5cadc9734fec877cd303304ba17b1ae68abfe570b6e745"


def test_default_sample_seed_keeps_files_byte_identical(tmp_path):
    import hashlib

    a, ta = _write(tmp_path / "a", seed=5, history=True)
    b, tb = _write(tmp_path / "b", seed=5, history=True, sample_seed=5)
    assert hashlib.sha256(a.read_bytes()).hexdigest() == SHA_3000_SEED5_HISTORY
    assert a.read_bytes() == b.read_bytes() and ta["sample_seed"] == 5 and ta["data_sha256"] == tb["data_sha256"]


def test_sample_seed_draws_other_rows_of_the_same_world(tmp_path):
    base = datagen.generate_arrays(4000, seed=3)
    other = datagen.generate_arrays(4000, seed=3, sample_seed=9)
    world = datagen.generate_arrays(4000, seed=4, sample_seed=9)
    assert not np.array_equal(base["ids"]["user"], other["ids"]["user"])   # other rows
    assert base["truth"]["bias"] == other["truth"]["bias"]                  # the same world's bias ...
    # ... and the same planted effects: an item's item term is the same in both samples
    common = np.intersect1d(base["ids"]["item"], other["ids"]["item"])[:50]
    for it in common:
        assert base["terms"]["item"][base["ids"]["item"] == it][0] == other["terms"]["item"][other["ids"]["item"] == it][0]
    assert not np.array_equal(other["ids"]["user"], world["ids"]["user"])   # another world, same sample seed
    path, truth = _write(tmp_path, rows=2000, seed=3, sample_seed=9)
    assert truth["seed"] == 3 and truth["sample_seed"] == 9
    with pytest.raises(ConfigError, match="sample_seed"):
        datagen.generate(str(tmp_path / "x.tsv"), rows=10, sample_seed=-1)


def test_truth_test_scope_is_the_models_test_rows(written):
    from ctredge.dataplan import DataPlan

    path, truth = written
    spec = FeatureSpec.load(str(reader.sidecar_path(path, "spec")))
    test = DataPlan.from_files([str(path)], seed=0).read("test", spec)
    arrays = datagen.generate_arrays(ROWS, seed=0, history=True)
    probs = arrays["probs"][test.line_no - 1]
    scope = truth["scopes"]["test"]
    assert scope["rows"] == len(test) and scope["split"] == {"seed": 0, "valid": 0.1, "test": 0.1, "part": "test"}
    assert np.array_equal(arrays["labels"][test.line_no - 1], test.labels)
    assert scope["bayes_auc"] == pytest.approx(metrics.auc(test.labels, probs), abs=1e-12)
    assert truth["scopes"]["all"]["bayes_auc"] == truth["bayes_auc"]


def test_learnable_ceiling_is_recorded_between_chance_and_bayes(tmp_path):
    pytest.importorskip("sklearn")
    _, truth = _write(tmp_path, rows=12000, seed=0, history=True, click_rate=0.2, ceiling=True)
    c = truth["ceiling"]
    assert c["status"] == "measured" and c["test_rows"] == truth["scopes"]["test"]["rows"]
    assert 0.55 < c["test_auc"] < truth["scopes"]["test"]["bayes_auc"] + 0.01
    assert c["keys"] == list(datagen.CEILING_KEYS) and str(c["C"]) in c["valid_auc_by_C"]


def test_ceiling_without_scikit_learn_is_recorded_as_skipped(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("no sklearn here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    out = datagen.learnable_ceiling(np.zeros((4, 1), np.int64), np.zeros(4), np.zeros(4, np.int64),
                                    np.array([0, 1, 0, 1]), np.array([0, 1, 2, 0]))
    assert out["status"] == "skipped" and "scikit-learn" in out["reason"]
