"""The hostile-client harness on a tiny hand-built repository: a row per attack, each with a status code.

No test asserts a time or a status the server should give: the harness reports what it got.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))  # servekit's hand-built models

from servekit import ctr_model, save, small_spec  # noqa: E402

from ctredge.benchmarks import hostile  # noqa: E402
from ctredge.benchmarks.hostile_attacks import ATTACKS, BY_NAME  # noqa: E402
from ctredge.benchmarks.hostile_calls import ordinary_request, rows_for_bytes, zeros_inputs  # noqa: E402
from ctredge.errors import CtrEdgeError  # noqa: E402

CHEAP = ["load-dotdot", "shape-1000-dims", "garbage-bytes"]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-repo")
    save(ctr_model(small_spec(), seed=1), root / "ctr" / "1" / "model.onnx")
    return root


@pytest.mark.slow
def test_cheap_attacks_give_a_row_each(tiny_repo, tmp_path):
    out = tmp_path / "out"
    report = hostile.run_harness(tiny_repo, "ctr", out, quick=True, idle_seconds=0.2, quiet_seconds=0.3,
                                 attacks=",".join(CHEAP), model_control_mode="explicit")
    saved = json.loads((out / "hostile.json").read_text())
    assert [r["attack"] for r in saved["rows"]] == CHEAP
    for row in saved["rows"]:
        assert row["calls"] >= 1 and sum(row["codes"].values()) == row["calls"]
        assert row["code"] in row["codes"] and row["code"].isupper()
        assert row["harness_error"] is None
        assert len(row["message"]) <= 200
        assert row["rss_before"] and row["rss_after"]
        assert row["probe_quiet"]["n"] >= 1
    assert saved["rows"][2]["calls"] == 3  # three undecodable payloads
    assert "--model-control-mode" in saved["server_command"]
    table = (out / "hostile.md").read_text()
    assert all(f"| {name} |" in table for name in CHEAP)
    assert report["rows"] == saved["rows"]


def test_select_and_registry():
    assert [a.name for a in hostile.select(None)] == [a.name for a in ATTACKS]
    assert [a.name for a in hostile.select("dense-inf, load-dotdot")] == ["dense-inf", "load-dotdot"]
    with pytest.raises(CtrEdgeError, match="unknown attack"):
        hostile.select("dense-inf,rm-rf")
    assert len(BY_NAME) == len(ATTACKS)
    assert {a.group for a in ATTACKS} == {1, 2, 3, 4, 5}
    assert [a.name for a in ATTACKS if a.terminal] == ["sigterm-inflight"]
    assert all(a.description for a in ATTACKS)


def test_requests_are_zeros_of_the_contract_shapes():
    from tritonclient.grpc import service_pb2 as pb

    spec = small_spec()
    feeds = zeros_inputs(spec, 3)
    assert {k: v.shape for k, v in feeds.items()} == {"dense": (3, spec.n_dense), "cat": (3, spec.n_cat),
                                                      "hist": (3, spec.hist_len)}
    assert all(not v.any() for v in feeds.values())
    req = pb.ModelInferRequest.FromString(ordinary_request(spec, "ctr"))
    assert req.model_name == "ctr" and [list(t.shape) for t in req.inputs] == [[1, 4], [1, 5], [1, 5]]
    rows = rows_for_bytes(spec, 1_000_000)
    assert 0.9e6 <= rows * (4 * spec.n_dense + 8 * spec.n_cat + 8 * spec.hist_len) <= 1e6


def test_markdown_escapes_and_marks_paused_probe():
    row = {"attack": "a", "group": 4, "codes": {"OK": 1}, "message": "x | y", "wall_s": 0.1, "rss_before": 1e8,
           "rss_after": None, "rss_idle": None, "probe_quiet": {"p50_ms": 1.0, "p99_ms": 2.0},
           "probe_attack": None, "extra": {}, "harness_error": None, "server_alive_after": False,
           "server_restarted_before": False}
    text = hostile.markdown({"model": "m", "repository": "r", "server_command": ["serve"], "idle_seconds": 1,
                             "quiet_seconds": 1, "quick": True, "rows": [row]})
    assert "x \\| y" in text and "paused" in text and "server_alive_after" in text
