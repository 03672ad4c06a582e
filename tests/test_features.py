"""FeatureSpec JSON and the documented hash: vectors, reference implementation, processes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctredge.errors import SpecError
from ctredge.features import CatFeature, DenseFeature, FeatureSpec, HistorySpec, hash_value, hash_values

VECTORS = Path(__file__).resolve().parents[1] / "ctredge" / "hash_vectors.json"
MASK = (1 << 64) - 1


def reference_hash(value, feature: str, buckets: int) -> int:
    """The algorithm exactly as the features module documents it, one value at a time."""
    if isinstance(value, int):
        data = str(value).encode("ascii")
    elif isinstance(value, str):
        data = value.encode("utf-8")
    else:
        data = bytes(value)
    data = data.rstrip(b"\0")
    if not data:
        return 0
    h = 0xCBF29CE484222325
    for b in feature.encode("utf-8") + b"\x1f" + data:
        h = ((h ^ b) * 0x100000001B3) & MASK
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & MASK
    h ^= h >> 33
    h = (h * 0xC4CEB93FE53CD34F) & MASK
    h ^= h >> 33
    return 1 + h % (buckets - 1)


def test_vectors_match_implementation_and_reference():
    vectors = json.loads(VECTORS.read_text())["vectors"]
    assert len(vectors) >= 20
    for v in vectors:
        assert hash_value(v["value"], v["feature"], v["buckets"]) == v["id"], v
        assert reference_hash(v["value"], v["feature"], v["buckets"]) == v["id"], v


def test_vectorized_equals_reference_on_random_values():
    rng = np.random.default_rng(1)
    values = ["%08x" % x for x in rng.integers(0, 2**32, 500)] + ["", "é", "a" * 40, "12", "0"]
    ids = hash_values(values, "C7", 1000)
    assert ids.tolist() == [reference_hash(v, "C7", 1000) for v in values]
    # numpy string/bytes/object inputs agree
    assert hash_values(np.array(values), "C7", 1000).tolist() == ids.tolist()
    assert hash_values(np.array([v.encode() for v in values]), "C7", 1000).tolist() == ids.tolist()


def test_ints_hash_as_decimal_strings_and_empty_is_zero():
    assert hash_value(123, "f", 50) == hash_value("123", "f", 50) == hash_value(b"123", "f", 50)
    assert hash_values(np.array([5, 123]), "f", 50).tolist() == [hash_value("5", "f", 50), hash_value("123", "f", 50)]
    assert hash_value("", "f", 50) == 0
    assert hash_value(None, "f", 50) == 0


def test_ids_in_range_and_feature_name_matters():
    ids = hash_values(["%d" % i for i in range(5000)], "a", 7)
    assert ids.min() >= 1 and ids.max() <= 6
    assert len(set(ids.tolist())) == 6
    other = hash_values(["%d" % i for i in range(5000)], "b", 7)
    assert (ids != other).mean() > 0.5


def test_hash_identical_in_another_process():
    values = ["%08x" % i for i in range(0, 3000, 7)]
    code = (
        "import json,sys; from ctredge.features import hash_values; "
        "print(json.dumps(hash_values(json.loads(sys.argv[1]), 'C3', 65536).tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(values)], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert json.loads(out.stdout) == hash_values(values, "C3", 65536).tolist()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(SpecError, match="buckets"):
        hash_values(["a"], "f", 1)
    with pytest.raises(SpecError, match="float"):
        hash_values([1.5], "f", 10)


def make_spec():
    return FeatureSpec(
        dense=(DenseFeature("price", side="item", integer=False), DenseFeature("clicks")),
        cat=(CatFeature("user", 100, "user"), CatFeature("item", 50, "item"), CatFeature("device", 5)),
        history=HistorySpec(item_feature="item", max_len=4),
    )


def test_spec_json_roundtrip_and_contract():
    spec = make_spec()
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec
    assert spec.input_signature() == {"dense": ("float32", (None, 2)), "cat": ("int64", (None, 3)),
                                      "hist": ("int64", (None, 4))}
    assert spec.offsets.tolist() == [0, 100, 150]
    assert spec.total_buckets == 155
    assert spec.columns("cat", "user") == [0] and spec.columns("cat", "context") == [2]
    assert spec.n_columns == 1 + 2 + 3 + 1


def test_spec_rejects_unknown_keys_and_bad_values():
    d = make_spec().to_dict()
    d["colour"] = "red"
    with pytest.raises(SpecError, match="colour"):
        FeatureSpec.from_dict(d)
    with pytest.raises(SpecError, match="side"):
        CatFeature("x", 10, side="shop")
    with pytest.raises(SpecError, match="buckets"):
        CatFeature("x", 1)
    with pytest.raises(SpecError, match="item_feature"):
        FeatureSpec(dense=(), cat=(CatFeature("a", 3),), history=HistorySpec(item_feature="zzz"))


def test_history_keeps_most_recent_and_shares_item_buckets():
    spec = make_spec()
    hist = spec.hash_history([["i1", "i2", "i3", "i4", "i5", "i6"], [], ["i9"]])
    item = lambda v: hash_value(v, "item", 50)  # noqa: E731
    assert hist[0].tolist() == [item("i3"), item("i4"), item("i5"), item("i6")]
    assert hist[1].tolist() == [0, 0, 0, 0]
    assert hist[2].tolist() == [item("i9"), 0, 0, 0]
    cat = spec.hash_cat([["u1", "i9", ""]])
    assert cat[0, 1] == hist[2, 0] and cat[0, 2] == 0
