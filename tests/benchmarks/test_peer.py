"""The PyTriton peer: pure helpers always; the real peer only with CTREDGE_TEST_PEER=1.

The real test builds (or reuses) the peer's virtual environment -- about 440 MB
from PyPI on first use -- so CI does not run it: set ``CTREDGE_TEST_PEER=1``
(and optionally ``CTREDGE_PEER_VENV``, default ``<repo>/.venv-pytriton``).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))  # servekit's hand-built models

from servekit import contract_feeds, ctr_model, save, small_spec  # noqa: E402

from ctredge.benchmarks import peer_pytriton as peer  # noqa: E402
from ctredge.benchmarks import pytriton_app as app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUN_PEER = os.environ.get("CTREDGE_TEST_PEER") == "1"
Arg = namedtuple("Arg", "name type shape")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save(ctr_model(small_spec(), seed=3), tmp_path_factory.mktemp("peer") / "model.onnx")


@pytest.fixture(scope="module")
def session(model_path):
    return app.open_session(str(model_path))


# --------------------------------------------------------------------------- the app's binding table


def test_input_bindings_follow_the_onnx_model(session):
    spec = small_spec()
    assert app.input_bindings(session) == [("dense", np.float32, (spec.n_dense,)),
                                           ("cat", np.int64, (spec.n_cat,)),
                                           ("hist", np.int64, (spec.hist_len,))]
    assert app.output_bindings(session, ["ctr"]) == [("ctr", np.float32, (1,))]


def test_binding_table_maps_dims_and_rejects_what_triton_cannot_batch():
    rows = app.binding_table([Arg("x", "tensor(float)", [None, "n", 3]), Arg("s", "tensor(string)", ["B"])])
    assert rows == [("x", np.float32, (-1, 3)), ("s", np.bytes_, ())]
    with pytest.raises(app.AppError, match="dynamic batch dimension first, got shape \\[2, 3\\]"):
        app.binding_table([Arg("x", "tensor(float)", [2, 3])])
    with pytest.raises(app.AppError, match="scalar"):
        app.binding_table([Arg("x", "tensor(float)", [])])
    with pytest.raises(app.AppError, match="tensor\\(complex64\\) is not supported"):
        app.binding_table([Arg("x", "tensor(complex64)", ["B"])])


def test_output_bindings_name_missing_outputs(session):
    with pytest.raises(app.AppError, match="\\['prob'\\] not in the model \\(it has \\['ctr'\\]\\)"):
        app.output_bindings(session, ["prob"])


def test_infer_callable_is_one_session_run(session):
    feeds = contract_feeds(small_spec(), 7, seed=4)
    got = app.make_infer(session, ["ctr"])(**feeds)
    np.testing.assert_array_equal(got["ctr"], session.run(["ctr"], feeds)[0])
    assert got["ctr"].shape == (7, 1)


def test_session_uses_serving_settings():
    opts = app.session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_app_imports_only_numpy_onnxruntime_pytriton_and_the_stdlib():
    tree = ast.parse(Path(app.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    outside = names - set(sys.stdlib_module_names) - {"numpy", "onnxruntime", "pytriton", "__future__"}
    assert not outside, f"pytriton_app runs in the peer venv and cannot import {outside}"


# --------------------------------------------------------------------------- environment and libpython


def test_libdir_from_config():
    shared = {"LIBDIR": "/opt/py/lib", "INSTSONAME": "libpython3.11.so.1.0", "LDLIBRARY": "libpython3.11.so",
              "Py_ENABLE_SHARED": 1}
    assert peer.libdir_from_config(shared) == Path("/opt/py/lib")
    assert peer.libdir_from_config({**shared, "Py_ENABLE_SHARED": 0}) is None
    assert peer.libdir_from_config({**shared, "INSTSONAME": "libpython3.11.a", "LDLIBRARY": "libpython3.11.a"}) is None
    assert peer.libdir_from_config({**shared, "LIBDIR": None}) is None


def test_python_libdir_of_this_interpreter():
    got = peer.python_libdir(Path(sys.executable))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert got == Path(sysconfig.get_config_var("LIBDIR"))
        assert (got / sysconfig.get_config_var("INSTSONAME")).exists()
    else:
        assert got is None


def test_child_env_puts_libdir_first_once_and_scrubs_other_environments(tmp_path):
    base = {"LD_LIBRARY_PATH": "/a:/opt/py/lib:/b", "PYTHONPATH": "/numpy2", "VIRTUAL_ENV": "/main", "HOME": "/h"}
    env = peer.child_env(base, Path("/opt/py/lib"), tmp_path)
    assert env["LD_LIBRARY_PATH"] == "/opt/py/lib:/a:/b"
    assert "PYTHONPATH" not in env and "VIRTUAL_ENV" not in env
    assert env["HOME"] == "/h" and env["TMPDIR"] == str(tmp_path)
    assert peer.child_env({}, Path("/x"))["LD_LIBRARY_PATH"] == "/x"
    assert "LD_LIBRARY_PATH" not in peer.child_env({}, None)


def test_cpu_list_and_free_ports():
    assert peer.cpu_list([0, 1]) == "0,1" and peer.cpu_list("1") == "1"
    assert peer.cpu_list(None) is None and peer.cpu_list([]) is None
    ports = peer.free_ports(3)
    assert len(set(ports)) == 3 and all(p > 0 for p in ports)


# --------------------------------------------------------------------------- the venv's stamp


def _fake_venv(path: Path, stamp: dict | None) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "pyvenv.cfg").write_text("home = /nowhere\n")
    (path / "bin" / "python").symlink_to(sys.executable)
    if stamp is not None:
        (path / peer.STAMP).write_text(json.dumps(stamp))
    return path


def test_ensure_venv_reuses_a_stamped_venv_without_pip(tmp_path, monkeypatch):
    base = peer.base_python()
    venv = _fake_venv(tmp_path / "v", {**peer._stamp_wanted(peer.PINS, base), "versions": {}})
    monkeypatch.setattr(peer, "_run_logged", lambda *a, **k: pytest.fail(f"pip/venv ran: {a}"))
    assert peer.ensure_venv(venv) == venv.absolute() / "bin" / "python"


def test_ensure_venv_rebuilds_a_stale_venv_with_the_base_interpreter(tmp_path, monkeypatch):
    venv = _fake_venv(tmp_path / "v", {**peer._stamp_wanted(["nvidia-pytriton==0.6.0"], peer.base_python())})
    calls = []

    def fake_run(cmd, what, **kw):
        calls.append(list(cmd))
        raise peer.PeerError(f"{what} failed (stopped by the test)")

    monkeypatch.setattr(peer, "_run_logged", fake_run)
    with pytest.raises(peer.PeerError, match="creating the venv"):
        peer.ensure_venv(venv)
    assert calls == [[str(peer.base_python()), "-m", "venv", str(venv.absolute())]]
    assert not (venv / peer.STAMP).exists()


def test_ensure_venv_refuses_a_folder_that_is_not_a_venv(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    with pytest.raises(peer.PeerError, match="is not a virtual environment"):
        peer.ensure_venv(tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").exists()


def test_pip_failure_is_a_peer_error_with_the_output_tail(tmp_path):
    script = "import sys; print('ERROR: No matching distribution found for nvidia-pytriton'); sys.exit(1)"
    with pytest.raises(peer.PeerError, match="(?s)pip install.*exit 1.*No matching distribution"):
        peer._run_logged([sys.executable, "-c", script], "pip install of the peer's packages")


# --------------------------------------------------------------------------- process tree and start failure


def test_process_tree_and_memory_cover_children():
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.time() + 10
        while len(peer.process_tree(proc.pid)) < 3 and time.time() < deadline:
            time.sleep(0.05)
        tree = peer.process_tree(proc.pid)
        assert tree[0] == proc.pid and len(tree) == 3
        mem = peer.tree_memory(proc.pid)
        assert mem["processes"] == 3 and mem["rss_bytes"] > 0 and 0 < mem["pss_bytes"] <= mem["rss_bytes"]
        assert peer.tree_memory(os.getpid())["rss_bytes"] > mem["rss_bytes"] / 3  # pytest itself counts
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert peer.process_tree(proc.pid) == []


def test_peer_that_cannot_start_says_why(model_path):
    """ctredge's own Python has no pytriton: the app exits and the error carries its log."""
    server = peer.PeerServer(model_path, python=sys.executable, start_timeout_s=60)
    with pytest.raises(peer.PeerError, match="(?s)exited with code 1 before it was ready.*pytriton"):
        server.start()
    assert server.proc is None and server.log_path is None  # stopped and its folder removed


