"""The main job end to end on tiny data: datagen -> train -> compress all -> report; reuse on rerun."""

import pytest

from ctredge.cli import main

pytestmark = pytest.mark.slow


def test_pipeline_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pipeline", "--out", str(out), "--rows", "8000", "--models", "dcnv2,seed", "--epochs", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for name in ("| dcnv2 |", "| seed |", "Bayes-optimal", "| ctr-fp32 |", "| ctr-edge |", "| ctr-int8 |"):
        assert name in report and name in printed
    assert (out / "repository" / "index.json").is_file()
    model_mtime = (out / "trained-dcnv2" / "model.keras").stat().st_mtime
    assert main(args + ["--skip-compress"]) == 0  # artifacts with matching manifests are reused
    assert (out / "trained-dcnv2" / "model.keras").stat().st_mtime == model_mtime
