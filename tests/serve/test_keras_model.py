"""A real exported architecture (untrained DCN-v2 through tf2onnx) served end to end with tritonclient."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from servekit import contract_feeds, raw_values, save, small_spec

from ctredge.features import METADATA_KEY
from ctredge.serve.client import Client, ranking_inputs
from ctredge.serve.server import ServerThread

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dcn(tmp_path_factory):
    pytest.importorskip("tensorflow")
    import keras

    from ctredge.export.onnx import convert, set_metadata
    from ctredge.train.models import ModelConfig, build_model

    spec = small_spec()
    keras.utils.set_random_seed(0)
    model = build_model(spec, ModelConfig(model="dcnv2", embedding_dim=4, mlp_units=(8,), cross_layers=1))
    proto = convert(model, spec, opset=17)
    set_metadata(proto, {METADATA_KEY: spec.to_json(), "ctredge.model_name": "dcn", "ctredge.model_version": "1"})
    root = tmp_path_factory.mktemp("dcn")
    save(proto, root / "dcn" / "1" / "model.onnx")
    return spec, root, model


def test_dcnv2_over_grpc_equals_ort_and_keras(dcn):
    import onnxruntime as ort

    spec, root, keras_model = dcn
    session = ort.InferenceSession(str(root / "dcn" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = contract_feeds(spec, 32, seed=11)
    raw = raw_values(spec, 32, seed=11)
    for side in ("user", "context"):
        raw[:, spec.columns("cat", side)] = raw[:1, spec.columns("cat", side)]
        feeds["dense"][:, spec.columns("dense", side)] = feeds["dense"][:1, spec.columns("dense", side)]
    feeds["hist"][:] = feeds["hist"][:1]
    feeds["cat"] = spec.hash_cat(raw)
    want = session.run(["ctr"], feeds)[0]
    keras_out = np.asarray(keras_model({k: v for k, v in feeds.items()}, training=False)).reshape(-1, 1)
    np.testing.assert_allclose(want, keras_out, atol=1e-5)
    with ServerThread(root) as server:
        triton = tc.InferenceServerClient(server.url)
        inputs = []
        for name, arr in feeds.items():
            i = tc.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
            i.set_data_from_numpy(arr)
            inputs.append(i)
        np.testing.assert_array_equal(triton.infer("dcn", inputs).as_numpy("ctr"), want)
        triton.close()
        with Client(server.url) as client:
            assert client.feature_spec("dcn") == spec
            ranking = ranking_inputs(spec, {"dense": feeds["dense"], "cat_raw": raw, "hist": feeds["hist"]})
            assert ranking["cat_raw_user"].shape == (1, 2) and ranking["hist"].shape == (1, spec.hist_len)
            np.testing.assert_array_equal(client.predict("dcn", ranking), want.reshape(-1))
