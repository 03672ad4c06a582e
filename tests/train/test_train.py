"""ctredge train / evaluate on tiny synthetic click logs: artifact, manifest, split, errors."""

import json

import numpy as np
import pytest

from ctredge.artifacts import read_manifest
from ctredge.cli import main
from ctredge.datagen import generate
from ctredge.errors import ArtifactError, ConfigError, DataError
from ctredge.reader import SplitSpec, read_all, resolve_spec
from ctredge.train.models import ModelConfig
from ctredge.train.loop import keras_predict as predict
from ctredge.train.train import TrainConfig, evaluate, load_trained, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "clicks.tsv"
    generate(str(path), rows=20000, seed=1, history=True, click_rate=0.2)
    return path


@pytest.fixture(scope="module")
def trained(clicks, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dcnv2"
    cfg = TrainConfig(data=(str(clicks),), out=str(out), epochs=2, batch_size=256, verbose=0, seed=3)
    manifest = train(cfg, ModelConfig(model="dcnv2", embedding_dim=8, mlp_units=(32,), cross_layers=1))
    return out, manifest


def test_artifact_layout_and_metrics(trained, clicks):
    out, manifest = trained
    assert sorted(p.name for p in out.iterdir()) == ["feature_spec.json", "manifest.json", "model.keras",
                                                      "model_config.json", "train_config.json"]
    m = manifest["metrics"]
    for key in ("test_auc", "test_logloss", "test_calibration", "valid_auc", "epochs", "train_seconds"):
        assert key in m
    assert m["test_auc"] > 0.6  # planted signal; Bayes AUC of this data is ~0.8
    assert 1 <= m["epochs"] <= 2 and len(m["history"]["val_auc"]) == m["epochs"]
    assert manifest["data"]["split"] == {"seed": 3, "valid": 0.1, "test": 0.1}
    assert manifest["data"]["files"][0]["sha256"]
    assert m["train_rows"] + m["valid_rows"] + m["test_rows"] == 20000


def test_manifest_split_rereads_the_same_test_rows(trained, clicks):
    out, manifest = trained
    model, spec, _ = load_trained(out)
    rows = read_all(str(clicks), spec, split=SplitSpec(seed=3, valid=0.1, test=0.1), part="test")
    assert len(rows) == manifest["metrics"]["test_rows"]
    from ctredge.metrics import auc

    assert auc(rows.labels, predict(model, rows.feeds)) == pytest.approx(manifest["metrics"]["test_auc"], abs=1e-9)
    again = evaluate(out)
    assert again["auc"] == pytest.approx(manifest["metrics"]["test_auc"], abs=1e-9)
    assert again["rows"] == manifest["metrics"]["test_rows"]


def test_tampered_model_is_refused(trained, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.keras", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="model.keras changed"):
        load_trained(copy)


def test_cli_train_and_evaluate(clicks, tmp_path, capsys):
    out = tmp_path / "seed"
    assert main(["train", "--data", str(clicks), "--model", "seed", "--out", str(out), "--epochs", "1",
                 "--batch-size", "512", "--embedding-dim", "8"]) == 0
    printed = capsys.readouterr().out
    assert "| seed |" in printed and "test AUC" in printed
    assert main(["evaluate", str(out), "--data", str(clicks)]) == 0
    assert "| 20,000 |" in capsys.readouterr().out
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["epochs"] == 1 and saved["data"] == [str(clicks)]


def test_clear_errors(clicks, tmp_path, capsys):
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        TrainConfig(data=("x",), out="y", batch_size=0)
    with pytest.raises(DataError, match="no FeatureSpec"):
        train(TrainConfig(data=(str(tmp_path / "none.tsv"),), out=str(tmp_path / "o")))
    bad = tmp_path / "bad.tsv"
    lines = clicks.read_text().splitlines()[:50]
    lines[10] = "7" + lines[10][1:]
    bad.write_text("\n".join(lines) + "\n")
    (tmp_path / "bad.spec.json").write_text(resolve_spec(str(clicks)).to_json())
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.tsv:11: label must be 0 or 1, got '7'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_refuses_non_finite_counts_at_read_time(clicks, tmp_path, capsys):
    lines = clicks.read_text().splitlines()[:400]
    fields = lines[20].split("\t")
    fields[1] = "inf"  # the first dense count of line 21
    lines[20] = "\t".join(fields)
    bad = tmp_path / "inf.tsv"
    bad.write_text("\n".join(lines) + "\n")
    (tmp_path / "inf.spec.json").write_text(resolve_spec(str(clicks)).to_json())
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "inf.tsv:21: dense feature" in capsys.readouterr().err and not (tmp_path / "o").exists()
    out = tmp_path / "skipped"
    assert main(["train", "--data", str(bad), "--out", str(out), "--epochs", "1", "--skip-bad-rows",
                 "--split-valid", "0.3", "--split-test", "0.3"]) == 0
    assert "skipped 1 malformed row(s)" in capsys.readouterr().out


def test_streaming_path_for_files_larger_than_memory(clicks, tmp_path):
    """max_memory_bytes below the file size: valid/test are read by split, train streamed per epoch."""
    out = tmp_path / "streamed"
    cfg = TrainConfig(data=(str(clicks),), out=str(out), epochs=1, batch_size=512, verbose=0, seed=3,
                      max_memory_bytes=1, shuffle_rows=3000)
    manifest = train(cfg, ModelConfig(model="deepfm", embedding_dim=4, mlp_units=(16,)))
    m = manifest["metrics"]
    assert m["train_rows"] is None and m["test_rows"] + m["valid_rows"] < 20000
    assert 0.5 < m["test_auc"] <= 1.0
