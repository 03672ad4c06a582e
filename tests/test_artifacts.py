"""Manifest writing, verification and tamper detection; staged writes; configs."""

import json
from dataclasses import dataclass

import pytest

from ctredge.artifacts import manifest_hash, read_manifest, staged_dir, write_manifest
from ctredge.config import config_from_dict, load_config, save_config
from ctredge.errors import ArtifactError, ConfigError


def make_artifact(folder, stage="train", parent=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(b"weights" * 10)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "spec.json").write_text("{}")
    return write_manifest(folder, stage=stage, config={"a": 1}, parent=parent, metrics={"test_auc": 0.7})


def test_manifest_roundtrip_and_parent(tmp_path):
    m = make_artifact(tmp_path / "t")
    assert set(m["files"]) == {"model.bin", "sub/spec.json"}
    assert m["libraries"]["numpy"]
    again = read_manifest(tmp_path / "t", stage="train")
    assert again["metrics"]["test_auc"] == 0.7
    child = make_artifact(tmp_path / "c", stage="export", parent=tmp_path / "t")
    assert child["parent"]["manifest_sha256"] == manifest_hash(tmp_path / "t")


def test_tampered_and_missing_files_are_detected(tmp_path):
    make_artifact(tmp_path / "t")
    (tmp_path / "t" / "model.bin").write_bytes(b"weightz" * 10)
    with pytest.raises(ArtifactError, match="model.bin changed"):
        read_manifest(tmp_path / "t")
    make_artifact(tmp_path / "u")
    (tmp_path / "u" / "sub" / "spec.json").unlink()
    with pytest.raises(ArtifactError, match="sub/spec.json is missing"):
        read_manifest(tmp_path / "u")
    with pytest.raises(ArtifactError, match="stage export"):
        read_manifest(tmp_path / "t", stage="export", verify=False)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_manifest(tmp_path)
    # a tampered parent stops the child from being written
    with pytest.raises(ArtifactError):
        make_artifact(tmp_path / "child", parent=tmp_path / "t")


def test_staged_dir_only_renames_on_success(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "x").write_text("1")
            raise RuntimeError("validation failed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with staged_dir(final) as tmp:
        (tmp / "x").write_text("2")
    assert (final / "x").read_text() == "2"
    with staged_dir(final) as tmp:
        (tmp / "y").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["y"]


@dataclass(frozen=True)
class Cfg:
    rate: float = 0.1
    layers: tuple[int, ...] = (2, 3)


def test_config_roundtrip_rejects_unknown_keys(tmp_path):
    save_config(Cfg(rate=0.5), tmp_path / "c.json")
    assert load_config(Cfg, tmp_path / "c.json") == Cfg(rate=0.5)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rat'\]"):
        config_from_dict(Cfg, {"rat": 1})
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(Cfg, tmp_path / "bad.json")
    assert json.loads((tmp_path / "c.json").read_text())["layers"] == [2, 3]
