"""``ctredge datagen --text``: title and query columns, relevance in the labels, other columns unchanged;
the FeatureSpec's text features and the reader's raw text columns.  No encoder needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ctredge import datagen
from ctredge.errors import SpecError
from ctredge.features import FeatureSpec, TextFeature
from ctredge.reader import read_all, sidecar_path

ROWS = 3000


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dgtext")
    plain = datagen.generate(str(root / "plain.tsv"), rows=ROWS, seed=4, history=True)
    text = datagen.generate(str(root / "text.tsv"), rows=ROWS, seed=4, history=True, text=True)
    return root, plain, text


def _lines(path):
    return open(path, "rb").read().split(b"\n")[:-1]


def test_text_appends_two_columns_and_keeps_every_other_byte(files):
    root, _, _ = files
    plain, text = _lines(root / "plain.tsv"), _lines(root / "text.tsv")
    assert len(plain) == len(text) == ROWS
    for p, t in zip(plain, text):
        pf, tf = p.split(b"\t"), t.split(b"\t")
        assert len(tf) == len(pf) + 2
        assert tf[1:len(pf)] == pf[1:]       # features identical; only the label may differ (the text term)
        assert tf[-2]                          # every row has a title


def test_queries_only_on_search_rows_in_words_the_title_never_uses(files):
    arr = datagen.generate_arrays(ROWS, seed=4, text=True)
    search = arr["ids"]["page"] == datagen.SEARCH
    has_query = np.array([bool(q) for q in arr["query"]])
    np.testing.assert_array_equal(has_query, search)
    title_words = {w for t, _ in datagen.CONCEPTS + datagen.COLOURS + datagen.AUDIENCES for f in t for w in f.split()}
    title_words |= {w for f in datagen.TITLE_FILLERS for w in f.split()}
    query_words = {w for _, q in datagen.CONCEPTS + datagen.COLOURS + datagen.AUDIENCES for f in q for w in f.split()}
    assert not (title_words & query_words)
    for q, t in zip(arr["query"], arr["title"]):
        if q:
            assert not (set(q.split()) - {"in", "for"}) & set(t.split())


def test_relevance_carries_clicks_and_the_truth_records_it(files):
    _, _, truth = files
    arr = datagen.generate_arrays(20_000, seed=4, text=True)
    rel, y = arr["relevance"], arr["labels"]
    assert rel.min() == 0 and rel.max() == pytest.approx(1.0) and (rel > 0).any()
    assert y[rel > 0.9].mean() > 1.5 * y[(rel == 0) & (arr["ids"]["page"] == datagen.SEARCH)].mean()
    t = truth["text"]
    assert t["columns"] == ["title", "query"] and t["text_relevance"] == datagen.WorldParams().text_relevance
    assert t["bayes_auc"] > t["bayes_auc_without_text_term"] + 0.01
    on_disk = json.load(open(sidecar_path(str(files[0] / "text.tsv"), "truth")))
    assert on_disk["text"]["relevant_rows"] == t["relevant_rows"]


def test_without_text_the_arrays_are_unchanged():
    a = datagen.generate_arrays(500, seed=2)
    b = datagen.generate_arrays(500, seed=2)
    assert "text" not in a["terms"] and "title" not in a
    np.testing.assert_array_equal(a["probs"], b["probs"])
    t = datagen.generate_arrays(500, seed=2, text=True)
    np.testing.assert_array_equal(a["cat_raw"], t["cat_raw"])
    np.testing.assert_array_equal(a["dense"], t["dense"])


def test_spec_declares_the_text_features_and_the_reader_keeps_the_raw_strings(files):
    root, _, _ = files
    spec = FeatureSpec.load(sidecar_path(str(root / "text.tsv"), "spec"))
    assert [(t.name, t.source, t.key) for t in spec.text] == [("title", "table", "item_id"), ("query", "request", None)]
    assert spec.input_signature()["query_emb"] == ("float32", (None, 384))
    assert FeatureSpec.from_json(spec.to_json()) == spec
    batch = read_all(str(root / "text.tsv"), spec)
    arr = datagen.generate_arrays(ROWS, seed=4, history=True, text=True)
    assert [v.decode() for v in batch.text["title"]] == arr["title"]
    assert [v.decode() for v in batch.text["query"]] == arr["query"]
    assert "query_emb" not in batch.feeds          # the reader encodes nothing
    np.testing.assert_array_equal(batch.labels, arr["labels"])
    sub = batch.take(np.arange(5))
    assert list(sub.text["query"]) == list(batch.text["query"][:5])


def test_a_spec_without_text_reads_the_same_file_and_drops_the_columns(files):
    root, _, _ = files
    spec = FeatureSpec.load(sidecar_path(str(root / "text.tsv"), "spec"))
    plain = spec.without_text()
    assert plain.text == () and plain.skip_text == ("title", "query") and "query_emb" not in plain.input_signature()
    assert FeatureSpec.from_json(plain.to_json()) == plain
    a, b = read_all(str(root / "text.tsv"), plain), read_all(str(root / "text.tsv"), spec)
    assert a.text is None
    for k in a.feeds:
        np.testing.assert_array_equal(a.feeds[k], b.feeds[k])


def test_a_spec_without_text_writes_json_as_before():
    spec = datagen.make_spec(history=True)
    d = json.loads(spec.to_json())
    assert "text" not in d and "skip_text" not in d


def test_text_feature_checks():
    with pytest.raises(SpecError, match="needs a key"):
        TextFeature("title", source="table")
    with pytest.raises(SpecError, match="source"):
        TextFeature("q", source="somewhere")
    base = datagen.make_spec(history=False)
    with pytest.raises(SpecError, match="not a categorical feature"):
        FeatureSpec(dense=base.dense, cat=base.cat, text=(TextFeature("title", source="table", key="nope"),))
    with pytest.raises(SpecError, match="unique"):
        FeatureSpec(dense=base.dense, cat=base.cat, text=(TextFeature("item_id"),))
