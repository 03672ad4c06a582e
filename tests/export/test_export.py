"""Export gate: validated write, metadata, tampered graph and wrong output name caught, size refusal."""

import numpy as np
import onnx
import pytest

from ctredge.artifacts import read_manifest
from ctredge.datagen import generate
from ctredge.errors import ValidationError
from ctredge.export import onnx as export_onnx
from ctredge.export.onnx import ExportConfig, export, load_spec_from_onnx, read_metadata
from ctredge.export.validate import check_signature, compare, cpu_session, ort_predictor
from ctredge.features import METADATA_KEY
from ctredge.train.models import ModelConfig
from ctredge.train.loop import keras_predict as predict
from ctredge.train.train import TrainConfig, load_trained, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = root / "clicks.tsv"
    generate(str(data), rows=3000, seed=4, history=True, click_rate=0.2)
    out = root / "trained"
    train(TrainConfig(data=(str(data),), out=str(out), epochs=1, batch_size=512, verbose=0),
          ModelConfig(model="deepfm", embedding_dim=4, mlp_units=(8,)))
    return out


def test_export_writes_validated_model_with_metadata(trained, tmp_path):
    out = tmp_path / "onnx"
    manifest = export(trained, out, ExportConfig(name="ctr-fp32", version=3))
    assert manifest["stage"] == "export" and manifest["extra"]["opset"] == 17
    assert set(manifest["metrics"]["validation_max_abs_diff"]) == {"batch_1", "batch_7", "batch_512"}
    assert max(manifest["metrics"]["validation_max_abs_diff"].values()) <= 1e-5
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto)
    meta = read_metadata(proto)
    assert meta["ctredge.model_name"] == "ctr-fp32" and meta["ctredge.model_version"] == "3"
    assert meta["ctredge.parent_manifest_sha256"] == manifest["parent"]["manifest_sha256"]
    _, spec, _ = load_trained(trained)
    assert load_spec_from_onnx(out / "model.onnx") == spec and METADATA_KEY in meta
    assert [o.name for o in proto.graph.output] == ["ctr"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    read_manifest(out, stage="export")


def test_tampered_graph_is_caught_and_nothing_written(trained, tmp_path, monkeypatch):
    real_convert = export_onnx.convert

    def tampered(model, spec, opset):
        proto = real_convert(model, spec, opset)
        floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
        biggest = max(floats, key=lambda t: len(t.raw_data))
        arr = onnx.numpy_helper.to_array(biggest).copy()
        arr += np.asarray(0.5, dtype=arr.dtype)
        biggest.CopyFrom(onnx.numpy_helper.from_array(arr, biggest.name))
        return proto

    monkeypatch.setattr(export_onnx, "convert", tampered)
    with pytest.raises(ValidationError, match=r"batch 1: max \|diff\| of 'ctr'"):
        export(trained, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_wrong_output_name_is_caught(trained):
    model, spec, _ = load_trained(trained)
    proto = export_onnx.convert(model, spec, 17)
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = ["output_0" if o == old else o for o in node.output]
    proto.graph.output[0].name = "output_0"
    with pytest.raises(ValidationError, match=r"outputs must be \['ctr'\], got \['output_0'\]"):
        check_signature(cpu_session(proto), spec)


def test_compare_reports_each_batch(trained):
    model, spec, _ = load_trained(trained)
    sess = cpu_session(export_onnx.convert(model, spec, 17))
    diffs = compare(lambda f: predict(model, f).reshape(-1, 1), ort_predictor(sess), spec)
    assert set(diffs) == {"batch_1", "batch_7", "batch_512"}
    with pytest.raises(ValidationError, match="atol"):
        compare(lambda f: predict(model, f).reshape(-1, 1) + 1e-3, ort_predictor(sess), spec)


def test_models_over_the_protobuf_limit_are_refused_before_conversion(trained, monkeypatch):
    model, spec, _ = load_trained(trained)
    monkeypatch.setattr(export_onnx, "weight_bytes", lambda m: 3 * 1024**3)
    with pytest.raises(ValidationError, match="over protobuf's 2 GiB limit"):
        export_onnx.convert(model, spec, 17)


def test_bad_opset_is_a_config_error():
    from ctredge.errors import ConfigError

    with pytest.raises(ConfigError, match="opset must be in"):
        ExportConfig(opset=19)
