"""Scoring ONNX models with ONNX Runtime: click probabilities and a session's memory.

:func:`ort_predict` is how ``compress all`` and the accuracy benchmark score a
variant (CPU, ctredge's session settings, batches of 4096 rows);
:func:`session_rss_bytes` measures what a session costs in RAM in a fresh
process, so the figure is the session's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Mapping

import numpy as np

from ctredge.errors import ConfigError, ValidationError
from ctredge.export.validate import cpu_session
from ctredge.features import OUTPUT_CTR


def ort_predict(model_or_session: Any, feeds: Mapping[str, np.ndarray], batch_size: int = 4096) -> np.ndarray:
    """Score feed dicts with ONNX Runtime (CPU, 1 thread, unless a session is given).

    Takes: a ModelProto, path, serialized bytes or an ``InferenceSession``; a feed
    dict (extra keys such as labels are ignored); rows per ``run`` call.
    Returns: fp32 ``[B]`` click probabilities.

    Raises:
        ConfigError: a model input is missing from ``feeds`` or batch sizes differ.
        ValidationError: ONNX Runtime cannot load the model.
    """
    session = model_or_session if hasattr(model_or_session, "run") else cpu_session(
        str(model_or_session) if isinstance(model_or_session, os.PathLike) else model_or_session)
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ConfigError(f"ort_predict: feeds lack input(s) {missing}; the model takes {names}, got {sorted(feeds)}")
    arrays = {n: np.asarray(feeds[n]) for n in names}
    sizes = {n: a.shape[0] for n, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"ort_predict: inputs differ in batch size: {sizes}")
    n = next(iter(sizes.values()))
    out = [session.run([OUTPUT_CTR], {k: a[i:i + batch_size] for k, a in arrays.items()})[0]
           for i in range(0, n, max(1, int(batch_size)))]
    return np.concatenate(out).reshape(-1).astype(np.float32) if out else np.zeros(0, np.float32)


#: run by :func:`session_rss_bytes` in a fresh interpreter of this environment (ctredge is importable there)
_RSS_SCRIPT = r"""
import ctypes, json, sys
import numpy as np
import onnxruntime as ort

from ctredge.onnxrt import ort_session_options

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL("libc.so.6")
path, batch = sys.argv[1], int(sys.argv[2])
opts = ort_session_options()
types = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
         "tensor(float16)": np.float16, "tensor(double)": np.float64}
libc.malloc_trim(0)
before = rss()
sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
feeds = {i.name: np.zeros([d if isinstance(d, int) else batch for d in i.shape], types[i.type])
         for i in sess.get_inputs()}
sess.run(None, feeds)
libc.malloc_trim(0)
print(json.dumps({"before": before, "after": rss()}))
"""


def session_rss_bytes(path: str | os.PathLike[str], batch: int = 64) -> int:
    """RSS growth of a fresh process that opens an ORT CPU session on ``path`` and runs one batch.

    Measured in a subprocess (numpy and onnxruntime already imported before the
    first reading, freed heap returned with ``malloc_trim`` before both), so the
    figure is the session's own memory: weights as ORT holds them (a table that
    ORT constant-folds back to fp32 shows here, not in the file size), prepacked
    kernels, arena for one batch of ``batch`` rows.

    Raises:
        ValidationError: the subprocess fails (the message carries its stderr).
    """
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(int(batch))],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ValidationError(f"measuring the session memory of {path} failed: {proc.stderr.strip()[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(data["after"] - data["before"])


__all__ = ["ort_predict", "session_rss_bytes"]
