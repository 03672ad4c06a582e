"""The gRPC load generator, the server process wrapper and the no-op floor model, on tiny data.

No test asserts a time: only counts, orderings and answers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))  # servekit's hand-built models

from servekit import ctr_model, save  # noqa: E402

from ctredge.benchmarks import procs  # noqa: E402
from ctredge.benchmarks.floor import noop_model, write_noop_model  # noqa: E402
from ctredge.benchmarks.load import (  # noqa: E402
    LoadGenError, build_requests, check_request, default_processes, run_load,
)
from ctredge.benchmarks.procs import ServerProcess, ServerStartError, cpu_plan, footprint  # noqa: E402

RANK_ROWS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from ctredge.datagen import generate

    path = tmp_path_factory.mktemp("data") / "clicks.tsv"
    generate(str(path), rows=2000, seed=0, history=True)
    return path


@pytest.fixture(scope="module")
def spec(data):
    from ctredge.reader import resolve_spec

    return resolve_spec(data)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, spec) -> Path:
    """``noop`` (the floor) and ``ctr`` (servekit's hand-built contract model), both on the data's spec."""
    root = tmp_path_factory.mktemp("repo")
    write_noop_model(spec, root, config={"max_batch_size": 512})
    save(ctr_model(spec, seed=3), root / "ctr" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def requests(spec, data) -> dict[str, list[bytes]]:
    return {
        "row": build_requests(spec, data, "ctr", "row", count=16),
        "ranking": build_requests(spec, data, "ctr", "ranking", rows=RANK_ROWS, count=8),
        "noop-row": build_requests(None, data, "noop", "row", count=4, form="raw"),
    }


@pytest.fixture(scope="module")
def server(repo, requests):
    plan = cpu_plan()
    with ServerProcess(repo, cpus=plan["server_cpus"] if plan["pinned"] else None, model="noop",
                       request=requests["noop-row"][0]) as srv:
        yield srv


# ----------------------------------------------------------------------------- floor
def test_floor_model_follows_the_contract_and_answers_zeros(server, spec, data):
    import onnxruntime as ort

    from ctredge.features import METADATA_KEY
    from ctredge.serve.client import Client

    sess = ort.InferenceSession(noop_model(spec).SerializeToString(), providers=["CPUExecutionProvider"])
    assert {i.name: (i.type, len(i.shape)) for i in sess.get_inputs()} == spec.onnx_input_types()
    assert sess.get_modelmeta().custom_metadata_map[METADATA_KEY] == spec.to_json()
    with Client(server.url) as c:
        assert c.model_ready("noop")
        assert c.feature_spec("noop") == spec  # served as a ctredge model, not a plain one
    for kind, rows in (("row", 1), ("ranking", RANK_ROWS), ("batch", 7)):
        for form in ("ids", "raw"):
            req = build_requests(spec, data, "noop", kind, rows=rows, count=2, form=form)[1]
            out = check_request(server.url, req, rows)["ctr"]
            assert out.shape == (rows, 1) and out.dtype == np.float32
            assert not out.any()


# ----------------------------------------------------------------------------- requests
def test_ranking_requests_send_the_user_side_once_and_match_expanded(server, spec, data, requests):
    from tritonclient.grpc import service_pb2 as pb

    ranked = requests["ranking"]
    expanded = build_requests(spec, data, "ctr", "ranking", rows=RANK_ROWS, count=8, expand_ranking=True)
    raw = build_requests(spec, data, "ctr", "ranking", rows=RANK_ROWS, count=8, form="raw")
    shapes = {t.name: list(t.shape) for t in pb.ModelInferRequest.FromString(ranked[0]).inputs}
    assert shapes["cat_user"][0] == 1 and shapes["hist"][0] == 1 and shapes["cat_item"][0] == RANK_ROWS
    assert shapes["dense_item"][0] == RANK_ROWS and shapes["dense_context"][0] == 1
    full = {t.name: list(t.shape) for t in pb.ModelInferRequest.FromString(expanded[0]).inputs}
    assert full == {"dense": [RANK_ROWS, spec.n_dense], "cat": [RANK_ROWS, spec.n_cat],
                    "hist": [RANK_ROWS, spec.hist_len]}
    for i in (0, 5):
        a = check_request(server.url, ranked[i], RANK_ROWS)["ctr"]
        b = check_request(server.url, expanded[i], RANK_ROWS)["ctr"]
        c = check_request(server.url, raw[i], RANK_ROWS)["ctr"]
        np.testing.assert_allclose(a, b, rtol=1e-6)
        np.testing.assert_allclose(a, c, rtol=1e-6)
        assert np.unique(a).size > 1  # different candidates, different scores
    rows = [check_request(server.url, r, 1)["ctr"][0, 0] for r in requests["row"][:4]]
    assert len(set(rows)) > 1  # each row request carries another row


def test_build_requests_rejects_bad_arguments(spec, data):
    with pytest.raises(LoadGenError, match="kind must be one of"):
        build_requests(spec, data, "ctr", "pairs")
    with pytest.raises(LoadGenError, match="form must be one of"):
        build_requests(spec, data, "ctr", "row", form="typed")
    with pytest.raises(LoadGenError, match="count and rows"):
        build_requests(spec, data, "ctr", "batch", rows=0)


# ----------------------------------------------------------------------------- load
@pytest.mark.parametrize("kind", ["row", "ranking"])
@pytest.mark.parametrize("concurrency,processes", [(1, 1), (8, 2)])
def test_run_load_counts_every_request(server, requests, kind, concurrency, processes):
    rows = 1 if kind == "row" else RANK_ROWS
    plan = cpu_plan()
    r = run_load(server.url, requests[kind], concurrency=concurrency, processes=processes, duration_s=1.0,
                 warmup_s=0.2, rows_per_request=rows, cpus=plan["client_cpus"] if plan["pinned"] else None)
    assert r["requests"] > 0 and r["ok"] == r["requests"] and r["errors"] == {}
    assert r["processes"] == processes and sum(r["per_process_concurrency"]) == concurrency
    assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert 0 < r["mean_ms"] <= r["max_ms"]
    assert round(r["predictions_per_s"] * r["seconds"]) == r["ok"] * rows
    assert round(r["req_per_s"] * r["seconds"]) == r["requests"]
    assert len(r["client_cpu"]) == processes and isinstance(r["client_saturated"], bool)


def test_run_load_stops_at_max_requests(server, requests):
    r = run_load(server.url, requests["row"], concurrency=4, processes=2, duration_s=60, warmup_s=0.1,
                 max_requests=41, rows_per_request=1)
    assert r["requests"] == r["ok"] == 41
    assert r["seconds"] < 60  # the count bound ended the run, not the duration


def test_run_load_counts_errors_by_status_code(server, spec, data):
    bad = build_requests(spec, data, "no-such-model", "row", count=2)
    with pytest.raises(LoadGenError, match="NOT_FOUND"):
        run_load(server.url, bad, concurrency=1, duration_s=1, rows_per_request=1)
    r = run_load(server.url, bad, concurrency=2, duration_s=30, warmup_s=0, max_requests=10, rows_per_request=1,
                 verify=False)
    assert r["errors"] == {"NOT_FOUND": 10} and r["ok"] == 0 and r["requests"] == 10
    assert r["p50_ms"] is None and r["predictions_per_s"] == 0


def test_run_load_rejects_bad_arguments(requests):
    with pytest.raises(LoadGenError, match="concurrency"):
        run_load("127.0.0.1:1", requests["row"], concurrency=0, duration_s=1, rows_per_request=1)
    with pytest.raises(LoadGenError, match="no requests"):
        run_load("127.0.0.1:1", [], concurrency=1, duration_s=1, rows_per_request=1)


def test_default_processes():
    assert default_processes(1) == default_processes(8) == 1
    assert default_processes(64, cpus=[1]) == 1  # one client core: more processes would only switch
    assert default_processes(64, cpus=[4, 5, 6, 7, 8, 9]) == 4
    assert default_processes(20, cpus=[4, 5, 6, 7]) == 2


# ----------------------------------------------------------------------------- processes
def test_cpu_plan_splits_the_available_cores(monkeypatch):
    monkeypatch.setattr(procs.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    one = cpu_plan()
    assert not one["pinned"] and one["server_cpus"] == one["client_cpus"] == [3] and "1 core" in one["reason"]
    monkeypatch.setattr(procs.os, "sched_getaffinity", lambda pid: {0, 1})
    two = cpu_plan()
    assert two["pinned"] and two["server_cpus"] == [0] and two["client_cpus"] == [1]
    monkeypatch.setattr(procs.os, "sched_getaffinity", lambda pid: set(range(16)))
    many = cpu_plan(n_client_procs=4)
    assert many["server_cpus"] == list(range(12)) and many["client_cpus"] == [12, 13, 14, 15]
    assert cpu_plan(n_client_procs=99)["server_cpus"] == [0]


def test_server_process_reports_memory_and_cold_start(server):
    assert server.pid and server.url
    assert server.rss_bytes() > 10_000_000 and server.hwm_bytes() >= server.rss_bytes()
    assert 0 < server.ready_s <= server.cold_start_s
    if server.cpus:
        allowed = os.sched_getaffinity(server.pid)
        assert allowed == set(server.cpus) and server.pin_method == "taskset"


def test_footprint_of_one_model_pinned_without_taskset(repo, requests, monkeypatch):
    monkeypatch.setattr(procs.shutil, "which", lambda name: None)  # the sched_setaffinity path
    cpu = procs.available_cpus()[0]
    fp = footprint(repo, "noop", requests["noop-row"][0], n_requests=20, cpus=[cpu])
    assert fp["pin_method"] == "sched_setaffinity" and fp["cpus"] == [cpu]
    assert fp["onnx_bytes"] == (repo / "noop" / "1" / "model.onnx").stat().st_size
    assert fp["folder_bytes"] >= fp["onnx_bytes"] and fp["version"] == 1
    assert fp["rss_after_bytes"] > 10_000_000 and fp["hwm_bytes"] >= fp["rss_after_bytes"]
    assert 0 < fp["ready_s"] <= fp["cold_start_s"]


def test_server_that_does_not_start_gives_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-repository"
    with pytest.raises(ServerStartError) as exc:
        ServerProcess(missing, start_timeout=60, log_dir=tmp_path / "logs").start()
    msg = str(exc.value)
    assert "exited before it was ready" in msg and "exit status" in msg
    assert str(missing) in msg and "is not a folder" in msg  # the server's own stderr, quoted
    with pytest.raises(ServerStartError, match="no-such-flag"):
        ServerProcess(tmp_path, ["--no-such-flag"], start_timeout=60, log_dir=tmp_path / "logs").start()


def test_server_that_refuses_the_cold_start_request(repo, spec, data, tmp_path):
    req = build_requests(spec, data, "noop", "row", count=1)[0]
    with pytest.raises(ServerStartError, match="NOT_FOUND"):
        ServerProcess(repo, model="missing", request=build_requests(spec, data, "missing", "row", count=1)[0],
                      start_timeout=60, log_dir=tmp_path).start()
    with ServerProcess(repo, model="noop", request=req) as srv:
        pass
    assert srv.returncode == 0  # SIGTERM: a graceful stop
    assert not srv.log_dir.exists()  # its own log folder is removed after a clean run
