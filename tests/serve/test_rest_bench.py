"""``benchmarks/latency_rest``: every protocol answers the same rows alike, and the report has each case."""

from __future__ import annotations

import json

import pytest
from servekit import ctr_model, save

from ctredge.benchmarks.latency_rest import main

pytestmark = pytest.mark.slow


def test_latency_rest_runs_every_protocol_on_the_same_rows(tmp_path, capsys):
    from ctredge.datagen import generate
    from ctredge.features import FeatureSpec
    from ctredge.reader import sidecar_path

    data = tmp_path / "clicks.tsv"
    generate(str(data), rows=300, seed=2, history=True)
    spec = FeatureSpec.load(sidecar_path(data, "spec"))
    save(ctr_model(spec, seed=1), tmp_path / "repo" / "ctr" / "1" / "model.onnx")
    out = tmp_path / "latency.json"
    assert main(["--repository", str(tmp_path / "repo"), "--data", str(data), "--requests", "8", "--warmup", "2",
                 "--rounds", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {"ids, batch 1", "ids, batch 256"}
    for by_protocol in report["cases"].values():
        assert set(by_protocol) == {"gRPC (pre-built)", "gRPC tritonclient", "REST binary", "REST JSON",
                                    "REST binary (pre-built)", "REST JSON (pre-built)"}
        assert all(r["requests"] == 8 and r["p50_ms"] > 0 for r in by_protocol.values())
    assert "| ids, batch 256 | REST JSON |" in capsys.readouterr().out
