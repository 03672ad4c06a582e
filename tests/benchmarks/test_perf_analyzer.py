"""perf_analyzer as the yardstick: input data, CSV parsing, the runner, the "not installed" path, the shim.

Most tests use a stand-in script for the binary; the real perf_analyzer runs only where ``make perf-tools``
installed it (``.venv-perf``, or ``$CTREDGE_PERF_ANALYZER``), and the test says so when it skips.
No test asserts a time.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))  # servekit's hand-built models

from servekit import ctr_model, save  # noqa: E402

from ctredge.benchmarks import perf_analyzer as pa  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

CSV = """Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,555.371,6,1,752,2532,5102,27869
"""
# the shape perf_analyzer writes when the server reports statistics (more columns, same names for ours)
CSV_SERVER = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,\
request/response,response wait
16,14250.5,12,300,40,20,500,10,3,1100,1500,1800,2500,1120,15,1000
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from ctredge.datagen import generate

    path = tmp_path_factory.mktemp("pa-data") / "clicks.tsv"
    generate(str(path), rows=600, seed=4, history=True)
    return path


@pytest.fixture(scope="module")
def spec(data):
    from ctredge.reader import resolve_spec

    return resolve_spec(data)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, spec) -> Path:
    root = tmp_path_factory.mktemp("pa-repo")
    save(ctr_model(spec, seed=3), root / "ctr" / "1" / "model.onnx")
    return root


# ----------------------------------------------------------------------------- CSV
def test_parse_csv_reads_throughput_and_percentiles_in_ms():
    got = pa.parse_csv(CSV)
    assert got["infer_per_s"] == pytest.approx(555.371)
    assert got["concurrency"] == 1
    assert (got["p50_ms"], got["p90_ms"], got["p95_ms"], got["p99_ms"]) == pytest.approx((0.752, 2.532, 5.102,
                                                                                          27.869))
    assert got["columns"]["Client Send"] == 6


def test_parse_csv_with_server_columns_and_leading_noise():
    got = pa.parse_csv("some log line\n\n" + CSV_SERVER)
    assert got["infer_per_s"] == pytest.approx(14250.5) and got["p99_ms"] == pytest.approx(2.5)
    assert got["columns"]["Server Queue"] == 40


@pytest.mark.parametrize("text", ["", "a,b\n1,2\n", "Concurrency,Inferences/Second,p50 latency\n"])
def test_parse_csv_refuses_what_is_not_a_measurement(text):
    with pytest.raises(pa.PerfAnalyzerError):
        pa.parse_csv(text)


# ----------------------------------------------------------------------------- input data
def test_row_input_data_is_the_contract_with_ids_in_range(spec, data):
    from ctredge.benchmarks.load import _inputs, _read_rows

    doc = pa.input_data(spec, data, "row", count=32)
    doc = json.loads(json.dumps(doc))  # what perf_analyzer reads: plain JSON, no NaN literals
    assert len(doc["data"]) == 32
    assert pa.check_input_data(doc, spec, 1) == 32  # every request passes ctredge serve's own checks
    rows = pa.decode_input_data(doc, spec)
    want = _inputs(spec, _read_rows(data, spec, 32), "ids")
    for name, arr in want.items():
        got = np.concatenate([r[name] for r in rows])
        np.testing.assert_array_equal(got, arr)  # NaNs too (assert_array_equal treats NaN == NaN)
    buckets = np.array([c.buckets for c in spec.cat])
    cat = np.concatenate([r["cat"] for r in rows])
    assert (cat >= 0).all() and (cat < buckets).all()
    assert set(doc["data"][0]) == set(spec.input_signature())  # no optional inputs: none of them is sent


def test_ranking_input_data_repeats_one_user_per_block(spec, data):
    rows, count = 8, 3
    doc = pa.input_data(spec, data, "ranking", rows=rows, count=count)
    assert len(doc["data"]) == rows * count
    reqs = pa.requests_of(doc, spec, rows)
    assert len(reqs) == count and pa.check_input_data(doc, spec, rows) == count
    user_cat = spec.columns("cat", "user")
    item_cat = spec.columns("cat", "item")
    for r in reqs:
        assert r["cat"].shape == (rows, spec.n_cat)
        assert (r["cat"][:, user_cat] == r["cat"][0, user_cat]).all()
        assert len({tuple(x) for x in r["cat"][:, item_cat]}) > 1  # different candidates
        if spec.history is not None and spec.history.side != "item":
            assert (r["hist"] == r["hist"][0]).all()


def test_check_input_data_refuses_an_id_out_of_range(spec, data):
    import base64

    doc = pa.input_data(spec, data, "row", count=2)
    cat = np.frombuffer(base64.b64decode(doc["data"][1]["cat"]["content"]["b64"]), dtype="<i8").copy()
    cat[0] = spec.cat[0].buckets  # one past the last bucket
    doc["data"][1]["cat"]["content"]["b64"] = base64.b64encode(cat.tobytes()).decode()
    with pytest.raises(pa.PerfAnalyzerError, match="request 1"):
        pa.check_input_data(doc, spec, 1)


def test_input_data_refuses_bad_arguments(spec, data):
    with pytest.raises(pa.PerfAnalyzerError, match="kind"):
        pa.input_data(spec, data, "batch")
    with pytest.raises(pa.PerfAnalyzerError, match="rows and count"):
        pa.input_data(spec, data, "ranking", rows=0)
    with pytest.raises(pa.PerfAnalyzerError, match="inputs"):
        pa.decode_input_data({"data": [{"dense": {}}]}, spec)


# ----------------------------------------------------------------------------- finding the binary
def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def no_pa(monkeypatch, tmp_path):
    """No perf_analyzer anywhere: empty PATH (but sh), no $CTREDGE_PERF_ANALYZER, an empty venv folder."""
    monkeypatch.delenv(pa.BINARY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    return tmp_path / "no-venv"


def test_not_installed_says_run_make_perf_tools(no_pa):
    with pytest.raises(pa.PerfAnalyzerMissing) as err:
        pa.find_perf_analyzer(venv=no_pa)
    assert str(err.value).startswith(pa.NOT_INSTALLED)
    assert "perf_analyzer not installed: run make perf-tools" in str(err.value)


def test_bench_section_skips_when_not_installed(no_pa, tmp_path):
    cfg = pa.PaConfig(repository=str(tmp_path), model="ctr", data=str(tmp_path / "x.tsv"), out=str(tmp_path / "o"),
                      perf_venv=str(no_pa))
    got = pa.bench_section(cfg)
    assert got["status"] == "skipped" and got["reason"].startswith(pa.NOT_INSTALLED)
    assert pa.markdown(got).startswith(f"not measured ({pa.NOT_INSTALLED}")


def test_report_shows_the_skip_reason(tmp_path, monkeypatch):
    from ctredge.benchmarks.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    md = write_report({"perf_analyzer": {"status": "skipped", "reason": pa.NOT_INSTALLED}}, tmp_path).read_text()
    assert f"not measured ({pa.NOT_INSTALLED})" in md.split("## perf_analyzer")[1]


def test_ctredge_bench_reports_the_skip_and_goes_on(no_pa, repo, data, tmp_path, monkeypatch):
    from ctredge.benchmarks.bench import BenchConfig, run_bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    results = run_bench(BenchConfig(repository=str(repo), data=str(data), out=str(tmp_path / "report"),
                                    models=("ctr",), sections=("perf_analyzer",), perf_venv=str(no_pa)))
    assert results["perf_analyzer"]["status"] == "skipped"
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"not measured ({pa.NOT_INSTALLED}" in md.split("## perf_analyzer")[1]


def test_cli_writes_the_input_file_and_says_when_not_installed(no_pa, repo, data, tmp_path, capsys):
    out = tmp_path / "row.json"
    assert pa.main(["--repository", str(repo), "--model", "ctr", "--data", str(data),
                    "--write-input-data", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["data"]) == 64 and set(doc["data"][0]) == {"dense", "cat", "hist"}
    assert pa.main(["--check", "--perf-venv", str(no_pa)]) == 3
    assert pa.NOT_INSTALLED in capsys.readouterr().err


def test_a_binary_that_cannot_load_its_libraries_is_not_installed(no_pa, tmp_path):
    bad = _script(tmp_path / "perf_analyzer",
                  "echo 'perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open' >&2\n"
                  "exit 127\n")
    with pytest.raises(pa.PerfAnalyzerMissing, match="apt-get install libb64-0d"):
        pa.find_perf_analyzer(str(bad), venv=no_pa)


def test_a_venv_binary_gets_its_cuda_runtime_on_the_library_path(no_pa, tmp_path):
    venv = tmp_path / "venv"
    libdir = venv / "lib" / "python3.11" / "site-packages" / "nvidia" / "cuda_runtime" / "lib"
    libdir.mkdir(parents=True)
    (libdir / "libcudart.so.12").write_bytes(b"")
    (venv / "bin").mkdir()
    _script(venv / "bin" / "perf_analyzer", 'echo "Perf Analyzer Version 2.41.1 (commit x)"\necho "$LD_LIBRARY_PATH"\n')
    tool = pa.find_perf_analyzer(venv=venv)
    assert tool.version == "2.41.1 (commit x)"
    assert tool.env["LD_LIBRARY_PATH"].split(":")[0] == str(libdir)


# ----------------------------------------------------------------------------- the runner (stand-in binary)
def _fake_tool(tmp_path: Path, body: str) -> pa.PerfAnalyzer:
    exe = _script(tmp_path / "fake_perf_analyzer", body)
    return pa.PerfAnalyzer(binary=str(exe), env=dict(os.environ), version="fake")


FAKE_OK = f"""# writes the CSV to the file after -f, prints the measuring line, burns a little CPU
while [ $# -gt 0 ]; do if [ "$1" = "-f" ]; then out="$2"; fi; shift; done
echo "Request concurrency: 1"
sleep 0.3
i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done
printf '%s' "{CSV}" > "$out"
"""


def test_run_perf_analyzer_parses_its_csv_and_measures_its_cpu(tmp_path):
    tool = _fake_tool(tmp_path, FAKE_OK)
    r = pa.run_perf_analyzer(tool, url="127.0.0.1:1", model="m", input_file=tmp_path / "in.json", concurrency=1,
                             work_dir=tmp_path / "runs", label="one", headers={"triton-grpc-protocol-triton-access-token": "secret"})
    assert r["ok"] and r["error"] == ""
    assert r["rows_per_s"] == pytest.approx(555.371) and r["req_per_s"] == pytest.approx(555.371)
    assert r["p50_ms"] == pytest.approx(0.752)
    assert r["client_cpu_s"] is not None and r["client_cpu_s"] >= 0 and r["client_cores_used"] >= 0
    assert r["measure_wall_s"] is not None and 0 < r["measure_wall_s"] <= r["wall_s"]  # the mark was seen
    assert r["measure_cpu_s"] <= r["client_cpu_s"]
    assert "secret" not in r["command"] and "<token>" in r["command"]  # no token in reports
    assert "--concurrency-range 1:1" in r["command"] and "-i grpc" in r["command"]


def test_run_perf_analyzer_reports_a_failure_with_its_output(tmp_path):
    tool = _fake_tool(tmp_path, "echo 'Failed to obtain stable measurement.'\nexit 2\n")
    r = pa.run_perf_analyzer(tool, url="127.0.0.1:1", model="m", input_file=tmp_path / "in.json", concurrency=4,
                             batch=8, work_dir=tmp_path / "runs")
    assert not r["ok"] and "exit 2" in r["error"] and "stable measurement" in r["error"]
    cell = pa.combine([r])
    assert not cell["ok"] and cell["errors"] == [r["error"]]


def test_restricted_grpc_header_from_a_tritonserver_command_line():
    argv = ["tritonserver", "--grpc-restricted-protocol", "shared-memory,statistics:triton-access-token=abc_-1",
            "--http-restricted-api=statistics:triton-access-token=abc_-1"]
    assert pa.restricted_grpc_header(argv) == ("triton-grpc-protocol-triton-access-token", "abc_-1")
    assert pa.restricted_grpc_header(["tritonserver", "--grpc-restricted-protocol=statistics:k=v"]) == \
        ("triton-grpc-protocol-k", "v")
    assert pa.restricted_grpc_header(["tritonserver", "--model-repository", "/x"]) is None


def test_combine_averages_throughput_and_takes_median_percentiles():
    runs = [{"ok": True, "rows_per_s": 100.0, "req_per_s": 100.0, "client_cores_used": 0.2, "p50_ms": 1.0,
             "p90_ms": 2.0, "p95_ms": 3.0, "p99_ms": 9.0},
            {"ok": True, "rows_per_s": 300.0, "req_per_s": 300.0, "client_cores_used": 0.4, "p50_ms": 3.0,
             "p90_ms": 4.0, "p95_ms": 5.0, "p99_ms": 5.0},
            {"ok": False, "error": "boom"}]
    c = pa.combine(runs)
    assert c["ok"] and c["ok_rounds"] == 2 and c["rounds"] == 3 and c["errors"] == ["boom"]
    assert c["rows_per_s"] == pytest.approx(200.0) and c["p50_ms"] == pytest.approx(2.0)
    assert c["p99_ms"] == pytest.approx(7.0) and c["client_cores_used"] == pytest.approx(0.3)


def test_ratios_and_markdown():
    def row(server, model, kind, c, rows_s, p50, **kw):
        return {"ok": True, "server": server, "model": model, "kind": kind, "concurrency": c, "batch": 1,
                "rows_per_s": rows_s, "req_per_s": rows_s, "p50_ms": p50, "p90_ms": p50, "p99_ms": p50,
                "client_cores_used": 0.5, "rounds": 2, "ok_rounds": 2, "floor": model == pa.FLOOR, **kw}

    results = {"status": "measured", "settings": {"model": "ctr-fp32", "rounds": 2, "ranking_rows": 256},
               "rows": [row("ctredge", "ctr-fp32", "row", 1, 1000, 0.6), row("ctredge", pa.FLOOR, "row", 1, 1500, 0.5),
                        row("pytriton", "ctr", "row", 1, 500, 1.0), row("ctredge", "ctr-fp32", "row", 64, 3000, 20),
                        row("pytriton", "ctr", "row", 64, 1000, 60, client_saturated=True)],
               "tool": {"version": "2.41.1"}, "load_average_before": [1.0, 2.0, 3.0]}
    rat = pa.ratios(results)
    assert rat["b1_p50_vs_floor"] == pytest.approx(1.2)
    assert rat["throughput_vs_pytriton"] == {"row@c1": pytest.approx(2.0), "row@c64": pytest.approx(3.0)}
    results["ratios"] = rat
    md = pa.markdown(results)
    assert "| ctredge | ctr-fp32 | row | 1 | 1 | 1,000 |" in md and "1.20x" in md
    assert "row@c64 3.00x" in md and "(saturated)" in md and "1.00 2.00 3.00" in md


# ----------------------------------------------------------------------------- against ctredge serve
def _infer_with_parameter(url: str, spec, data) -> str:
    """A ModelInfer request carrying perf_analyzer's parameter; the status name ("OK" when answered)."""
    import grpc

    from ctredge.benchmarks.load import build_requests
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest.FromString(build_requests(spec, data, "ctr", "row", count=1)[0])
    req.parameters[pa.PA_PARAMETER].bool_param = True
    with grpc.insecure_channel(url) as ch:
        call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None,
                              response_deserializer=None)
        try:
            call(req.SerializeToString(), timeout=30)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


