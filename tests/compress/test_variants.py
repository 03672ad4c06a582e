"""`compress all` on a tiny trained model: every variant built, loaded on the CPU, judged by the budget."""

import json

import numpy as np
import pytest

from ctredge.cli import main
from ctredge.compress.variants import VARIANTS, CompressConfig, compress_all
from ctredge.datagen import generate
from ctredge.errors import ConfigError
from ctredge.train.models import ModelConfig
from ctredge.train.train import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    data = root / "clicks.tsv"
    generate(str(data), rows=12000, seed=2, history=True, click_rate=0.2)
    out = root / "trained"
    train(TrainConfig(data=(str(data),), out=str(out), epochs=1, batch_size=512, verbose=0),
          ModelConfig(model="dcnv2", embedding_dim=8, mlp_units=(32, 16), cross_layers=1))
    return out


@pytest.fixture(scope="module")
def repo(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "models"
    index = compress_all(trained, out, CompressConfig(bootstrap=20, prune_epochs=1, allow_over_budget=True,
                                                      measure_rss=False))
    return out, index


def test_every_variant_is_indexed_and_loads_on_cpu(repo):
    import onnxruntime as ort

    from ctredge.export.validate import random_feeds
    from ctredge.export.onnx import load_spec_from_onnx

    out, index = repo
    assert [e["name"] for e in index["models"]] == list(VARIANTS)
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["models"] == index["models"]
    for e in index["models"]:
        for key in ("name", "version", "source", "quantization", "size_bytes", "rss_bytes", "test_auc", "dauc",
                    "dauc_ci", "within_budget", "verdict", "published", "written"):
            assert key in e
        path = out / e["name"] / "1" / "model.onnx"
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = load_spec_from_onnx(path)
        p = sess.run(["ctr"], random_feeds(spec, 5))[0]
        assert p.shape == (5, 1) and np.isfinite(p).all()
        assert (out / e["name"] / "config.json").is_file()
        assert e["dauc_ci"][0] <= e["dauc"] <= e["dauc_ci"][1]


def test_full_model_variants_meet_the_budget_and_shrink(repo):
    _, index = repo
    by = {e["name"]: e for e in index["models"]}
    for name in ("ctr-pruned", "ctr-edge"):  # distilled from the parent, the parent's valid AUC recorded
        rec = by[name]["prune"]
        assert rec["kept"] and rec["parent_bar"]["parent_valid_auc"] > 0.5 and rec["candidates"][0]["name"] == "epoch 0"
        # the vocabulary remap and the history's item -> attribute table, narrowed
        assert by[name]["index_tables"] and all(t["to"] == "uint16" for t in by[name]["index_tables"])
    assert by["ctr-fp32"]["dauc"] == pytest.approx(0.0, abs=1e-6)  # validated export: same AUC as Keras
    for name in ("ctr-fp32", "ctr-fp16"):
        assert by[name]["within_budget"], by[name]
    # int8 on a barely-trained tiny model sits at the budget's edge (bootstrap CI ~ +-0.004): bound it loosely
    assert abs(by["ctr-int8"]["dauc"]) < 0.005, by["ctr-int8"]
    # fp16 halves the float weights; the integer tables (vocabulary remap, the history's item -> attribute
    # table, uint16 in every variant) stay, and on this tiny model they are a third of the bytes
    assert by["ctr-fp16"]["size_bytes"] < 0.9 * by["ctr-fp32"]["size_bytes"]
    # ctr-int8 keeps the cross layers and the first MLP layer in float (the int8 check's choice), which on this
    # tiny model are most of the float bytes: it is only smaller, not 0.4x
    assert by["ctr-int8"]["size_bytes"] < by["ctr-fp32"]["size_bytes"]
    assert by["ctr-edge"]["size_bytes"] < by["ctr-int8"]["size_bytes"]
    assert by["ctr-pruned"]["size_bytes"] < by["ctr-fp32"]["size_bytes"]
    cfg = json.loads((repo[0] / "ctr-int8-dynamic" / "config.json").read_text())
    assert cfg["dynamic_batching"]["enabled"] is False and "batch-mates" in cfg["notes"]


def test_static_int8_variants_record_the_int8_check_and_the_isa(repo):
    out, index = repo
    by = {e["name"]: e for e in index["models"]}
    for name in ("ctr-int8", "ctr-edge"):
        rec = by[name]["int8"]
        fused = rec["fused_vs_simulated"]
        assert fused["rows"] == index["reference"]["test_rows"] and 0.0 <= fused["max_abs_diff"] <= rec["tolerance"]
        assert rec["within_tolerance"] and "refused" not in by[name]
        assert abs(fused["auc_fused"] - by[name]["test_auc"]) < 1e-12
        assert rec["config"]["reduce_range"] is True and rec["overflow_fraction"] == 0.0  # the safe default
        assert set(rec["isa"]["flags"]) >= {"avx2", "avx512_vnni", "avx_vnni"} and rec["isa"]["model_name"]
        manifest = json.loads((out / name / "1" / "manifest.json").read_text())
        assert manifest["extra"]["int8"]["overflow_fraction"] == 0.0 and manifest["extra"]["int8"]["layers"]
    assert "int8" not in by["ctr-fp32"] and "int8" not in by["ctr-int8-dynamic"]


def test_int8_variant_over_the_fused_tolerance_is_refused(trained, tmp_path):
    out = tmp_path / "tolerance0"
    index = compress_all(trained, out, CompressConfig(variants=("ctr-fp32", "ctr-int8"), int8_tolerance=0.0,
                                                      allow_over_budget=True, bootstrap=20, measure_rss=False),
                         work_dir=tmp_path / "work")
    by = {e["name"]: e for e in index["models"]}
    int8 = by["ctr-int8"]
    assert int8["int8"]["fused_vs_simulated"]["max_abs_diff"] > 0  # fused kernels round differently
    assert not int8["written"] and "float simulation" in int8["refused"] and "tolerance 0.0" in int8["refused"]
    assert not (out / "ctr-int8").exists() and (out / "ctr-fp32" / "1" / "model.onnx").is_file()
    with pytest.raises(ConfigError, match="int8_tolerance"):
        CompressConfig(int8_tolerance=-1.0)


def test_over_budget_variant_is_listed_but_not_written(trained, tmp_path):
    out = tmp_path / "strict"
    index = compress_all(trained, out, CompressConfig(variants=("ctr-fp32", "ctr-int8-dynamic"), budget=0.0,
                                                      bootstrap=20, measure_rss=False),
                         work_dir=tmp_path / "work")
    by = {e["name"]: e for e in index["models"]}
    assert by["ctr-fp32"]["written"] and (out / "ctr-fp32" / "1" / "model.onnx").is_file()
    dyn = by["ctr-int8-dynamic"]
    assert dyn["within_budget"] == (dyn["dauc"] >= 0)
    assert (out / "ctr-int8-dynamic").exists() == dyn["within_budget"]


def test_cli_and_config_errors(trained, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown variant"):
        CompressConfig(variants=("ctr-fp64",))
    assert main(["compress", "all", str(trained), "--out", str(tmp_path / "r"), "--variants", "ctr-fp32,ctr-fp16"]) == 0
    printed = capsys.readouterr().out
    assert "| ctr-fp16 | fp16 |" in printed and "reference: full Keras model" in printed


def test_latency_benchmark_measures_every_variant(repo, capsys):
    from ctredge.benchmarks.latency import main as latency_main

    out, index = repo
    assert latency_main(["--repository", str(out), "--batches", "1,8", "--seconds", "0.2",
                         "--out", str(out.parent / "lat.json")]) == 0
    results = json.loads((out.parent / "lat.json").read_text())["results"]
    assert {(r["model"], r["batch"]) for r in results} == {(e["name"], b) for e in index["models"] for b in (1, 8)}
    assert all(r["runs"] > 0 and r["p50_ms"] > 0 for r in results)
    assert "| ctr-edge | 8 |" in capsys.readouterr().out


def test_bench_accuracy_takes_the_index_figures_only_when_they_describe_the_same_rows(repo, trained):
    from ctredge.benchmarks.accuracy import accuracy_table

    out, index = repo
    data = json.loads((trained / "manifest.json").read_text())["data"]["files"][0]["path"]
    reused = accuracy_table(out, trained, data, bootstrap=20)
    assert reused["figures"] == "index.json" and reused["rows_source"] == "test split"
    computed = accuracy_table(out, trained, data, bootstrap=21)  # other bootstrap settings: computed anew
    assert computed["figures"] == "computed"
    index_path = out / "index.json"
    saved = index_path.read_text()
    try:
        index_path.unlink()  # no index: computed, and the same figures as the index held
        again = accuracy_table(out, trained, data, bootstrap=20)
    finally:
        index_path.write_text(saved)
    assert again["figures"] == "computed"
    keys = ("name", "auc", "dauc", "dauc_ci", "logloss", "calibration", "mean_prediction", "normalized_entropy",
            "pct_of_full_auc", "max_abs_diff_vs_reference", "bytes")
    assert [{k: r.get(k) for k in keys} for r in reused["models"]] == \
        [{k: r.get(k) for k in keys} for r in again["models"]]
    assert [r["auc"] for r in computed["models"]] == [r["auc"] for r in reused["models"]]


# ---------------------------------------------------------------- verdicts, publication, eval data
@pytest.mark.parametrize("verdict, dauc, allow, published", [
    ("met", -0.0001, False, "met"),
    ("not resolved", -0.0004, False, "not resolved"),   # point estimate within budget: published, marked
    ("not resolved", -0.0009, False, None),             # point estimate over budget: not written ...
    ("not resolved", -0.0009, True, "over budget (allowed)"),  # ... unless allowed
    ("missed", -0.003, False, None),
    ("missed", -0.003, True, "over budget (allowed)"),
])
def test_publication_follows_the_verdict(verdict, dauc, allow, published):
    from ctredge.compress.variants import publication

    got, why = publication(verdict, dauc, 0.0005, allow)
    assert got == published
    assert bool(why) == (published is None)
    if published is None:
        assert ("missed" in why) == (verdict == "missed") and ("--eval-data" in why) == (verdict == "not resolved")


def test_index_table_shows_verdicts_and_why_a_variant_is_not_written():
    from ctredge.tables import index_table

    base = {"quantization": "none", "size_bytes": 100, "test_auc": 0.7, "dauc": 0.0, "dauc_ci": [-1e-4, 1e-4]}
    index = {"models": [{**base, "name": "ctr-fp32", "verdict": "met", "published": "met", "written": True},
                        {**base, "name": "ctr-int8", "verdict": "not resolved", "published": "not resolved",
                         "written": True},
                        {**base, "name": "ctr-edge", "verdict": "missed", "published": None, "written": False,
                         "not_written": "missed: it loses 0.003 AUC"}],
             "reference": {"keras_test_auc": 0.7, "test_rows": 1000, "budget": 0.0005,
                           "bayes": {"bayes_auc": 0.8, "bayes_logloss": 0.1}}}
    text = index_table(index)
    assert "| met |" in text and "| not resolved (published) |" in text and "| missed (not written) |" in text
    assert "ctr-edge: not written: missed: it loses 0.003 AUC" in text and "Bayes-optimal on the same rows" in text


def test_narrow_index_tables_is_exact_and_smaller():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ctredge.compress.variants import narrow_index_tables

    remap = np.arange(5000, dtype=np.int32) % 700
    table = np.random.default_rng(0).normal(size=(700, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["remap", "ids"], ["rows"], name="g0", axis=0),
         helper.make_node("Gather", ["table", "rows"], ["out"], name="g1", axis=0)], "t",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, [None])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(remap, "remap"), numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ids = np.array([0, 4999, 1234, 700], dtype=np.int32)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]

    before, size = run(model), len(model.SerializeToString())
    rec = narrow_index_tables(model)
    assert [r["name"] for r in rec] == ["remap"] and rec[0]["to"] == "uint16"
    np.testing.assert_array_equal(run(model), before)
    assert len(model.SerializeToString()) < size - 9000
    assert narrow_index_tables(model) == []  # nothing left to narrow; the float table is never touched
    onnx.checker.check_model(model)


