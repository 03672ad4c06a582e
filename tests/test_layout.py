"""RepositoryLayout: models, versions, latest, paths and index.json of a model repository."""

import json

import pytest

from ctredge.errors import ArtifactError
from ctredge.layout import RepositoryLayout, is_model_name, is_version_name


def _file(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    _file(root / "b-model" / "1" / "model.onnx", 10)
    _file(root / "b-model" / "2" / "model.onnx", 20)
    _file(root / "b-model" / "2" / "manifest.json", 5)
    _file(root / "b-model" / "10" / "model.onnx", 30)  # numeric order, not text order
    _file(root / "b-model" / "11" / "notes.txt", 1)  # no model.onnx: not servable
    _file(root / "b-model" / "config.json", 2)
    _file(root / "a-model" / "3" / "model.onnx", 7)
    _file(root / "a-model" / "3" / "model.onnx.data", 3)
    _file(root / "a-model" / "0" / "model.onnx", 1)  # version 0 is not a version
    _file(root / "a-model" / ".4.tmp-x" / "model.onnx", 1)  # staged_dir's temporary folder
    _file(root / ".hidden" / "1" / "model.onnx", 1)
    _file(root / "empty" / "notes.txt", 1)
    return RepositoryLayout(root)


def test_models_and_versions(repo):
    assert repo.model_names() == ["a-model", "b-model", "empty"]
    assert repo.versions("b-model") == [1, 2, 10, 11]
    assert repo.versions("b-model", with_model_file=True) == [1, 2, 10]
    assert repo.latest("b-model") == 10 and repo.latest("a-model") == 3 and repo.latest("empty") is None
    assert repo.versions("no-such-model") == []


def test_latest_models_and_their_bytes(repo):
    entries = repo.latest_models()
    assert [(e.name, e.version, e.bytes) for e in entries] == [("a-model", 3, 10), ("b-model", 10, 30)]
    assert entries[0].path == str(repo.root / "a-model" / "3" / "model.onnx")
    assert repo.version_bytes("b-model", 2) == 20 and repo.version_bytes("b-model", 2, with_manifest=True) == 25
    with pytest.raises(ArtifactError, match="does not exist"):
        RepositoryLayout(repo.root / "missing").latest_models()
    assert RepositoryLayout(repo.root / "missing").model_names() == []


def test_paths(repo):
    r = repo.root
    assert repo.model_path("m", 2) == r / "m" / "2" / "model.onnx"
    assert repo.manifest_path("m", 2) == r / "m" / "2" / "manifest.json"
    assert repo.config_path("m") == r / "m" / "config.json"
    assert repo.config_path("m", 2) == r / "m" / "2" / "config.json"
    assert repo.index_path == r / "index.json"


def test_index_round_trip_and_a_corrupt_index(repo):
    assert repo.read_index() is None
    index = {"models": [{"name": "a-model", "version": 3}], "reference": {"budget": 0.0005}}
    path = repo.write_index(index)
    assert json.loads(path.read_text()) == index and path.read_text().endswith("\n")
    assert repo.read_index() == index
    path.write_text("[1, 2")
    with pytest.raises(ArtifactError, match="cannot be read as JSON"):
        repo.read_index()
    path.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a JSON object"):
        repo.read_index()


def test_names():
    assert is_model_name("ctr-fp32") and not is_model_name(".tmp") and not is_model_name("a/b")
    assert not is_model_name("")
    assert is_version_name("1") and is_version_name("10")
    assert not any(is_version_name(v) for v in ("0", "-1", "1.0", "x", "", "١"))