@pytest.fixture(scope="module")
def shimmed_server(repo, tmp_path_factory):
    from ctredge.benchmarks.procs import ServerProcess

    env = pa.shim_env(tmp_path_factory.mktemp("shim")) if pa.server_refuses_pa_parameter() else None
    with ServerProcess(repo, env=env, label="pa-test") as srv:
        yield srv


def test_the_shim_lets_perf_analyzers_parameter_through(shimmed_server, repo, spec, data):
    from ctredge.benchmarks.procs import ServerProcess

    assert _infer_with_parameter(shimmed_server.url, spec, data) == "OK"
    if pa.server_refuses_pa_parameter():  # without the shim this server refuses it, as the module says
        with ServerProcess(repo, label="pa-test-plain") as plain:
            assert _infer_with_parameter(plain.url, spec, data) == "UNIMPLEMENTED"


def test_real_perf_analyzer_against_ctredge_serve(shimmed_server, spec, data, tmp_path, monkeypatch):
    try:
        tool = pa.find_perf_analyzer(venv=ROOT / pa.PERF_VENV)
    except pa.PerfAnalyzerMissing as exc:
        pytest.skip(str(exc).split(" (")[0])
    doc = pa.input_data(spec, data, "row", count=16)
    path = pa.write_input_data(doc, tmp_path / "row.json")
    r = pa.run_perf_analyzer(tool, url=shimmed_server.url, model="ctr", input_file=path, concurrency=2,
                             measurement_ms=1000, stability=10000, max_trials=3, work_dir=tmp_path / "runs",
                             timeout_s=120)
    assert r["ok"], r["error"]
    assert r["rows_per_s"] > 0 and r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"]
    assert r["client_cpu_s"] > 0
