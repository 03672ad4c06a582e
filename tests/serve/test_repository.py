"""ServingConfig (config.json) and the repository: versions, policies, failures reported per version."""

from __future__ import annotations

import asyncio
import json

import pytest
from servekit import ctr_model, plain_model, save, small_spec

from ctredge.errors import ConfigError
from ctredge.features import METADATA_KEY
from ctredge.serve.errors import ModelNotFound, ModelUnavailable
from ctredge.serve.repository import Repository
from ctredge.serving_config import (
    DynamicBatching, ServingConfig, VersionPolicy, read_serving_config, serving_config_from_dict,
    serving_config_to_dict, write_serving_config,
)


def test_defaults_suit_small_machines():
    cfg = ServingConfig()
    assert (cfg.max_batch_size, cfg.providers, cfg.intra_op_threads, cfg.inter_op_threads, cfg.allow_spinning) == \
        (4096, ("auto",), 1, 1, False)
    assert cfg.dynamic_batching == DynamicBatching(enabled=True, max_batch_rows=4096, max_queue_delay_us=0,
                                                   max_queue_size=1024)
    assert (cfg.row_alignment, cfg.instances) == (4, 0)
    assert cfg.version_policy == VersionPolicy("latest", 1, ())


def test_the_compress_stage_config_parses():
    cfg = serving_config_from_dict({"dynamic_batching": {"enabled": False},
                                    "notes": "dynamic int8 changes with batch-mates"})
    assert cfg.dynamic_batching.enabled is False and cfg.notes.startswith("dynamic int8")


def test_json_round_trip(tmp_path):
    cfg = serving_config_from_dict({"max_batch_size": 256, "providers": ["cuda", "cpu"], "allow_spinning": True,
                                    "dynamic_batching": {"enabled": True, "max_queue_delay_us": 200},
                                    "version_policy": {"kind": "specific", "versions": [1, 3]}})
    path = write_serving_config(tmp_path, cfg)
    assert path == tmp_path / "config.json"
    data = json.loads(path.read_text())
    assert data["providers"] == ["cuda", "cpu"] and data["version_policy"]["versions"] == [1, 3]
    assert read_serving_config(tmp_path) == cfg
    assert serving_config_from_dict(serving_config_to_dict(cfg)) == cfg
    assert serving_config_from_dict({"providers": "auto"}).providers == ("auto",)


@pytest.mark.parametrize("data, message", [
    ({"max_batch": 8}, r"unknown key\(s\) \['max_batch'\]"),
    ({"dynamic_batching": {"enable": True}}, r"DynamicBatching: unknown key\(s\) \['enable'\]"),
    ({"version_policy": {"latest": 2}}, r"VersionPolicy: unknown key\(s\) \['latest'\]"),
    ({"max_batch_size": 0}, "max_batch_size: expected an integer >= 1"),
    ({"max_batch_size": True}, "max_batch_size: expected an integer >= 1"),
    ({"providers": ["auto", "cpu"]}, "stands alone"),
    ({"providers": ["gpu0"]}, "unknown provider 'gpu0'"),
    ({"providers": []}, "non-empty list"),
    ({"allow_spinning": "no"}, "allow_spinning: expected true or false"),
    ({"dynamic_batching": {"max_queue_size": 0}}, "max_queue_size: expected an integer >= 1"),
    ({"version_policy": {"kind": "newest"}}, "version_policy.kind"),
    ({"version_policy": {"kind": "specific"}}, "needs a non-empty 'versions'"),
    ({"dynamic_batching": 3}, "dynamic_batching: expected an object"),
])
def test_bad_configs_are_rejected(data, message):
    with pytest.raises(ConfigError, match=message):
        serving_config_from_dict(data)


def test_version_policy_select():
    assert VersionPolicy().select([3, 1, 2]) == [3]
    assert VersionPolicy(num_versions=2).select([3, 1, 2]) == [2, 3]
    assert VersionPolicy("all").select([2, 1]) == [1, 2]
    assert VersionPolicy("specific", versions=(1, 5)).select([1, 2, 3]) == [1]


