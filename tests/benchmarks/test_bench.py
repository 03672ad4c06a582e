"""``ctredge bench`` end to end on tiny settings: every section, a row for every variant, clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))  # servekit's hand-built models

from servekit import mlp_model, save  # noqa: E402

from ctredge.cli import main  # noqa: E402
from ctredge.errors import CtrEdgeError  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Click data, and a repository of an fp32 MLP for its FeatureSpec and its static-int8 twin (no training)."""
    from ctredge.compress.quantize import quantize
    from ctredge.datagen import generate
    from ctredge.reader import read_all, resolve_spec

    root = tmp_path_factory.mktemp("bench")
    data = root / "clicks.tsv"
    generate(str(data), rows=3000, seed=1, history=True)
    spec = resolve_spec(data)
    fp32 = mlp_model(spec, seed=2)
    calib = [read_all(data, spec, limit=256).feeds]
    save(fp32, root / "repo" / "ctr-fp32" / "1" / "model.onnx")
    save(quantize(fp32, "int8-static", calib), root / "repo" / "ctr-int8" / "1" / "model.onnx")
    save(quantize(fp32, "fp16"), root / "repo" / "ctr-fp16" / "1" / "model.onnx")
    return root, data


def test_bench_end_to_end_tiny(setup, capsys):
    root, data = setup
    out = root / "report"
    code = main(["bench", "--repository", str(root / "repo"), "--data", str(data), "--out", str(out),
                 "--models", "ctr-fp32,ctr-int8,ctr-fp16", "--seconds", "0.2", "--inproc-seconds", "0.05",
                 "--concurrency", "3", "--kinds", "row,ranking,batch", "--rows", "16", "--batching", "on,off",
                 "--bootstrap", "20", "--providers", "cpu,cuda"])
    assert code == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    results = json.loads((out / "report.json").read_text())
    for section in ("## Summary", "## Accuracy", "## In-process latency", "## gRPC end to end", "## Footprint",
                    "## Peer: PyTriton", "## GPU", "## Explanations: the cost of attributions", "## Targets"):
        assert section in report, section
    for model in ("ctr-fp32", "ctr-int8", "ctr-fp16", "floor (no-op)"):
        assert f"| {model} |" in report and f"| {model} |" in printed
    rows = results["grpc"]
    cells = {(r["model"], r["kind"], r["concurrency"], r["batching"]) for r in rows}
    for model in ("floor", "ctr-fp32", "ctr-int8", "ctr-fp16"):
        for kind in ("row", "ranking", "batch"):
            for c in (3,):
                for b in ("on", "off"):
                    assert (model, kind, c, b) in cells
    assert all(r["errors"] == 0 and r["ok"] > 0 for r in rows)
    assert {r["rows_per_request"] for r in rows if r["kind"] != "row"} == {16}
    assert {f["model"] for f in results["footprint"]} == {"floor", "ctr-fp32", "ctr-int8", "ctr-fp16"}
    assert all(f["rss_bytes"] and f["cold_start_s"] > 0 for f in results["footprint"])
    assert results["peer"]["status"] == "not measured"
    # this machine's onnxruntime has no CUDA provider: the GPU section says so instead of failing
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert results["gpu"]["status"] == "not measured" and "CUDA" in results["gpu"]["reason"]
    assert results["settings"]["cpu_plan"]["reason"]
    assert not (out / "work").exists()
    # explanations: ctr-fp32 only in the quick mode, both batches, an explained request costs more than a plain
    # one in rows run, and the picture is written beside the report
    ex = results["explain"]
    assert [m["model"] for m in ex["models"]] == ["ctr-fp32"] and ex["rows_source"] == "all rows"
    cells = ex["models"][0]["results"]
    assert [c["batch"] for c in cells] == [1, 64]
    groups = len(ex["models"][0]["groups"])
    assert all(c["rows_run"] == c["batch"] * (groups + 1) and c["x"] > 0 and c["ort_x"] > 0 for c in cells)
    assert (out / ex["picture"]).stat().st_size > 0 and f"]({ex['picture']})" in report


def test_bench_refuses_bad_arguments(setup, tmp_path):
    root, data = setup
    with pytest.raises(CtrEdgeError, match="not in the repository"):
        from ctredge.benchmarks.bench import BenchConfig, run_bench

        run_bench(BenchConfig(repository=str(root / "repo"), data=str(data), out=str(tmp_path),
                              models=("ctr-nope",)))
    assert main(["bench", "--repository", str(tmp_path / "none"), "--data", str(data), "--out", str(tmp_path)]) == 2
    assert main(["bench", "--repository", str(root / "repo"), "--data", str(data), "--out", str(tmp_path),
                 "--kinds", "rows"]) == 2


def test_alignment_check_finds_no_difference_on_a_padded_mlp(setup):
    from ctredge.benchmarks.alignment import check
    from ctredge.export.validate import cpu_session
    from ctredge.reader import read_all, resolve_spec

    root, data = setup
    spec = resolve_spec(data)
    feeds = read_all(data, spec, limit=40).feeds
    session = cpu_session(str(root / "repo" / "ctr-fp32" / "1" / "model.onnx"))
    assert check(session, feeds, 4, 40) == []
