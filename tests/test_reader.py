"""The hub reader on the real Criteo rows and on small hand-made logs."""

import gzip

import numpy as np
import pytest

from ctredge.errors import DataError
from ctredge.features import CatFeature, DenseFeature, FeatureSpec, HistorySpec, hash_value
from ctredge.reader import ReadStats, SplitSpec, iter_batches, iter_raw, read_all, resolve_spec, sidecar_path


def test_real_criteo_sample_with_trimmed_lines(criteo_sample):
    spec = FeatureSpec.criteo(1000)
    stats = ReadStats()
    chunks = list(iter_batches(criteo_sample, spec, chunk_rows=128, stats=stats))
    assert sum(len(c) for c in chunks) == 1000 == stats.rows
    assert stats.padded_lines == 498  # NOTICE.md: 498 lines had trailing empty fields trimmed
    batch = read_all(criteo_sample, spec)
    assert batch.labels.sum() == 205  # NOTICE.md: 205 clicks
    assert batch.feeds["dense"].shape == (1000, 13) and batch.feeds["dense"].dtype == np.float32
    assert batch.feeds["cat"].shape == (1000, 26) and batch.feeds["cat"].dtype == np.int64
    assert np.isnan(batch.feeds["dense"]).any()  # missing counts are NaN
    assert (batch.feeds["cat"] == 0).any()  # empty categoricals are id 0
    assert batch.feeds["cat"].max() < 1000
    # first row, by hand: label 0, I1=1, I2=1, I3=5, C1=68fd1e64
    assert batch.labels[0] == 0
    assert batch.feeds["dense"][0, :3].tolist() == [1.0, 1.0, 5.0]
    assert batch.feeds["cat"][0, 0] == hash_value("68fd1e64", "C1", 1000)
    # chunking does not change the rows
    whole = read_all(criteo_sample, spec, chunk_rows=100_000)
    np.testing.assert_array_equal(whole.feeds["cat"], batch.feeds["cat"])


def _spec(history=False):
    return FeatureSpec(
        dense=(DenseFeature("n"), DenseFeature("price", integer=False)),
        cat=(CatFeature("u", 100, "user"), CatFeature("item", 100, "item")),
        history=HistorySpec("item", max_len=3) if history else None,
    )


def _write(path, text):
    path.write_text(text)
    return path


def test_malformed_rows_name_file_and_line(tmp_path):
    good = "1\t3\t2.5\ta\tb\n"
    f = _write(tmp_path / "x.tsv", good + good + "0\t1.5\t2\ta\tb\n" + good)
    with pytest.raises(DataError, match=r"x\.tsv:3: .*integer count.*'1\.5'"):
        list(iter_batches(f, _spec()))
    f = _write(tmp_path / "y.tsv", good + "2\t1\t1\ta\tb\n")
    with pytest.raises(DataError, match=r"y\.tsv:2: label must be 0 or 1, got '2'"):
        list(iter_batches(f, _spec()))
    f = _write(tmp_path / "z.tsv", good + "1\t1\t1\ta\tb\textra\n")
    with pytest.raises(DataError, match=r"z\.tsv:2: expected 5 tab-separated fields"):
        list(iter_batches(f, _spec()))
    f = _write(tmp_path / "w.tsv", good + "1\tx\n")
    with pytest.raises(DataError, match=r"w\.tsv:2: expected 5"):
        list(iter_batches(f, _spec()))


def test_skip_bad_rows_counts_and_keeps_the_rest(tmp_path):
    good = "1\t3\t2.5\ta\tb\n"
    f = _write(tmp_path / "x.tsv", good + "0\tbad\t2\ta\tb\n" + good + "9\t1\t1\ta\tb\n" + good)
    stats = ReadStats()
    batch = read_all(f, _spec(), skip_bad_rows=True, stats=stats, chunk_rows=2)
    assert len(batch) == 3 and stats.bad_rows == 2
    assert batch.line_no.tolist() == [1, 3, 5]
    assert "x.tsv:2" in stats.first_bad[0]