# --------------------------------------------------------------------------- the real peer (opt-in)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_PEER, reason="set CTREDGE_TEST_PEER=1 to build the PyTriton venv (~440 MB) and run it")
def test_pytriton_peer_answers_like_onnx_runtime(model_path, session):
    import tritonclient.grpc as tc

    venv = Path(os.environ.get("CTREDGE_PEER_VENV", ROOT / ".venv-pytriton"))
    python = peer.ensure_venv(venv)
    feeds = contract_feeds(small_spec(), 9, seed=5)
    expected = session.run(["ctr"], feeds)[0]
    cpu = sorted(os.sched_getaffinity(0))[-1]
    with peer.PeerServer(model_path, python=python, max_batch_size=64, queue_delay_us=200, cpus=[cpu]) as server:
        client = tc.InferenceServerClient(server.url)
        assert client.is_server_ready() and client.is_model_ready(server.model_name)
        config = client.get_model_config(server.model_name).config
        assert config.max_batch_size == 64 and config.dynamic_batching.max_queue_delay_microseconds == 200
        assert [i.name for i in config.input] == ["dense", "cat", "hist"]
        inputs = []
        for name, arr in feeds.items():
            tensor = tc.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
            tensor.set_data_from_numpy(arr)
            inputs.append(tensor)
        got = client.infer(server.model_name, inputs, outputs=[tc.InferRequestedOutput("ctr")]).as_numpy("ctr")
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        with pytest.raises(Exception, match="dense"):  # a wrong width is refused by Triton, naming the input
            bad = tc.InferInput("dense", [9, 99], "FP32")
            bad.set_data_from_numpy(np.zeros((9, 99), np.float32))
            client.infer(server.model_name, [bad, *inputs[1:]])
        mem = server.memory()
        assert mem["processes"] >= 3  # the app, tritonserver, the Python backend stub
        assert mem["rss_bytes"] >= mem["pss_bytes"] > 0 and server.rss_bytes() > 0
        for pid in peer.process_tree(server.pid):  # taskset's pinning reaches tritonserver and the stub
            assert os.sched_getaffinity(pid) == {cpu}
        settings = server.settings()
        assert settings["cpus"] == str(cpu) and settings["versions"]["nvidia-pytriton"] == "0.7.0"
        assert settings["ld_library_path"] == str(peer.python_libdir(python))
        folder = server.log_path.parent
        client.close()
    assert server.proc is None and not folder.exists()
