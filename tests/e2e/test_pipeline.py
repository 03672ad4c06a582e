"""The main job end to end on tiny data: datagen -> train -> compress all -> bench -> report; reuse on rerun."""

import json

import pytest

from ctredge.cli import main

pytestmark = pytest.mark.slow


def test_pipeline_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pipeline", "--out", str(out), "--rows", "8000", "--models", "dcnv2,seed", "--epochs", "1",
            "--dp-epsilons", "2,8", "--eval-rows", "6000"]
    assert main(args + ["--bench-seconds", "0.3"]) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for name in ("| dcnv2 |", "| seed |", "Bayes-optimal", "| ctr-fp32 |", "| ctr-edge |", "| ctr-int8 |"):
        assert name in report and name in printed
    index = json.loads((out / "repository" / "index.json").read_text())
    # the variants are judged on a held-out file of the same world that the pipeline drew (another sample seed)
    assert index["reference"]["rows_source"] == "eval file" and index["reference"]["test_rows"] == 6000
    truth = json.loads((out / "data" / "held-out.truth.json").read_text())
    assert truth["seed"] == 0 and truth["sample_seed"] == 1000 and truth["rows"] == 6000
    bench = (out / "bench" / "report.md").read_text()
    for section in ("## Summary", "## Accuracy", "## In-process latency", "## gRPC end to end", "## Footprint",
                    "## Peer: PyTriton", "## GPU", "## Targets"):
        assert section in bench
    for variant in ("ctr-fp32", "ctr-fp16", "ctr-int8", "ctr-int8-dynamic", "ctr-pruned", "ctr-edge", "keras-full",
                    "floor (no-op)"):
        assert f"| {variant} |" in bench, variant
    assert "| floor (no-op) |" in printed and "## Benchmark" in report
    # the DP-SGD models of the first architecture: in the accuracy table, with their epsilon and rows/s cost
    results = json.loads((out / "bench" / "report.json").read_text())
    dp = [m for m in results["accuracy"]["models"] if m["kind"] == "dp"]
    assert [m["name"] for m in dp] == ["trained-dcnv2-dp2", "trained-dcnv2-dp8"]
    for m, eps in zip(dp, (2.0, 8.0)):
        assert m["scored"], m.get("error")
        assert m["dp"]["epsilon_target"] == eps and 0 < m["dp"]["epsilon"] <= eps
        assert 0 < m["auc"] < 1 and len(m["dauc_ci"]) == 2 and m["train_slowdown"] > 0
        assert f"| {m['name']} (DP) |" in bench and f"| {m['name']} |" in bench
    model_mtime = (out / "trained-dcnv2" / "model.keras").stat().st_mtime
    dp_mtime = (out / "trained-dcnv2-dp2" / "model.keras").stat().st_mtime
    assert main(args + ["--skip-compress"]) == 0  # artifacts with matching manifests are reused
    assert (out / "trained-dcnv2" / "model.keras").stat().st_mtime == model_mtime
    assert (out / "trained-dcnv2-dp2" / "model.keras").stat().st_mtime == dp_mtime
