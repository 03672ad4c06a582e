"""``ctredge predict`` against an in-process server; ``ctredge serve`` as a process (port 0, Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from servekit import ctr_model, plain_model, save

from ctredge.cli import main
from ctredge.features import FeatureSpec
from ctredge.reader import read_all, sidecar_path
from ctredge.serve.client import Client, predict_file
from ctredge.serve.server import ServerThread

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    from ctredge.datagen import generate

    root = tmp_path_factory.mktemp("cli")
    data = root / "clicks.tsv"
    generate(str(data), rows=300, seed=5, history=True)
    spec = FeatureSpec.load(sidecar_path(data, "spec"))
    repo = root / "repo"
    save(ctr_model(spec, seed=4), repo / "shop" / "1" / "model.onnx")
    save(plain_model(), repo / "plain" / "1" / "model.onnx")
    return data, spec, repo


def test_predict_prints_probabilities_equal_to_in_process_ort(clicks, capsys):
    import onnxruntime as ort

    data, spec, repo = clicks
    with ServerThread(repo) as server:
        assert main(["predict", "--url", server.url, "--model", "shop", "--data", str(data), "--limit", "150",
                     "--batch-size", "64"]) == 0
        printed = capsys.readouterr().out.split()
        session = ort.InferenceSession(str(repo / "shop" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        want = session.run(["ctr"], read_all(data, spec, limit=150).feeds)[0].reshape(-1)
        assert len(printed) == 150
        np.testing.assert_allclose(np.array(printed, dtype=np.float64), want, atol=1e-6)
        with Client(server.url) as client:  # the same through the library, exact
            got = np.concatenate([p for _, p in predict_file(client, "shop", data, limit=150, batch_size=64)])
        np.testing.assert_array_equal(got, want)
        # a plain ONNX model has no FeatureSpec to read the click log with
        assert main(["predict", "--url", server.url, "--model", "plain", "--data", str(data), "--limit", "3"]) == 2
        assert "carries no ctredge FeatureSpec: pass --spec" in capsys.readouterr().err
        assert main(["predict", "--url", server.url, "--model", "nope", "--data", str(data)]) == 2
        assert "NOT_FOUND" in capsys.readouterr().err


def test_serve_require_gpu_fails_loudly_on_this_cpu_machine(clicks, capsys):
    _, _, repo = clicks
    assert main(["serve", "--repository", str(repo), "--port", "0", "--require-gpu"]) == 2
    assert "--require-gpu, but this onnxruntime has no CUDA provider" in capsys.readouterr().err


def test_serve_process_port_zero_and_ctrl_c(clicks):
    _, _, repo = clicks
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ctredge.cli", "serve", "--repository", str(repo), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {repo} on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" on ")[1].strip()
        with Client(url, timeout=10) as client:
            assert client.ready() and client.model_ready("shop")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "shop v1: running on CPUExecutionProvider" in err and "stopped" in err
