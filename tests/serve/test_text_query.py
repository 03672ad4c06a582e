"""Text on the server: the raw ``query`` string tokenized with ``tokenizers``, encoded by the repository's
encoder model, fed as ``query_emb``; broadcast in a ranking request; bounded; no PyTorch anywhere.

The encoder and the tokenizer are tiny ones built here (textkit), so these tests need no text extra.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from servekit import contract_feeds, save
from textkit import DIM, ctr_text_model, reference_embedding, text_spec, write_encoder
from tritonclient.utils import InferenceServerException

from ctredge.errors import ConfigError
from ctredge.serve.errors import InvalidInput
from ctredge.serve.server import ServerThread
from ctredge.serve.signature import CtrSignature
from ctredge.serving_config import RequestLimits, serving_config_from_dict
from ctredge.textenc import SentenceEncoder

pytest.importorskip("tokenizers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tspec(spec):
    return text_spec(spec)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tspec):
    """``ctr-text`` (its config names ``text-encoder``), ``ctr-emb`` (no encoder: query_emb only), the encoder."""
    root = tmp_path_factory.mktemp("textrepo")
    write_encoder(root / "text-encoder" / "1")
    model, w = ctr_text_model(tspec, seed=1)
    for name, cfg in (("ctr-text", {"max_batch_size": 512, "text_encoder": "text-encoder",
                                    "limits": {"max_query_strings": 4, "max_query_bytes": 40}}),
                      ("ctr-emb", {"max_batch_size": 512})):
        save(model, root / name / "1" / "model.onnx")
        (root / name / "config.json").write_text(json.dumps(cfg))
    (root / "index.json").write_text("{}")
    return root, w


@pytest.fixture(scope="module")
def srv(repo):
    with ServerThread(repo[0], port=0, http_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def gc(srv):
    with tg.InferenceServerClient(srv.url) as c:
        yield c


def _inputs(mod, feeds):
    out = []
    for k, v in feeds.items():
        dt = "BYTES" if v.dtype == object else ("FP32" if v.dtype == np.float32 else "INT64")
        i = mod.InferInput(k, list(v.shape), dt)
        i.set_data_from_numpy(v)
        out.append(i)
    return out


def _ctr(client, model, feeds, mod=tg):
    return client.infer(model, _inputs(mod, feeds)).as_numpy("ctr").reshape(-1)


def _query(*strings):
    return np.array([[s.encode()] for s in strings], dtype=object)


def test_sentence_encoder_matches_numpy_and_empty_is_zero(tmp_path):
    enc = SentenceEncoder(write_encoder(tmp_path / "enc"))
    got = enc.encode(["red shoes", "", "Azure SETTEE for ladies", "red shoes", "unknown words"])
    assert got.shape == (5, DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], reference_embedding("red shoes"), atol=1e-6)
    np.testing.assert_allclose(got[2], reference_embedding("azure settee for ladies"), atol=1e-6)
    assert not got[1].any()
    np.testing.assert_array_equal(got[0], got[3])
    ids, mask = enc.tokenize(["red", "red shoes for men"])
    assert ids.shape == mask.shape == (2, 6) and mask.sum(1).tolist() == [3, 6]


def test_sentence_encoder_truncates_to_max_tokens(tmp_path):
    enc = SentenceEncoder(write_encoder(tmp_path / "enc"), max_tokens=4)
    ids, _ = enc.tokenize(["red shoes for men in blue"])
    assert ids.shape[1] == 4


def test_missing_encoder_files_are_a_clear_error(tmp_path):
    (tmp_path / "enc").mkdir()
    with pytest.raises(ConfigError, match="tokenizer.json"):
        SentenceEncoder(tmp_path / "enc")


def test_raw_query_equals_its_embedding_sent_directly(gc, tspec):
    feeds = contract_feeds(tspec, 3, seed=5)
    q = ["red shoes for men", "", "azure settee"]
    by_text = _ctr(gc, "ctr-text", {**feeds, "query": _query(*q)})
    emb = np.stack([reference_embedding(s) if s else np.zeros(DIM, np.float32) for s in q]).astype(np.float32)
    by_emb = _ctr(gc, "ctr-text", {**feeds, "query_emb": emb})
    np.testing.assert_allclose(by_text, by_emb, atol=1e-6)
    no_query = _ctr(gc, "ctr-text", feeds)          # absent = no query = zeros
    np.testing.assert_allclose(no_query[1], by_text[1], atol=1e-7)
    assert abs(no_query[0] - by_text[0]) > 1e-4     # the query moves the answer


def test_ranking_request_encodes_one_query_for_all_candidates(gc, tspec):
    feeds = contract_feeds(tspec, 256, seed=6)
    once = _ctr(gc, "ctr-text", {**feeds, "query": _query("crimson trainers")})
    every = _ctr(gc, "ctr-emb", {**feeds, "query_emb": np.tile(reference_embedding("crimson trainers"),
                                                               (256, 1)).astype(np.float32)})
    np.testing.assert_allclose(once, every, atol=1e-6)
    flat = _ctr(gc, "ctr-text", {**feeds, "query": np.array([b"crimson trainers"], dtype=object)})  # [1] too
    np.testing.assert_allclose(flat, once, atol=0)


def test_rest_takes_the_query_as_a_json_string(srv, tspec):
    feeds = contract_feeds(tspec, 2, seed=7)
    with th.InferenceServerClient(f"127.0.0.1:{srv.server.http_port}", network_timeout=20) as hc:
        via_rest = _ctr(hc, "ctr-text", {**feeds, "query": _query("blue sofa", "red")}, mod=th)
    with tg.InferenceServerClient(srv.url) as c:
        via_grpc = _ctr(c, "ctr-text", {**feeds, "query": _query("blue sofa", "red")})
    np.testing.assert_allclose(via_rest, via_grpc, atol=1e-7)


@pytest.mark.parametrize("query, match", [
    (_query("a", "b", "c", "d", "e"), "5 strings, expected at most 4"),
    (_query("red " * 20), "expected at most 40"),
    (np.array([[b"\xff\xfe"]], dtype=object), "UTF-8"),
])
def test_bad_queries_are_invalid_argument_and_the_server_keeps_serving(gc, tspec, query, match):
    feeds = contract_feeds(tspec, 5, seed=8)
    with pytest.raises(InferenceServerException, match=match) as err:
        _ctr(gc, "ctr-text", {**feeds, "query": query})
    assert "INVALID_ARGUMENT" in str(err.value.status())
    assert _ctr(gc, "ctr-text", {**feeds, "query": _query("red")}).shape == (5,)


def test_query_and_query_emb_together_are_refused(gc, tspec):
    feeds = contract_feeds(tspec, 1, seed=9)
    with pytest.raises(InferenceServerException, match="send the query once"):
        _ctr(gc, "ctr-text", {**feeds, "query": _query("red"), "query_emb": np.zeros((1, DIM), np.float32)})


def test_a_model_without_encoder_refuses_the_raw_query_and_names_query_emb(gc, tspec):
    feeds = contract_feeds(tspec, 1, seed=9)
    with pytest.raises(InferenceServerException, match="query_emb"):
        _ctr(gc, "ctr-emb", {**feeds, "query": _query("red")})
    with pytest.raises(InferenceServerException, match="not a finite"):
        _ctr(gc, "ctr-emb", {**feeds, "query_emb": np.full((1, DIM), np.nan, np.float32)})
    with pytest.raises(InferenceServerException, match=r"expected \[-1, 8\]"):
        _ctr(gc, "ctr-emb", {**feeds, "query_emb": np.zeros((1, DIM + 1), np.float32)})


def test_metadata_lists_the_text_inputs(gc):
    names = {i.name: (i.datatype, list(i.shape)) for i in gc.get_model_metadata("ctr-text").inputs}
    assert names["query"] == ("BYTES", [-1, 1]) and names["query_emb"] == ("FP32", [-1, DIM])
    assert "query" not in {i.name for i in gc.get_model_metadata("ctr-emb").inputs}
    assert gc.is_model_ready("text-encoder")   # the encoder is also a model of the repository


def test_header_check_counts_strings_before_decoding(tmp_path, tspec):
    enc = SentenceEncoder(write_encoder(tmp_path / "enc"))
    sig = CtrSignature(tspec, 64, RequestLimits(max_query_strings=2), encoder=enc)
    sig.check_header("query", "BYTES", [2, 1])
    with pytest.raises(InvalidInput, match="3 strings"):
        sig.check_header("query", "BYTES", [3, 1])
    assert sig.encodes_text(["dense", "query"]) and not sig.encodes_text(["dense", "query_emb"])


def test_config_names_an_encoder_by_model_name():
    assert serving_config_from_dict({"text_encoder": "text-encoder"}).text_encoder == "text-encoder"
    with pytest.raises(ConfigError, match="text_encoder"):
        serving_config_from_dict({"text_encoder": "../elsewhere"})
    with pytest.raises(ConfigError, match="max_query_tokens"):
        serving_config_from_dict({"limits": {"max_query_tokens": 0}})


def test_a_missing_encoder_fails_that_model_only(tmp_path, tspec):
    model, _ = ctr_text_model(tspec, seed=1)
    save(model, tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"text_encoder": "nowhere"}))
    save(model, tmp_path / "ok" / "1" / "model.onnx")
    (tmp_path / "index.json").write_text("{}")
    with ServerThread(tmp_path, port=0) as s, tg.InferenceServerClient(s.url) as c:
        assert c.is_model_ready("ok") and not c.is_model_ready("m")


def test_encoding_a_query_loads_no_torch_nor_transformers(tmp_path):
    import subprocess
    import sys

    folder = write_encoder(tmp_path / "enc")
    code = ("import json, sys\nfrom ctredge.textenc import SentenceEncoder\n"
            f"SentenceEncoder({str(folder)!r}).encode(['red shoes'])\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'sentence_transformers', 'tensorflow', 'keras'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_attributions_have_a_query_group_with_no_query_as_baseline(gc, tspec):
    from ctredge.serve import explain

    assert explain.group_names(tspec)[-1] == "query"
    feeds = contract_feeds(tspec, 2, seed=10)
    q = _query("red shoes", "")
    res = gc.infer("ctr-text", _inputs(tg, {**feeds, "query": q}),
                   outputs=[tg.InferRequestedOutput("ctr"), tg.InferRequestedOutput("attributions")])
    attr = res.as_numpy("attributions")
    with_q = res.as_numpy("ctr").reshape(-1)
    without = _ctr(gc, "ctr-text", feeds)
    np.testing.assert_allclose(attr[:, -1], with_q - without, atol=1e-6)
    assert attr[1, -1] == 0.0    # an empty query is at its baseline already