def test_missing_values_gzip_and_history(tmp_path):
    text = "1\t\t2.5\t\tb\ti1,i2,i3,i4\n0\t-3\t\tu\t\t\n"
    f = tmp_path / "h.tsv.gz"
    with gzip.open(f, "wt") as fh:
        fh.write(text)
    spec = _spec(history=True)
    b = read_all(f, spec)
    assert np.isnan(b.feeds["dense"][0, 0]) and b.feeds["dense"][0, 1] == np.float32(2.5)
    assert b.feeds["dense"][1, 0] == -3 and np.isnan(b.feeds["dense"][1, 1])
    assert b.feeds["cat"][0, 0] == 0 and b.feeds["cat"][1, 1] == 0
    item = lambda v: hash_value(v, "item", 100)  # noqa: E731
    assert b.feeds["hist"].tolist() == [[item("i2"), item("i3"), item("i4")], [0, 0, 0]]
    raw = next(iter_raw(f, spec))
    assert raw.cat_raw[0].tolist() == [b"", b"b"] and raw.hist_raw[0] == [b"i1", b"i2", b"i3", b"i4"]


def test_split_is_deterministic_and_disjoint(tmp_path):
    lines = "".join(f"{i % 2}\t{i}\t1\tu{i}\tb\n" for i in range(2000))
    f = _write(tmp_path / "s.tsv", lines)
    split = SplitSpec(seed=3, valid=0.1, test=0.2)
    parts = {p: read_all(f, _spec(), split=split, part=p, chunk_rows=333) for p in ("train", "valid", "test")}
    sizes = {p: len(b) for p, b in parts.items()}
    assert sum(sizes.values()) == 2000
    assert 120 < sizes["valid"] < 280 and 320 < sizes["test"] < 480
    seen = np.concatenate([b.line_no for b in parts.values()])
    assert len(np.unique(seen)) == 2000
    again = read_all(f, _spec(), split=split, part="test", chunk_rows=1000)
    np.testing.assert_array_equal(again.line_no, parts["test"].line_no)
    other = read_all(f, _spec(), split=SplitSpec(seed=4, valid=0.1, test=0.2), part="test")
    assert not np.array_equal(other.line_no[:50], parts["test"].line_no[:50])


def test_missing_file_and_spec_errors(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        list(iter_batches(tmp_path / "nope.tsv", _spec()))
    assert sidecar_path("a/clicks.tsv.gz", "spec") == "a/clicks.spec.json"
    with pytest.raises(DataError, match="clicks.spec.json"):
        resolve_spec(str(tmp_path / "clicks.tsv"))
    assert resolve_spec("whatever.tsv", "criteo", buckets=10).n_cat == 26


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "nan", "NaN", "1e39"])
def test_non_finite_dense_values_are_refused_with_file_and_line(tmp_path, value):
    path = _write(tmp_path / "c.tsv", f"1\t3\t2.5\ta\ti\n0\t1\t{value}\tb\ti\n")
    with pytest.raises(DataError, match=rf"c\.tsv:2: dense feature price \(field 3\) must be a finite number "
                                        rf"\(empty = missing\) within float32's range, got '{value}'"):
        read_all(path, _spec())


def test_non_finite_integer_counts_are_refused(tmp_path):
    path = _write(tmp_path / "c.tsv", "1\tinf\t2.5\ta\ti\n")
    with pytest.raises(DataError, match=r"c\.tsv:1: dense feature n \(field 2\) must be an integer count, got 'inf'"):
        read_all(path, _spec())


def test_non_finite_rows_are_skipped_and_counted_with_skip_bad_rows(tmp_path):
    path = _write(tmp_path / "c.tsv", "1\t3\t2.5\ta\ti\n0\t\t\tb\ti\n0\t1\t-inf\tc\ti\n1\tnan\t1\td\ti\n0\t2\t1\te\ti\n")
    stats = ReadStats()
    batch = read_all(path, _spec(), skip_bad_rows=True, stats=stats)
    assert stats.bad_rows == 2 and batch.line_no.tolist() == [1, 2, 5]
    dense = batch.feeds["dense"]
    assert np.isnan(dense[1]).all() and np.isfinite(dense[[0, 2]]).all()  # empty is still missing = NaN
    assert stats.first_bad[0].startswith(f"{path}:3: dense feature price")
