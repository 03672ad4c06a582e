"""The text path without PyTorch: datagen --text -> ctredge train (tiny encoder) -> export (validated) -> the
server encodes a raw query with that encoder and answers as the model does with the embedding.

The encoder is textkit's tiny one (a word table, mean pooled), so only TensorFlow is needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as tg
from textkit import write_encoder

from ctredge.features import FeatureSpec
from ctredge.reader import read_all, sidecar_path
from ctredge.serve.server import ServerThread
from ctredge.textenc import SentenceEncoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from ctredge.datagen import generate
    from ctredge.export.onnx import ExportConfig, export_model
    from ctredge.serving_config import ServingConfig, write_serving_config
    from ctredge.train.models import ModelConfig
    from ctredge.train.train import TrainConfig, load_trained, train

    root = tmp_path_factory.mktemp("texte2e")
    data = str(root / "t.tsv")
    generate(data, rows=4000, seed=5, history=True, text=True)
    repo = root / "repo"
    enc_dir = write_encoder(repo / "text-encoder" / "1")
    spec = FeatureSpec.load(sidecar_path(data, "spec"))
    small = json.loads(spec.to_json())
    for t in small["text"]:
        t["dim"] = 8       # the tiny encoder's width
    (root / "small.spec.json").write_text(json.dumps(small))
    cfg = TrainConfig(data=(data,), out=str(root / "trained"), spec=str(root / "small.spec.json"), epochs=1,
                      verbose=0, text_encoder=str(enc_dir), min_count=1)
    manifest = train(cfg, ModelConfig(embedding_dim=4, mlp_units=(8,), cross_layers=1, wide=False, text_proj=4))
    model, tspec, parent = load_trained(root / "trained")
    export_model(model, tspec, parent, root / "trained", repo / "ctr-text" / "1", ExportConfig(name="ctr-text"))
    write_serving_config(repo / "ctr-text", ServingConfig(text_encoder="text-encoder"))
    return root, repo, data, tspec, manifest, model


def test_training_records_the_text_and_the_graph_holds_the_title_table(built):
    import onnx

    _, repo, _, tspec, manifest, model = built
    t = manifest["metrics"]["text"]
    assert t["titles"] > 100 and t["dim"] == 8
    assert [i for i in manifest["signature"]["inputs"]] == ["dense", "cat", "hist", "query_emb"]
    proto = onnx.load(str(repo / "ctr-text" / "1" / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["dense", "cat", "hist", "query_emb"]
    table = model.get_layer("title_table").get_weights()[1]
    assert table.shape == (t["titles"] + 1, 8) and not table[0].any() and np.abs(table[1:]).sum() > 0


def test_the_server_encodes_the_raw_query_as_training_did(built):
    _, repo, data, tspec, _, _ = built
    rows = read_all(data, tspec, limit=64)
    queries = [q.decode() for q in rows.text["query"]]
    enc = SentenceEncoder(repo / "text-encoder" / "1")
    feeds = {k: v for k, v in rows.feeds.items()}

    def infer(client, extra):
        ins = []
        for k, v in {**feeds, **extra}.items():
            dt = "BYTES" if v.dtype == object else ("FP32" if v.dtype == np.float32 else "INT64")
            i = tg.InferInput(k, list(v.shape), dt)
            i.set_data_from_numpy(v)
            ins.append(i)
        return client.infer("ctr-text", ins).as_numpy("ctr").reshape(-1)

    with ServerThread(repo, port=0) as s, tg.InferenceServerClient(s.url) as c:
        by_raw = infer(c, {"query": np.array([[q.encode()] for q in queries], dtype=object)})
        by_emb = infer(c, {"query_emb": enc.encode(queries)})
    np.testing.assert_allclose(by_raw, by_emb, atol=1e-6)
    assert np.isfinite(by_raw).all() and by_raw.std() > 0
