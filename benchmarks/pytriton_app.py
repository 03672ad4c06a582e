"""The PyTriton peer: one ONNX model behind Triton's C++ gRPC frontend and dynamic batcher.

This file runs *inside the peer's own virtual environment* (``.venv-pytriton``,
made by :func:`ctredge.benchmarks.peer_pytriton.ensure_venv`: nvidia-pytriton
0.7 needs numpy < 2).  It may import only the standard library, numpy,
onnxruntime and pytriton -- never ``ctredge`` -- and pytriton only inside
:func:`serve`, so the main environment can import the pure helpers
(:func:`input_bindings`) for its tests.

``python pytriton_app.py --model model.onnx --grpc-port P --http-port H --metrics-port M``

What it serves.  The model's inputs are read from the ONNX Runtime session
(names, dtypes, shapes); the first dimension must be the batch dimension and
is left to Triton (``max_batch_size`` > 0 adds it), the others are bound as
they are (a symbolic one as -1).  For a ctredge model these are the contract
tensors ``dense`` FP32 [B, n_dense], ``cat`` INT64 [B, n_cat] and ``hist``
INT64 [B, L]: PyTriton does not hash raw strings (``cat_raw``) or broadcast a
ranking request's user side over its candidates, so a client sends it the
hashed, expanded ids.  The output is ``ctr`` FP32 [B, 1] (bound as ``(1,)``).

How it runs.  Triton's dynamic batcher (``--max-batch-size`` rows,
``--queue-delay-us``) merges requests; PyTriton's Python backend stub hands the
batch to this process, where a ``@batch`` callable runs one ONNX Runtime CPU
session per instance with ctredge's serving settings: 1 intra-op thread,
1 inter-op thread, sequential execution, spinning off.  ``--instances`` binds
that many callables (Triton model instances), each with its own session.

When the model is loaded it prints one line ``pytriton ready grpc=P http=H
metrics=M model=NAME`` on stdout, then serves until SIGTERM or SIGINT, when it
stops Triton (which also removes its temporary workspace) and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Sequence

import numpy as np

# ONNX Runtime's type strings -> numpy dtypes (what PyTriton's Tensor takes).
ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.bytes_,
}
READY_PREFIX = "pytriton ready"


class AppError(Exception):
    """The model cannot be served as asked (the message says what was expected and what came)."""


def session_options(intra_op_threads: int = 1) -> Any:
    """ctredge's ``SessionOptions``, a copy of :func:`ctredge.onnxrt.ort_session_options`'s defaults.

    This app runs in PyTriton's own virtual environment, where ctredge is not
    installed, so it cannot import the factory; keep the two in step.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def open_session(model: str, intra_op_threads: int = 1) -> Any:
    """A CPU ``InferenceSession`` on ``model`` with :func:`session_options`."""
    import onnxruntime as ort

    return ort.InferenceSession(model, sess_options=session_options(intra_op_threads),
                                providers=["CPUExecutionProvider"])


def binding_table(args: Sequence[Any]) -> list[tuple[str, Any, tuple[int, ...]]]:
    """``(name, numpy dtype, shape without the batch dim)`` for ONNX Runtime ``NodeArg``s.

    Takes ``session.get_inputs()`` or ``get_outputs()``.  A dimension that is a
    name or None becomes -1.  Raises :class:`AppError` when a tensor has no
    dimensions, a fixed first dimension (Triton needs the batch dimension free)
    or a type this table does not know.
    """
    table = []
    for a in args:
        dtype = ORT_DTYPES.get(a.type)
        if dtype is None:
            raise AppError(f"tensor {a.name!r}: type {a.type} is not supported (expected one of {sorted(ORT_DTYPES)})")
        shape = list(a.shape or [])
        if not shape:
            raise AppError(f"tensor {a.name!r}: expected a batch dimension first, got a scalar")
        if isinstance(shape[0], int) and shape[0] > 0:
            raise AppError(f"tensor {a.name!r}: expected a dynamic batch dimension first, got shape {shape} "
                           f"(Triton's dynamic batcher needs the first dimension free)")
        rest = tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape[1:])
        table.append((a.name, dtype, rest))
    return table


def input_bindings(session: Any) -> list[tuple[str, Any, tuple[int, ...]]]:
    """:func:`binding_table` of the session's inputs, in the model's order."""
    return binding_table(session.get_inputs())