def test_eval_data_from_the_same_world_judges_the_variants(trained, tmp_path):
    held_out = tmp_path / "held-out.tsv"
    generate(str(held_out), rows=6000, seed=2, sample_seed=7, history=True, click_rate=0.2)
    index = compress_all(trained, tmp_path / "repo", CompressConfig(variants=("ctr-fp32", "ctr-int8-dynamic"),
                                                                    eval_data=str(held_out), bootstrap=20,
                                                                    measure_rss=False), work_dir=tmp_path / "work")
    ref = index["reference"]
    assert ref["rows_source"] == "eval file" and ref["test_rows"] == 6000 and ref["eval_data"]["rows"] == 6000
    assert ref["eval_data"]["world"]["sample_seed"] == 7 and ref["bayes"]["rows"] == 6000
    by = {e["name"]: e for e in index["models"]}
    assert by["ctr-fp32"]["verdict"] == "met" and by["ctr-fp32"]["written"]
    for e in index["models"]:
        assert e["verdict"] in ("met", "not resolved", "missed")
        assert e["written"] == (e["published"] is not None)


def test_eval_data_overlapping_the_training_rows_is_refused(trained, tmp_path):
    same_sample = tmp_path / "same.tsv"
    generate(str(same_sample), rows=3000, seed=2, history=True, click_rate=0.2)  # a prefix of the training rows
    with pytest.raises(ConfigError, match="sample seed"):
        compress_all(trained, tmp_path / "r", CompressConfig(variants=("ctr-fp32",), eval_data=str(same_sample)))
    data = json.loads((trained / "manifest.json").read_text())["data"]["files"][0]["path"]
    with pytest.raises(ConfigError, match="data file of the trained"):
        compress_all(trained, tmp_path / "r", CompressConfig(variants=("ctr-fp32",), eval_data=data))
