"""DataPlan: the one home of the train/valid/test split rules, on small hand-made logs."""

import os

import numpy as np
import pytest

from ctredge.artifacts import sha256_file
from ctredge.dataplan import DataPlan
from ctredge.errors import ArtifactError, DataError
from ctredge.features import CatFeature, DenseFeature, FeatureSpec
from ctredge.reader import SplitSpec, read_all

SPEC = FeatureSpec(dense=(DenseFeature("n"),), cat=(CatFeature("u", 50, "user"),))


def _log(path, rows, start=0):
    path.write_text("".join(f"{(i * 7) % 2}\t{i}\tu{i % 13}\n" for i in range(start, start + rows)))
    return str(path)


@pytest.fixture
def data(tmp_path):
    return _log(tmp_path / "clicks.tsv", 400)


def test_split_parts_partition_the_rows_by_file_and_line(data):
    plan = DataPlan.from_files([data], seed=3, split_valid=0.2, split_test=0.25)
    parts = plan.read_parts(SPEC)
    assert sum(len(b) for b in parts.values()) == 400
    every = read_all(data, SPEC)
    codes = SplitSpec(seed=3, valid=0.2, test=0.25).codes(every.file_no, every.line_no)
    for k, part in enumerate(("train", "valid", "test")):
        np.testing.assert_array_equal(parts[part].line_no, every.line_no[codes == k])
        np.testing.assert_array_equal(plan.read(part, SPEC).line_no, parts[part].line_no)  # one part alone: same
    assert {p for b in parts.values() for p in b.line_no.tolist()} == set(range(1, 401))


def test_given_files_are_whole_parts_and_the_split_covers_the_rest(tmp_path, data):
    test_file = _log(tmp_path / "test.tsv", 30, start=1000)
    plan = DataPlan.from_files([data], test=[test_file], seed=0, split_valid=0.1, split_test=0.5)
    assert plan.split == SplitSpec(seed=0, valid=0.1, test=0.0)
    assert plan.parts["test"].split_part is None and len(plan.read("test", SPEC)) == 30
    assert len(plan.read("train", SPEC)) + len(plan.read("valid", SPEC)) == 400
    both = DataPlan.from_files([data], valid=[test_file], test=[test_file])
    assert both.split is None and len(both.read("train", SPEC)) == 400


def test_manifest_round_trip_records_files_with_sha256(data):
    plan = DataPlan.from_files([data], seed=1)
    entry = plan.to_manifest()
    assert entry["files"] == [{"path": os.path.abspath(data), "sha256": sha256_file(data),
                               "bytes": os.path.getsize(data)}]
    assert entry["parts"]["test"] == {"paths": [data], "split_part": "test"}
    assert entry["split"] == {"seed": 1, "valid": 0.1, "test": 0.1}
    assert DataPlan.from_manifest(entry) == plan
    with pytest.raises(ArtifactError, match="no data plan"):
        DataPlan.from_manifest({"files": entry["files"]})
    with pytest.raises(ArtifactError, match="split part"):
        DataPlan.from_manifest({**entry, "split": None})


def test_verify_refuses_a_changed_or_missing_file(tmp_path, data):
    plan = DataPlan.from_files([data])
    assert plan.verify().files == plan.files
    with open(data, "a") as fh:
        fh.write("1\t5\tu1\n")
    with pytest.raises(DataError, match="changed since training"):
        plan.verify()
    os.remove(data)
    with pytest.raises(DataError, match="missing"):
        plan.verify()


def test_relocated_files_are_checked_against_the_recorded_content(tmp_path, data):
    plan = DataPlan.from_files([data], seed=2)
    moved = tmp_path / "moved.tsv"
    os.rename(data, moved)
    with pytest.raises(DataError, match="missing"):
        plan.verify()
    again = plan.relocated([str(moved)]).verify()
    assert again.parts["test"].paths == (str(moved),) and again.files[0].path == str(moved)
    np.testing.assert_array_equal(again.read("test", SPEC).line_no,
                                  DataPlan.from_files([str(moved)], seed=2).read("test", SPEC).line_no)
    with pytest.raises(DataError, match="had 1 file"):
        plan.relocated([str(moved), str(moved)])
    _log(tmp_path / "other.tsv", 400, start=5)
    with pytest.raises(DataError, match="changed since training"):
        plan.relocated([str(tmp_path / "other.tsv")]).verify()


def test_a_relative_path_finds_its_record_from_another_working_folder(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = DataPlan.from_files(["clicks.tsv"])
    monkeypatch.chdir(tmp_path.parent)
    assert plan.recorded("clicks.tsv") == plan.files[0]  # the absolute record ends with the relative path
    assert plan.recorded("elsewhere.tsv") is None


def test_held_out_rows_in_memory_or_streamed_are_the_same(data):
    plan = DataPlan.from_files([data], seed=5)
    memory = plan.read_held_out(SPEC, max_memory_bytes=1 << 30)
    streamed = plan.read_held_out(SPEC, max_memory_bytes=10)
    assert not memory.streamed and streamed.streamed and streamed.train is None
    for part in ("valid", "test"):
        np.testing.assert_array_equal(getattr(memory, part).line_no, getattr(streamed, part).line_no)
    assert sum(len(b) for b in plan.iter_part("train", SPEC, chunk_rows=50)) == len(memory.train)


def test_held_out_needs_both_classes(tmp_path):
    path = tmp_path / "ones.tsv"
    path.write_text("".join(f"1\t{i}\tu1\n" for i in range(100)))
    with pytest.raises(DataError, match="needs both clicks and non-clicks"):
        DataPlan.from_files([str(path)]).read_held_out(SPEC, max_memory_bytes=1 << 30)


def test_test_rows_in_a_file_identified_by_content(tmp_path, data):
    plan = DataPlan.from_files([data], seed=4)
    copy = tmp_path / "copy.tsv"
    copy.write_bytes(open(data, "rb").read())  # same content elsewhere: the same test rows
    batch, info = plan.test_rows_in(str(copy), sha256_file(copy), SPEC)
    assert info["rows_source"] == "test split" and info["split"]["file_no"] == 0
    np.testing.assert_array_equal(batch.line_no, plan.read("test", SPEC).line_no)
    other = _log(tmp_path / "other.tsv", 10)
    assert plan.test_rows_in(other, sha256_file(other), SPEC) == (None, {"rows_source": "other file"})
    given = DataPlan.from_files([data], test=[other])
    assert given.test_rows_in(other, sha256_file(other), SPEC)[1]["rows_source"] == "test file"
    assert given.test_rows_in(data, sha256_file(data), SPEC)[1]["rows_source"] == "training file"