def output_bindings(session: Any, names: Sequence[str] | None = None) -> list[tuple[str, Any, tuple[int, ...]]]:
    """:func:`binding_table` of the session's outputs (only ``names`` when given; each must exist)."""
    table = binding_table(session.get_outputs())
    if names is None:
        return table
    have = {row[0]: row for row in table}
    missing = [n for n in names if n not in have]
    if missing:
        raise AppError(f"output(s) {missing} not in the model (it has {sorted(have)})")
    return [have[n] for n in names]


def make_infer(session: Any, output_names: Sequence[str]):
    """The plain callable ``infer(**inputs) -> {output: array}`` that ``@batch`` wraps: one ``session.run``."""
    names = list(output_names)
    input_names = [i.name for i in session.get_inputs()]

    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {n: inputs[n] for n in input_names}
        return dict(zip(names, session.run(names, feeds)))

    return infer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve one ONNX model through PyTriton (Triton + ONNX Runtime CPU).")
    p.add_argument("--model", required=True, help="path of model.onnx")
    p.add_argument("--name", default="ctr", help="model name in Triton (default ctr)")
    p.add_argument("--outputs", default="ctr", help="comma-separated outputs to serve (default ctr)")
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--address", default="127.0.0.1", help="address the endpoints bind to (default 127.0.0.1)")
    p.add_argument("--max-batch-size", type=int, default=4096, help="Triton max_batch_size (rows, default 4096)")
    p.add_argument("--queue-delay-us", type=int, default=500,
                   help="dynamic batcher max_queue_delay_microseconds (default 500, as ctredge's batcher)")
    p.add_argument("--no-batching", action="store_true",
                   help="no dynamic batcher (requests still carry a batch dimension; each is run alone)")
    p.add_argument("--instances", type=int, default=1, help="model instances, one ORT session each (default 1)")
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--workspace", default=None,
                   help="folder for PyTriton's workspace (must not exist; default: one under ~/.cache/pytriton)")
    p.add_argument("--verbose", type=int, default=0, help="Triton log_verbose level (default 0)")
    return p.parse_args(argv)


def serve(args: argparse.Namespace) -> int:
    """Bind the model, start Triton, print the ready line, block until SIGTERM/SIGINT, stop."""
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    if args.instances < 1 or args.max_batch_size < 1 or args.queue_delay_us < 0:
        raise AppError(f"expected --instances >= 1, --max-batch-size >= 1, --queue-delay-us >= 0; got "
                       f"{args.instances}, {args.max_batch_size}, {args.queue_delay_us}")
    sessions = [open_session(args.model, args.intra_op_threads) for _ in range(args.instances)]
    inputs = input_bindings(sessions[0])
    outputs = output_bindings(sessions[0], [n for n in args.outputs.split(",") if n])
    out_names = [o[0] for o in outputs]
    funcs = [batch(make_infer(s, out_names)) for s in sessions]

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                          grpc_address=args.address, http_address=args.address, metrics_address=args.address,
                          log_verbose=args.verbose, allow_gpu_metrics=False)
    # Batching off keeps the batch dimension (max_batch_size > 0) and drops the dynamic batcher: each request
    # is one Run, as in ctredge with dynamic_batching disabled.  (PyTriton's batching=False would remove the
    # batch dimension from the model's shapes.)
    batcher = None if args.no_batching else DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us)
    model_config = ModelConfig(batching=True, max_batch_size=args.max_batch_size, batcher=batcher)
    triton = Triton(config=config, workspace=args.workspace)
    try:
        triton.bind(
            model_name=args.name,
            infer_func=funcs if len(funcs) > 1 else funcs[0],
            inputs=[Tensor(name=n, dtype=dt, shape=shape) for n, dt, shape in inputs],
            outputs=[Tensor(name=n, dtype=dt, shape=shape) for n, dt, shape in outputs],
            config=model_config,
            strict=False,
        )
        triton.run()
        print(f"{READY_PREFIX} grpc={args.grpc_port} http={args.http_port} metrics={args.metrics_port} "
              f"model={args.name} inputs={','.join(n for n, _, _ in inputs)}", flush=True)
        while not stop.wait(1.0):
            if not triton.is_alive():
                print("pytriton: Triton or the model's proxy stopped", file=sys.stderr, flush=True)
                return 1
        return 0
    finally:
        triton.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return serve(args)
    except AppError as e:
        print(f"pytriton_app: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
