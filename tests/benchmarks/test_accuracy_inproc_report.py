"""Benchmarks on a tiny trained model: accuracy table, in-process latency, the report (no time asserted)."""

import json
import shutil
import sys

import pytest

from ctredge.benchmarks.accuracy import FULL_MODEL, accuracy_table
from ctredge.benchmarks.inproc import inproc_latency
from ctredge.benchmarks.report import FLOOR_MODEL, render_markdown, targets, write_report
from ctredge.datagen import generate
from ctredge.errors import ConfigError

pytestmark = pytest.mark.slow

VARIANTS = ["ctr-fp32", "ctr-fp16", "ctr-int8-dynamic"]
SECTIONS = ["## Summary", "## Accuracy", "## In-process latency", "## gRPC end to end", "## Footprint",
            "## Peer: PyTriton", "## GPU", "## Targets", "## Machine and settings"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2,000 rows -> 1-epoch tiny DCN-v2 -> repository with a validated fp32 export, fp16 and int8-dynamic."""
    from ctredge.compress.quantize import quantize_file
    from ctredge.export.onnx import ExportConfig, export
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, train

    root = tmp_path_factory.mktemp("bench")
    data = root / "clicks.tsv"
    generate(str(data), rows=2000, seed=0, history=True, click_rate=0.2)
    trained = root / "trained"
    manifest = train(TrainConfig(data=(str(data),), out=str(trained), epochs=1, batch_size=256, verbose=0),
                     ModelConfig(model="dcnv2", embedding_dim=4, mlp_units=(8,), cross_layers=1))
    export(trained, root / "export", ExportConfig(name="ctr-fp32"))
    repo = root / "repo"
    (repo / "ctr-fp32" / "1").mkdir(parents=True)
    fp32 = repo / "ctr-fp32" / "1" / "model.onnx"
    shutil.copy(root / "export" / "model.onnx", fp32)
    for name, kind in (("ctr-fp16", "fp16"), ("ctr-int8-dynamic", "int8-dynamic")):
        (repo / name / "1").mkdir(parents=True)
        quantize_file(fp32, repo / name / "1" / "model.onnx", kind)
    return {"root": root, "data": data, "trained": trained, "manifest": manifest, "repo": repo}


@pytest.fixture(scope="module")
def acc(run):
    return accuracy_table(run["repo"], run["trained"], run["data"], bootstrap=20)


@pytest.fixture(scope="module")
def inproc(run):
    return inproc_latency(run["repo"], run["trained"], run["data"], batches=(1, 16), seconds=0.05, rounds=2,
                          warmup=1)


# ------------------------------------------------------------------ accuracy
def test_accuracy_has_the_full_model_and_every_variant_on_the_test_split(run, acc):
    assert [m["name"] for m in acc["models"]] == [FULL_MODEL] + VARIANTS
    assert acc["reference"] == FULL_MODEL and acc["rows_source"] == "test split"
    metrics = run["manifest"]["metrics"]
    assert acc["rows"] == metrics["test_rows"]
    by = {m["name"]: m for m in acc["models"]}
    assert by[FULL_MODEL]["auc"] == pytest.approx(metrics["test_auc"], abs=1e-9)  # the very same rows
    fp32 = by["ctr-fp32"]
    assert fp32["dauc"] == pytest.approx(0.0, abs=1e-6) and fp32["x_fp32_bytes"] == 1.0
    assert by["ctr-fp16"]["bytes"] < fp32["bytes"]
    truth = json.loads((run["root"] / "clicks.truth.json").read_text())
    # Bayes on the rows scored: the truth file's test part is exactly the split's test rows
    assert acc["bayes_auc"] == truth["scopes"]["test"]["bayes_auc"] and acc["truth"]["scope"] == "the test rows scored"
    assert acc["truth"]["rows"] == acc["rows"]
    for m in acc["models"]:
        lo, hi = m["dauc_ci"]
        assert lo <= m["dauc"] <= hi
        assert m["dauc"] == pytest.approx(m["auc"] - by[FULL_MODEL]["auc"], abs=1e-12)
        assert m["pct_of_full_auc"] == pytest.approx(100 * m["auc"] / by[FULL_MODEL]["auc"])
        assert m["mlperf_99_9"] == (m["pct_of_full_auc"] >= 99.9) and m["mlperf_99"] == (m["pct_of_full_auc"] >= 99)
        assert m["calibration"] == pytest.approx(m["mean_prediction"] / m["click_rate"])
        assert m["bytes"] > 0


def test_accuracy_on_another_file_scores_every_row(run, tmp_path):
    other = tmp_path / "other.tsv"
    generate(str(other), rows=600, seed=7, history=True, click_rate=0.2)
    res = accuracy_table(run["repo"], run["trained"], other, bootstrap=10, max_rows=500)
    assert res["rows_source"] == "all rows" and res["rows"] == 500
    assert res["bayes_auc"] == json.loads((tmp_path / "other.truth.json").read_text())["bayes_auc"]


def test_accuracy_without_tensorflow_uses_ctr_fp32_as_reference(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now fails
    res = accuracy_table(run["repo"], run["trained"], run["data"], bootstrap=10)
    assert res["reference"] == "ctr-fp32" and "not installed" in res["reference_note"]
    assert [m["name"] for m in res["models"]] == VARIANTS
    assert res["rows_source"] == "test split"  # the split still comes from the manifest
    assert res["models"][0]["dauc"] == 0.0


def test_accuracy_lists_an_unwritten_over_budget_variant(run, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(run["repo"], repo)
    (repo / "index.json").write_text(json.dumps({"models": [
        {"name": "ctr-fp32", "within_budget": True, "written": True},
        {"name": "ctr-edge", "within_budget": False, "written": False, "size_bytes": 123, "dauc": -0.01,
         "quantization": "int8-static+emb-int4"}], "reference": {"budget": 0.0005}}))
    res = accuracy_table(repo, run["trained"], run["data"], bootstrap=10)
    by = {m["name"]: m for m in res["models"]}
    assert by["ctr-edge"]["scored"] is False and by["ctr-edge"]["within_budget"] is False
    assert by["ctr-fp32"]["within_budget"] is True and res["budget"] == 0.0005


def test_accuracy_with_baselines_puts_them_beside_the_models_in_the_report(run, acc, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("lightgbm")
    from ctredge.dataplan import DataPlan

    res = accuracy_table(run["repo"], run["trained"], run["data"], bootstrap=10, with_baselines=True)
    assert [m["name"] for m in res["models"]] == [FULL_MODEL] + VARIANTS + ["baseline-lr", "baseline-lgbm"]
    assert res["baselines"]["status"] == "measured" and res["baselines"]["reference"] == FULL_MODEL
    plan = DataPlan.from_manifest(run["manifest"]["data"])
    assert res["baselines"]["train_rows"] == len(plan.read("train", _spec(run)))
    for m in res["models"][-2:]:
        assert m["kind"] == "baseline" and m["test_rows"] == res["rows"] == acc["rows"]
        assert m["dauc"] is not None and m["bytes"] is None and m["within_budget"] is None
    write_report({"accuracy": res}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    summary = md.split("## Accuracy")[0]
    assert "| baseline-lr (baseline) | – | – |" in summary and "baseline-lgbm (baseline)" in summary
    assert "| baseline-lr (baseline) |" in md.split("## Accuracy")[1]
    saved = json.loads((tmp_path / "report.json").read_text())["accuracy"]
    assert {m["name"] for m in saved["models"]} >= {"baseline-lr", "baseline-lgbm"}
    assert all(t["model"] not in ("baseline-lr", "baseline-lgbm")
               for t in json.loads((tmp_path / "report.json").read_text())["targets"])


def _spec(run):
    from ctredge.features import FeatureSpec

    return FeatureSpec.load(str(run["trained"] / "feature_spec.json"))


# ------------------------------------------------------------------ in-process latency
def test_inproc_has_a_cell_per_model_and_batch_with_ordered_percentiles(inproc):
    cells = {(c["model"], c["batch"]): c for c in inproc["cells"]}
    assert set(cells) == {(m, b) for m in [FULL_MODEL] + VARIANTS for b in (1, 16)}
    for c in inproc["cells"]:
        assert 0 < c["min_ms"] <= c["p50_ms"] <= c["p99_ms"]
        assert c["runs"] >= 2 and c["rows_per_s"] > 0
        assert c["speedup_vs_tf"] == pytest.approx(cells[(FULL_MODEL, c["batch"])]["p50_ms"] / c["p50_ms"])
    assert cells[(FULL_MODEL, 1)]["runtime"] == "tensorflow"
    assert cells[("ctr-fp32", 1)]["provider_actual"] == "CPUExecutionProvider"
    assert set(inproc["speedup_vs_tf"]) == set(VARIANTS)
    assert inproc["max_abs_diff_vs_tf"]["ctr-fp32@cpu"] < 1e-4  # TF's signature serves the same model
    st = inproc["settings"]
    assert st["intra_op_threads"] == 1 and st["spinning"] is False and st["batches"] == [1, 16]
    assert isinstance(inproc["tensorflow"]["applied"], bool) and inproc["tensorflow"]["version"]
    assert inproc["cpu"]["model"]


def test_inproc_rejects_unknown_names_and_skips_a_missing_provider(run):
    import onnxruntime as ort

    with pytest.raises(ConfigError, match="unknown model"):
        inproc_latency(run["repo"], None, run["data"], models=["nope"], seconds=0.01)
    with pytest.raises(ConfigError, match="unknown provider"):
        inproc_latency(run["repo"], None, run["data"], providers=("tpu",), seconds=0.01)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    res = inproc_latency(run["repo"], None, run["data"], models=["ctr-fp32"], batches=(1,), seconds=0.01,
                         rounds=1, providers=("cpu", "cuda"))
    assert [(c["model"], c["provider"]) for c in res["cells"]] == [("ctr-fp32", "cpu")]
    assert any("CUDAExecutionProvider" in s for s in res["skipped"])
    assert res["tensorflow"] == {"skipped": "no trained artifact given"}
    assert res["cells"][0]["speedup_vs_tf"] is None


def test_inproc_without_tensorflow_times_the_onnx_models_only(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    res = inproc_latency(run["repo"], run["trained"], run["data"], batches=(4,), seconds=0.01, rounds=1)
    assert [c["model"] for c in res["cells"]] == VARIANTS
    assert "TensorFlow is not installed" in res["tensorflow"]["skipped"]
    assert any(s.startswith(FULL_MODEL) for s in res["skipped"]) and res["speedup_vs_tf"] == {}


# ------------------------------------------------------------------ report
def _grpc_rows():
    rows = []
    for model, p50, preds in ((FLOOR_MODEL, 1.0, 4000.0), ("ctr-fp32", 1.2, 3000.0), ("ctr-fp16", 1.5, 2000.0)):
        for conc in (1, 8, 64):
            for batching in ("on", "off"):
                rows.append({"model": model, "kind": "row", "rows_per_request": 1, "concurrency": conc,
                             "batching": batching, "server": "ctredge", "provider": "cpu", "p50_ms": p50 * conc,
                             "p95_ms": 2 * p50 * conc, "p99_ms": 3 * p50 * conc, "req_per_s": preds,
                             "predictions_per_s": preds * conc, "errors": 0, "client_saturated": conc == 64,
                             "processes": 2})
    for server, preds in (("ctredge", 25000.0), ("pytriton", 10000.0)):
        rows.append({"model": "ctr-fp32", "kind": "ranking", "rows_per_request": 256, "concurrency": 8,
                     "batching": "off", "server": server, "provider": "cpu", "p50_ms": 9.0, "p95_ms": 10.0,
                     "p99_ms": 11.0, "req_per_s": preds / 256, "predictions_per_s": preds, "errors": 0,
                     "client_saturated": False, "processes": 1})
    return rows


def test_report_has_every_section_every_variant_json_and_plots(acc, inproc, tmp_path):
    results = {"accuracy": acc, "inproc": inproc, "grpc": _grpc_rows(),
               "footprint": [{"model": m, "bytes": 1000 * (i + 1), "rss_bytes": 2 << 20, "cold_start_s": 0.5}
                             for i, m in enumerate(VARIANTS)],
               "peer": {"status": "measured", "server": "pytriton", "version": "0.7"},
               "gpu": {"status": "not measured", "reason": "no CUDA provider"},
               "settings": {"command": "ctredge bench --test"}}
    md_path = write_report(results, tmp_path / "report")
    md = md_path.read_text()
    for header in SECTIONS:
        assert header in md
    summary = md.split("## Summary")[1].split("## Accuracy")[0]
    for name in [FULL_MODEL] + VARIANTS:
        assert f"| {name} |" in summary
    assert f"| {FLOOR_MODEL} (no-op) |" in summary
    assert "1.200 (1.20x)" in summary  # ctr-fp32 gRPC p50 @c1 against the floor's 1.0 ms
    assert "not measured (no CUDA provider)" in md.split("## GPU")[1]
    assert "client saturated" in md and "ctredge bench --test" in md
    report = json.loads((tmp_path / "report" / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    for key in ("accuracy", "inproc", "grpc", "footprint", "machine", "targets", "settings"):
        assert key in report
    assert report["machine"]["cores"] >= 1 and "cpu_flags" in report["machine"]
    floor = next(x for x in report["targets"] if x["target"].startswith("gRPC") and x["model"] == "ctr-fp32")
    assert floor["value"] == pytest.approx(1.2) and floor["status"] == "met"
    fp16 = next(x for x in report["targets"] if x["target"].startswith("gRPC") and x["model"] == "ctr-fp16")
    assert fp16["value"] == pytest.approx(1.5) and fp16["status"] == "not met"
    peer = next(x for x in report["targets"] if "PyTriton" in x["target"])
    assert peer["value"] == pytest.approx(2.5) and peer["status"] == "met"
    edge = next(x for x in report["targets"] if x["target"].startswith("ctr-edge"))
    assert edge["status"].startswith("not measured")  # no ctr-edge in this repository
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in md
    else:
        for png in ("latency_vs_batch.png", "throughput_vs_concurrency.png", "auc_vs_bytes.png"):
            assert (tmp_path / "report" / png).stat().st_size > 1000
            assert f"]({png})" in md


def test_missing_sections_read_not_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: the plots are skipped, not the report
    results = {"grpc": {"status": "not measured", "reason": "no server"}}
    md = write_report(results, tmp_path).read_text()
    for header in SECTIONS:
        assert header in md
    for section in ("## Accuracy", "## In-process latency", "## Footprint", "## Peer: PyTriton", "## GPU"):
        assert "not measured (not run)" in md.split(section)[1].split("##")[0]
    assert "not measured (no server)" in md.split("## gRPC end to end")[1]
    assert "matplotlib is not installed" in md and not list(tmp_path.glob("*.png"))
    statuses = {t["status"] for t in targets(results)}
    assert statuses and all(s.startswith("not measured") for s in statuses)
    assert json.loads((tmp_path / "report.json").read_text())["grpc"]["reason"] == "no server"


def test_accuracy_only_report_keeps_the_variants(acc):
    md = render_markdown({"accuracy": acc})
    summary = md.split("## Summary")[1].split("## Accuracy")[0]
    for name in [FULL_MODEL] + VARIANTS:
        assert f"| {name} |" in summary
    assert "not measured (not run)" in md.split("## In-process latency")[1].split("##")[0]
