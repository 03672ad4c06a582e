"""``ctredge compress quantize`` checks its input's manifest the way ``export`` checks its parent."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ctredge.artifacts import write_manifest  # noqa: E402
from ctredge.cli import main  # noqa: E402


def _export_artifact(folder, stage="export"):
    """A tiny fp32 model ``ctr = Sigmoid(x @ W)`` in an artifact folder with its manifest."""
    folder.mkdir(parents=True)
    w = numpy_helper.from_array(np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)[:, :1].copy(), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["ctr"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, ["B", 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(folder / "model.onnx"))
    write_manifest(folder, stage=stage)
    return folder / "model.onnx"


def test_a_verified_export_is_quantized(tmp_path, capsys):
    src = _export_artifact(tmp_path / "export")
    assert main(["compress", "quantize", str(src), "--variants", "fp16", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "model.fp16.onnx").is_file()
    assert "fp16" in capsys.readouterr().out


def test_a_tampered_model_is_refused(tmp_path, capsys):
    src = _export_artifact(tmp_path / "export")
    model = onnx.load(str(src))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 1), np.float32), "w"))
    onnx.save_model(model, str(src))  # same file, other weights: the manifest's sha256 no longer matches
    assert main(["compress", "quantize", str(src), "--variants", "fp16", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "failed verification" in err and "model.onnx changed since the manifest was written" in err
    assert not (tmp_path / "q").exists()


def test_a_model_without_manifest_needs_no_verify(tmp_path, capsys):
    src = _export_artifact(tmp_path / "export")
    (tmp_path / "export" / "manifest.json").unlink()
    assert main(["compress", "quantize", str(src), "--variants", "fp16", "--out", str(tmp_path / "q")]) == 2
    assert "no manifest.json beside it" in capsys.readouterr().err
    assert main(["compress", "quantize", str(src), "--variants", "fp16", "--out", str(tmp_path / "q"),
                 "--no-verify"]) == 0


def test_a_manifest_of_another_stage_is_refused(tmp_path, capsys):
    src = _export_artifact(tmp_path / "trained", stage="train")
    assert main(["compress", "quantize", str(src), "--variants", "fp16", "--out", str(tmp_path / "q")]) == 2
    assert "expected an artifact of stage export or variant" in capsys.readouterr().err