def test_version_config_overrides_model_config(tmp_path):
    (tmp_path / "2").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"max_batch_size": 8, "dynamic_batching": {"enabled": True},
                                                      "notes": "model"}))
    (tmp_path / "2" / "config.json").write_text(json.dumps({"dynamic_batching": {"max_queue_delay_us": 9}}))
    cfg = read_serving_config(tmp_path, 2)
    assert cfg.max_batch_size == 8 and cfg.notes == "model"
    assert cfg.dynamic_batching.enabled and cfg.dynamic_batching.max_queue_delay_us == 9
    assert read_serving_config(tmp_path, 1).dynamic_batching.max_queue_delay_us == 0
    (tmp_path / "2" / "config.json").write_text(json.dumps({"version_policy": {"kind": "all"}}))
    with pytest.raises(ConfigError, match="version_policy belongs in"):
        read_serving_config(tmp_path, 2)


def _loaded(root):
    repo = Repository(root)
    asyncio.run(repo.load())
    return repo


def test_latest_version_served_and_failures_reported(tmp_path, caplog):
    spec = small_spec()
    for v in (1, 2, 10):
        save(ctr_model(spec, seed=v), tmp_path / "ctr" / str(v) / "model.onnx")
    (tmp_path / "empty").mkdir()  # no versions: skipped
    (tmp_path / "nofile" / "1").mkdir(parents=True)
    save(plain_model(), tmp_path / "badcfg" / "1" / "model.onnx")
    (tmp_path / "badcfg" / "config.json").write_text('{"max_batch_size": 8, "typo": 1}')
    save(plain_model(), tmp_path / "badver" / "1" / "model.onnx")
    (tmp_path / "badver" / "1" / "config.json").write_text('{"providers": ["gpu0"]}')
    mismatched = ctr_model(spec)
    mismatched.graph.input[0].name = "dense_values"
    for node in mismatched.graph.node:
        node.input[:] = ["dense_values" if i == "dense" else i for i in node.input]
    save(mismatched, tmp_path / "mismatch" / "1" / "model.onnx")
    repo = _loaded(tmp_path)
    states = {(m.name, m.version): (m.state, m.reason) for m in repo.all()}
    assert states["ctr", 10] == ("READY", "")
    assert states["ctr", 1] == states["ctr", 2] == ("UNAVAILABLE", "not selected by the version_policy")
    assert "empty" not in repo.names()
    assert states["nofile", 1][0] == "UNAVAILABLE" and "model.onnx is missing" in states["nofile", 1][1]
    # clients see the kind of failure; the details (paths, the file's contents) are in the log only
    assert states["badcfg", 1][1] == states["badver", 1][1] == "its config.json is invalid (details in the server log)"
    assert "unknown key(s) ['typo']" in caplog.text and "unknown provider 'gpu0'" in caplog.text
    assert states["mismatch", 1][1] == "its graph does not follow its FeatureSpec (details in the server log)"
    assert all(str(tmp_path) not in reason for _, reason in states.values())
    assert repo.get("ctr").version == 10 and repo.get("ctr", "10").version == 10
    with pytest.raises(ModelUnavailable, match="version 1 is UNAVAILABLE: not selected"):
        repo.get("ctr", "1")
    with pytest.raises(ModelNotFound, match="has no version 3; it has \\[1, 2, 10\\]"):
        repo.get("ctr", "3")
    with pytest.raises(ModelNotFound, match="'nope' is not in the repository"):
        repo.get("nope")
    with pytest.raises(ModelUnavailable, match="no ready version"):
        repo.get("nofile")
    assert repo.get("ctr").spec == spec and repo.get("ctr").provider == "CPUExecutionProvider"


def test_a_bad_spec_in_metadata_fails_that_model_only(tmp_path):
    from onnx import helper

    model = ctr_model(small_spec())
    helper.set_model_props(model, {METADATA_KEY: '{"dense": [], "cat": [], "oops": 1}'})
    save(model, tmp_path / "bad" / "1" / "model.onnx")
    save(plain_model(), tmp_path / "good" / "1" / "model.onnx")
    repo = _loaded(tmp_path)
    assert repo.is_ready("good") and not repo.is_ready("bad")
    assert "FeatureSpec in its metadata is invalid" in repo.versions["bad"][1].reason
