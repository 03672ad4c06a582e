"""Request tensors -> contract feeds for a ctredge model: forms, ranking broadcast, hashing, id ranges."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from servekit import contract_feeds, raw_values, small_spec

from ctredge.features import hash_values
from ctredge.serve.client import ranking_inputs
from ctredge.serve.errors import InvalidInput
from ctredge.serve.signature import CtrSignature, HashMemo, _last_tokens
from ctredge.serving_config import RequestLimits


@pytest.fixture(scope="module")
def sig():
    return CtrSignature(small_spec(), max_batch_size=100)


def test_side_columns_follow_the_spec(sig):
    spec = sig.spec
    assert spec.columns("dense", "item") == [0, 3] and spec.columns("cat", "user") == [0, 1]
    names = [t.name for t in sig.inputs]
    assert names[:3] == ["dense", "cat", "hist"]
    assert {"dense_user", "dense_item", "dense_context", "cat_user", "cat_raw_user", "cat_item", "cat_raw_item",
            "cat_context", "cat_raw_context", "cat_raw", "hist_raw"} == set(names[3:])
    assert [t.name for t in sig.inputs if not t.optional] == ["dense", "cat", "hist"]


def test_contract_feeds_pass_through(sig):
    feeds = contract_feeds(sig.spec, 6)
    out = sig.prepare(feeds)
    for k in feeds:
        np.testing.assert_array_equal(out[k], feeds[k])


def test_server_hashing_is_the_training_hash(sig):
    spec = sig.spec
    raw = raw_values(spec, 7, seed=1)
    feeds = contract_feeds(spec, 7)
    out = sig.prepare({"dense": feeds["dense"], "cat_raw": raw, "hist": feeds["hist"]})
    np.testing.assert_array_equal(out["cat"], spec.hash_cat(raw))
    # by hand for one value: the documented function on (feature name, value, buckets)
    assert out["cat"][0, 4] == hash_values([raw[0, 4]], "brand", 64)[0]
    assert (out["cat"][raw == b""] == 0).all()


def test_hist_raw_hashed_with_the_item_feature(sig):
    spec = sig.spec
    feeds = contract_feeds(spec, 2)
    hist_raw = np.array([b"a,b", b",,c,"], dtype=object)  # [B] accepted beside [B, 1]; empty tokens dropped
    out = sig.prepare({"dense": feeds["dense"], "cat": feeds["cat"], "hist_raw": hist_raw})
    np.testing.assert_array_equal(out["hist"], spec.hash_history([[b"a", b"b"], [b"c"]]))
    assert out["hist"][1, 0] == hash_values([b"c"], "item_id", 500)[0] and out["hist"][1, 1] == 0


def test_ranking_assembly_equals_expanded(sig):
    spec = sig.spec
    n = 5
    feeds = contract_feeds(spec, n, seed=2)
    for kind in ("dense", "cat"):
        for side in ("user", "context"):
            cols = spec.columns(kind, side)
            feeds[kind][:, cols] = feeds[kind][:1, cols]
    feeds["hist"][:] = feeds["hist"][:1]
    ranking = ranking_inputs(spec, feeds)
    assert ranking["cat_user"].shape == (1, 2) and ranking["cat_item"].shape == (n, 2)
    assert ranking["hist"].shape == (1, 5) and ranking["dense_context"].shape == (1, 1)
    out = sig.prepare(ranking)
    for k in feeds:
        np.testing.assert_array_equal(out[k], feeds[k])
        assert out[k].flags.c_contiguous
    # mixed: ids for the user, raw values for the item and context
    raw = raw_values(spec, n, seed=3)
    raw[:, spec.columns("cat", "context")] = raw[:1, spec.columns("cat", "context")]
    mixed = {"dense": feeds["dense"], "cat_user": ranking["cat_user"],
             "cat_raw_item": raw[:, spec.columns("cat", "item")], "cat_raw_context": raw[:1, [2]],
             "hist": ranking["hist"]}
    out = sig.prepare(mixed)
    want = spec.hash_cat(raw)
    want[:, [0, 1]] = feeds["cat"][:1, [0, 1]]
    np.testing.assert_array_equal(out["cat"], want)


def test_ranking_inputs_refuses_rows_that_differ():
    spec = small_spec()
    with pytest.raises(ValueError, match="cat_user: rows differ"):
        ranking_inputs(spec, {"cat": contract_feeds(spec, 3)["cat"]})


@pytest.mark.parametrize("mutate, message", [
    (lambda f: {**f, "dense_user": f["dense"][:, [1]]}, "either whole ('dense') or per side ('dense_user')"),
    (lambda f: {k: v for k, v in f.items() if k != "dense"}, "missing input: the dense features"),
    (lambda f: {**f, "hist_raw": np.array([[b"a"]] * 3, dtype=object)}, "as 'hist' or 'hist_raw', got both"),
    (lambda f: {"dense": f["dense"], "cat_user": f["cat"][:, :2], "cat_item": f["cat"][:, 3:], "hist": f["hist"]},
     "missing input for the context-side cat features: send 'cat_context' or 'cat_raw_context' "
     "(columns ['device'])"),
    (lambda f: {**{k: v for k, v in f.items() if k != "cat"}, "cat_user": f["cat"][:, :2],
                "cat_raw_user": f["cat"][:, :2].astype(bytes).astype(object), "cat_item": f["cat"][:, 3:],
                "cat_context": f["cat"][:, [2]]}, "send the user-side cat features once"),
    (lambda f: {**f, "dense": f["dense"][:0], "cat": f["cat"][:0], "hist": f["hist"][:0]}, "0 rows"),
    (lambda f: {**f, "hist": f["hist"][:, :4]}, "input 'hist': got unexpected shape [3, 4], expected [-1, 5]"),
    (lambda f: {**f, "hist_raw": np.array([[b"a", b"b"]] * 3, dtype=object), "hist": None},
     "'hist_raw': got unexpected shape [3, 2], expected [-1, 1] or [-1]"),
])
def test_bad_forms(sig, mutate, message):
    f = mutate(contract_feeds(sig.spec, 3))
    f = {k: v for k, v in f.items() if v is not None}
    with pytest.raises(InvalidInput, match=re.escape(message)):
        sig.prepare(f)


def test_item_side_and_full_tensors_are_not_broadcast(sig):
    f = contract_feeds(sig.spec, 3)
    r = ranking_inputs(sig.spec, f, broadcast=())
    r["cat_item"] = r["cat_item"][:1]
    with pytest.raises(InvalidInput, match="mismatched batch sizes"):
        sig.prepare(r)
    with pytest.raises(InvalidInput, match="mismatched batch sizes"):
        sig.prepare({**f, "dense": f["dense"][:1]})


def test_id_range_checked_per_side_input(sig):
    f = contract_feeds(sig.spec, 2)
    r = ranking_inputs(sig.spec, f, broadcast=())
    r["cat_item"] = r["cat_item"].copy()
    r["cat_item"][1, 0] = 500
    with pytest.raises(InvalidInput, match=r"input 'cat_item': row 1, column 0 \(feature 'item_id'\): id 500 is "
                                           r"out of range, expected 0 <= id < 500"):
        sig.prepare(r)


def test_max_batch_size(sig):
    with pytest.raises(InvalidInput, match="101 rows exceed max_batch_size 100"):
        sig.prepare(contract_feeds(sig.spec, 101))


@given(st.lists(st.sampled_from([b"", b"a", b"bc", b"d\x00", b"\xff" * 900]), max_size=30), st.integers(1, 6))
def test_last_tokens_match_the_readers_split(parts, count):
    value = b",".join(parts)  # long values take the rfind path
    assert _last_tokens(value, count) == [t for t in value.split(b",") if t][-count:]


def test_long_raw_values_are_refused(sig):
    f = contract_feeds(sig.spec, 2)
    raw = raw_values(sig.spec, 2)
    raw[1, 3] = b"x" * (RequestLimits().max_raw_value_bytes + 1)
    with pytest.raises(InvalidInput, match="row 1, feature 'item_id': raw value of 1025 bytes, expected at most 1024"):
        sig.prepare({"dense": f["dense"], "cat_raw": raw, "hist": f["hist"]})
    hist_raw = np.array([b"a," + b"y" * 2000, b"b"], dtype=object)
    with pytest.raises(InvalidInput, match="row 0 has an item id longer than 1024 bytes"):
        sig.prepare({"dense": f["dense"], "cat": f["cat"], "hist_raw": hist_raw})
    # a history is cut to the last max_len ids; one longer than limits.max_history_bytes is refused
    long = np.array([b",".join(b"i%d" % k for k in range(2_000))] * 2, dtype=object)
    out = sig.prepare({"dense": f["dense"], "cat": f["cat"], "hist_raw": long})
    np.testing.assert_array_equal(out["hist"][0], sig.spec.hash_history([[b"i%d" % k for k in range(1_995, 2_000)]])[0])
    huge = np.array([b"," * (RequestLimits().max_history_bytes + 1), b"b"], dtype=object)
    with pytest.raises(InvalidInput, match=r"row 0 has 16385 bytes, expected at most 16384 \(limits.max_history_bytes\)"):
        sig.prepare({"dense": f["dense"], "cat": f["cat"], "hist_raw": huge})


def test_hash_memo_is_exactly_the_hub_hash(sig):
    spec = sig.spec
    memo = HashMemo(max_bytes=8 * (HashMemo.ENTRY_OVERHEAD + 12))  # tiny: old values are forgotten along the way
    rng = np.random.default_rng(5)
    for _ in range(20):
        raw = np.array([[b"v%d" % rng.integers(0, 12) if rng.random() > 0.1 else b"" for _ in spec.cat]
                        for _ in range(rng.integers(1, 6))], dtype=object)
        raw[0, 0] = b"v1\x00"  # trailing NULs are not significant to the hash
        want = spec.hash_cat(raw)
        for j, feat in enumerate(spec.cat):
            np.testing.assert_array_equal(memo.ids("cat_raw", raw[:, j], feat), want[:, j])
        assert memo.bytes <= memo.max_bytes and len(memo.table) <= 8


@given(st.lists(st.lists(st.sampled_from([b"a", b"bb", b"c\x00", b"d" * 9]), max_size=8), min_size=1, max_size=6))
def test_hist_memo_is_exactly_hash_history(lists):
    sig = CtrSignature(small_spec(), 100)
    want = sig.spec.hash_history(lists)
    np.testing.assert_array_equal(sig._hist_ids([r[-5:] for r in lists]), want)
    np.testing.assert_array_equal(sig._hist_ids([r[-5:] for r in lists]), want)  # warm memo


def test_hash_memo_forgets_the_least_recently_used_values_first():
    feat = small_spec().cat[0]
    memo = HashMemo(max_bytes=3 * (HashMemo.ENTRY_OVERHEAD + len(feat.name) + 2))
    for v in (b"v1", b"v2", b"v3"):
        memo.ids("cat_raw", [v], feat)
    memo.ids("cat_raw", [b"v1"], feat)  # v1 used again: v2 is now the oldest
    memo.ids("cat_raw", [b"v4"], feat)
    assert [v for _, v in memo.table] == [b"v3", b"v1", b"v4"]
    assert memo.bytes <= memo.max_bytes


def test_infinite_dense_values_are_refused_naming_the_feature(sig):
    f = contract_feeds(sig.spec, 3)
    dense = f["dense"].copy()
    dense[2, 1] = np.inf
    with pytest.raises(InvalidInput, match=r"row 2, feature 'user_orders': inf is not a number this model takes"):
        sig.prepare({**f, "dense": dense})
    dense[2, 1] = np.nan  # NaN means missing
    sig.prepare({**f, "dense": dense})
