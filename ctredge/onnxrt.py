"""ONNX Runtime settings every stage shares: provider names and the one ``SessionOptions`` factory.

Export validation, quantization, benchmarks and the server all open sessions
through :func:`ort_session_options`, so a figure measured in-process is measured
with the settings the server uses: 1 intra-op thread, 1 inter-op thread,
spinning off (a spinning pool fights other processes for a small machine's
cores; DESIGN.md), sequential execution, warnings and errors only.

onnxruntime is imported inside the functions: the hub itself needs only numpy.
"""

from __future__ import annotations

from typing import Any

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA, TENSORRT)
PROVIDER_ALIASES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT, "trt": TENSORRT}


def ort_session_options(*, intra_op_threads: int = 1, inter_op_threads: int = 1,
                        allow_spinning: bool = False, log_severity: int = 3) -> Any:
    """An ``onnxruntime.SessionOptions`` with ctredge's settings.

    Takes thread counts (0 lets ONNX Runtime decide), whether idle threads spin,
    and the log severity (3 = errors only).  Returns the options object.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = int(inter_op_threads)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    spin = "1" if allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.log_severity_level = int(log_severity)
    return opts
