"""The ``attributions`` output (serve/explain.py): leave-one-group-out, on gRPC and REST, bounded by
``limits.max_explain_rows``; a request that does not ask for it is unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from servekit import contract_feeds, ctr_model, mlp_model, plain_model, raw_values, save
from tritonclient.utils import InferenceServerException

from ctredge.serve import codec, explain
from ctredge.serve.client import ranking_inputs
from ctredge.serve.server import ServerThread

pytestmark = pytest.mark.slow

MAX_EXPLAIN_ROWS = 220  # the small spec has G = 4 + 5 + 1 = 10 groups: at most 20 rows per explained request


@pytest.fixture(scope="module")
def models(tmp_path_factory, spec):
    """``lin``: the servekit ctr graph (a formula we can write in numpy); ``mlp``: a nonlinear one."""
    root = tmp_path_factory.mktemp("explain")
    lin, mlp = ctr_model(spec, seed=3), mlp_model(spec, seed=4)
    save(lin, root / "lin" / "1" / "model.onnx")
    save(mlp, root / "mlp" / "1" / "model.onnx")
    for name in ("lin", "mlp"):
        (root / name / "config.json").write_text(json.dumps({"max_batch_size": 64,
                                                             "limits": {"max_explain_rows": MAX_EXPLAIN_ROWS}}))
    save(plain_model(), root / "plain" / "1" / "model.onnx")
    (root / "index.json").write_text("{}")
    return root, lin


@pytest.fixture(scope="module")
def srv(models):
    with ServerThread(models[0], port=0, http_port=0, max_message_bytes=1 << 20) as s:
        yield s


@pytest.fixture(scope="module")
def gc(srv):
    with tg.InferenceServerClient(srv.url) as c:
        yield c


@pytest.fixture(scope="module")
def hc(srv):
    with th.InferenceServerClient(f"127.0.0.1:{srv.server.http_port}", network_timeout=20) as c:
        yield c


def _dt(arr):
    return "BYTES" if arr.dtype == object else codec.datatype_of(arr)


def _infer(client, mod, model, feeds, outputs=None, binary=True):
    inputs = []
    for name, arr in feeds.items():
        i = mod.InferInput(name, list(arr.shape), _dt(arr))
        if mod is th:
            i.set_data_from_numpy(arr, binary_data=binary)
        else:
            i.set_data_from_numpy(arr)
        inputs.append(i)
    kw = {"binary_data": binary} if mod is th else {}
    outs = [mod.InferRequestedOutput(n, **kw) for n in outputs] if outputs else None
    return client.infer(model, inputs, outputs=outs)


def _at_baseline(feeds, spec, g):
    """``feeds`` with group ``g`` (in :func:`explain.group_names` order) set to its baseline, by hand."""
    out = {k: v.copy() for k, v in feeds.items()}
    if g < spec.n_dense:
        out["dense"][:, g] = np.nan
    elif g < spec.n_dense + spec.n_cat:
        out["cat"][:, g - spec.n_dense] = 0
    else:
        out["hist"][:] = 0
    return out


def _numpy_lin(model, spec, feeds):
    """The servekit ctr graph written out: sigmoid(signed_log1p(dense) w + c + 1.7 c sum(emb[hist]) - 0.3)."""
    from onnx import numpy_helper

    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = np.nan_to_num(feeds["dense"].astype(np.float64), nan=0.0)
    d = (np.sign(x) * np.log1p(np.abs(x))) @ w["w_dense"].astype(np.float64)
    emb = w["emb"].astype(np.float64)
    c = emb[feeds["cat"] + spec.offsets[None, :]].sum(axis=1, keepdims=True)
    hs = emb[feeds["hist"] + int(w["item_off"])].sum(axis=1, keepdims=True)
    return (1 / (1 + np.exp(-(d + c + 1.7 * hs * c - 0.3)))).reshape(-1)


def test_group_names_and_config(gc, spec):
    names = explain.group_names(spec)
    assert names == ["price", "user_orders", "position", "rating",
                     "user_id", "region", "device", "item_id", "brand", "history"]
    cfg = gc.get_model_config("mlp").config
    assert json.loads(cfg.parameters[explain.GROUPS_PARAMETER].string_value) == names
    # not a default output: metadata still lists ctr only
    assert [o.name for o in gc.get_model_metadata("mlp").outputs] == ["ctr"]


def test_attributions_equal_separate_plain_requests(gc, spec):
    b = 7
    feeds = contract_feeds(spec, b, seed=11)
    res = _infer(gc, tg, "mlp", feeds, ["ctr", "attributions"])
    attr = res.as_numpy("attributions")
    names = explain.group_names(spec)
    assert attr.shape == (b, len(names)) and attr.dtype == np.float32
    plain = _infer(gc, tg, "mlp", feeds).as_numpy("ctr").reshape(-1)
    np.testing.assert_allclose(res.as_numpy("ctr").reshape(-1), plain, rtol=0, atol=1e-6)
    for g in range(len(names)):
        moved = _infer(gc, tg, "mlp", _at_baseline(feeds, spec, g)).as_numpy("ctr").reshape(-1)
        np.testing.assert_allclose(attr[:, g], plain - moved, rtol=0, atol=1e-6, err_msg=names[g])
    assert np.abs(attr).max() > 1e-3  # the model does use its features


def test_attributions_by_hand_on_the_formula(gc, spec, models):
    """The servekit ctr graph in numpy (float64): f(x) - f(x_g) per group, within float32 rounding."""
    _, lin = models
    feeds = contract_feeds(spec, 5, seed=12)
    attr = _infer(gc, tg, "lin", feeds, ["attributions"]).as_numpy("attributions")
    f = _numpy_lin(lin, spec, feeds)
    want = np.stack([f - _numpy_lin(lin, spec, _at_baseline(feeds, spec, g))
                     for g in range(len(explain.group_names(spec)))], axis=1)
    np.testing.assert_allclose(attr, want, rtol=0, atol=2e-6)
    # a group already at its baseline (NaN dense, id 0, empty history) has attribution 0 exactly
    feeds["dense"][2, 1] = np.nan
    feeds["cat"][3, 2] = 0
    feeds["hist"][4] = 0
    attr = _infer(gc, tg, "lin", feeds, ["attributions"]).as_numpy("attributions")
    assert attr[2, 1] == 0 and attr[3, spec.n_dense + 2] == 0 and attr[4, -1] == 0


def test_only_attributions_asked_returns_only_them(gc, spec):
    res = _infer(gc, tg, "mlp", contract_feeds(spec, 3, seed=2), ["attributions"]).get_response()
    assert [o.name for o in res.outputs] == ["attributions"]
    assert list(res.outputs[0].shape) == [3, len(explain.group_names(spec))]


def test_ranking_request_gives_the_expanded_rows_attributions(gc, spec):
    n = 9
    feeds = contract_feeds(spec, n, seed=8)
    raw = raw_values(spec, n, seed=8)
    for kind, arr in (("dense", feeds["dense"]), ("cat_raw", raw)):
        for side in ("user", "context"):
            cols = spec.columns("dense" if kind == "dense" else "cat", side)
            arr[:, cols] = arr[:1, cols]
    hist_raw = np.array([[b"a,b,c"]] * n, dtype=object)
    expanded = {"dense": feeds["dense"], "cat_raw": raw, "hist_raw": hist_raw}
    ranking = ranking_inputs(spec, expanded)
    assert ranking["cat_raw_user"].shape[0] == 1 and ranking["hist_raw"].shape[0] == 1
    ranked = _infer(gc, tg, "mlp", ranking, ["attributions"]).as_numpy("attributions")
    full = _infer(gc, tg, "mlp", expanded, ["attributions"]).as_numpy("attributions")
    np.testing.assert_array_equal(ranked, full)
    # and the same as the hashed ids sent as contract tensors
    ids = {"dense": feeds["dense"], "cat": spec.hash_cat(raw), "hist": spec.hash_history([[b"a", b"b", b"c"]] * n)}
    np.testing.assert_allclose(_infer(gc, tg, "mlp", ids, ["attributions"]).as_numpy("attributions"), full,
                               rtol=0, atol=1e-7)


@pytest.mark.parametrize("binary", [True, False])
def test_rest_and_grpc_give_identical_attributions(gc, hc, spec, binary):
    feeds = contract_feeds(spec, 6, seed=5)
    g = _infer(gc, tg, "mlp", feeds, ["ctr", "attributions"])
    h = _infer(hc, th, "mlp", feeds, ["ctr", "attributions"], binary=binary)
    np.testing.assert_array_equal(h.as_numpy("attributions"), g.as_numpy("attributions"))
    np.testing.assert_array_equal(h.as_numpy("ctr"), g.as_numpy("ctr"))


def test_the_limit_refuses_before_running_and_the_server_keeps_serving(gc, hc, spec):
    per_row = len(explain.group_names(spec)) + 1
    ok = MAX_EXPLAIN_ROWS // per_row
    assert _infer(gc, tg, "mlp", contract_feeds(spec, ok, seed=1), ["attributions"]).as_numpy(
        "attributions").shape == (ok, per_row - 1)
    big = contract_feeds(spec, ok + 1, seed=1)
    with pytest.raises(InferenceServerException) as err:
        _infer(gc, tg, "mlp", big, ["attributions"])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    msg = err.value.message()
    assert f"{(ok + 1) * per_row} rows" in msg and f"at most {MAX_EXPLAIN_ROWS}" in msg \
        and "max_explain_rows" in msg
    with pytest.raises(InferenceServerException) as err:
        _infer(hc, th, "mlp", big, ["ctr", "attributions"])
    assert err.value.status() == "400" and "max_explain_rows" in err.value.message()
    # the same rows without attributions are served, and so is the next explained request
    assert _infer(gc, tg, "mlp", big).as_numpy("ctr").shape == (ok + 1, 1)
    assert _infer(gc, tg, "mlp", contract_feeds(spec, 2), ["attributions"]).as_numpy("attributions").shape[0] == 2
    assert gc.is_server_ready()


def test_a_plain_request_is_unchanged(gc, spec, models):
    import onnxruntime as ort

    root, _ = models
    feeds = contract_feeds(spec, 10, seed=21)
    before = _infer(gc, tg, "mlp", feeds)
    _infer(gc, tg, "mlp", feeds, ["attributions"])
    after = _infer(gc, tg, "mlp", feeds)
    assert [o.name for o in after.get_response().outputs] == ["ctr"]
    np.testing.assert_array_equal(before.as_numpy("ctr"), after.as_numpy("ctr"))
    ref = ort.InferenceSession(str(root / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(after.as_numpy("ctr"), ref.run(["ctr"], feeds)[0])
    # unknown outputs keep their error; plain ONNX models have no attributions
    with pytest.raises(InferenceServerException, match=r"unknown output\(s\) \['nope'\]; the model has \['ctr'\]"):
        _infer(gc, tg, "mlp", feeds, ["nope"])
    x = {"x": np.ones((2, 3), np.float32), "k": np.ones((2, 2), np.int32), "s": np.array([b"a", b"b"], dtype=object)}
    with pytest.raises(InferenceServerException, match=r"unknown output\(s\) \['attributions'\]"):
        _infer(gc, tg, "plain", x, ["attributions"])


def test_limits_parse():
    from ctredge.serving_config import ConfigError, RequestLimits, ServingConfig

    assert RequestLimits().max_explain_rows == 4096
    assert ServingConfig(limits={"max_explain_rows": 10}).limits.max_explain_rows == 10
    with pytest.raises(ConfigError, match="max_explain_rows"):
        RequestLimits(max_explain_rows=0)


def test_expand_and_split_by_hand(spec):
    feeds = contract_feeds(spec, 2, seed=0)
    out = explain.expand(feeds, spec)
    G = len(explain.group_names(spec))
    assert out["dense"].shape == ((G + 1) * 2, spec.n_dense)
    np.testing.assert_array_equal(out["cat"][:2], feeds["cat"])
    first_cat = slice(2 * (1 + spec.n_dense), 2 * (2 + spec.n_dense))
    assert np.isnan(out["dense"][2:4, 0]).all() and (out["cat"][first_cat, 0] == 0).all()
    assert (out["hist"][-2:] == 0).all() and (out["hist"][:-2] != 0).any()
    ctr = np.arange((G + 1) * 2, dtype=np.float32).reshape(-1, 1)
    got = explain.split({"ctr": ctr}, 2)
    np.testing.assert_array_equal(got["ctr"], [[0], [1]])
    np.testing.assert_array_equal(got["attributions"][0], -2 * np.arange(1, G + 1))
    np.testing.assert_array_equal(got["attributions"][1], 1 - (2 * np.arange(1, G + 1) + 1))
