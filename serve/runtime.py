"""ONNX Runtime sessions for serving: providers, thread settings, and the per-model ``Runner``.

Providers.  ``"auto"`` asks for the CUDA execution provider when this
onnxruntime build has it, then the CPU.  onnxruntime-gpu falls back to the CPU
*silently* when the CUDA libraries are missing, even when only CUDA is
requested, so the provider in use is read back from ``session.get_providers()``,
logged, and shown by the server; with ``require_gpu`` a model that asked for
CUDA and did not get it fails to load (:class:`GpuRequired`) instead.

Threads.  By default every session runs with 1 intra-op thread, 1 inter-op
thread and spinning off (``session.intra_op.allow_spinning=0``): on a small
machine shared with other processes, spinning thread pools fight them for the
cores (DESIGN.md has the measurement).  Parallelism comes from running several requests at once on
the server's executor threads, each Run on one core.

``Runner.run(feeds)`` runs a version's session in the calling thread and
returns ``{output: array}``; ONNX Runtime releases the GIL while it runs.  On
CUDA it uses IO binding (inputs copied once to the device, outputs bound to
host memory).  Where a run happens (the event-loop thread or a worker thread),
when, with which batch-mates, and what is counted is the
:class:`~ctredge.serve.batcher.Scheduler`'s business: it is the one seam
between requests and sessions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ctredge.onnxrt import CPU, CUDA, GPU_PROVIDERS, PROVIDER_ALIASES, ort_session_options
from ctredge.serve.errors import GpuRequired, InvalidInput, LoadError, ServeError

log = logging.getLogger("ctredge.serve")


def available_providers() -> list[str]:
    """Execution providers compiled into the installed onnxruntime."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def canonical_provider(name: str) -> str:
    """``cuda`` -> ``CUDAExecutionProvider`` (full names and ``auto`` pass through)."""
    return PROVIDER_ALIASES.get(name.lower(), name) if name != "auto" else name


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """The provider list to ask ONNX Runtime for.

    Takes the configured names (``["auto"]``, or names such as ``cuda``, ``cpu``,
    ``CUDAExecutionProvider``) and the providers this onnxruntime has.  ``auto``
    is CUDA then CPU when CUDA is available, else CPU.  Providers this build lacks
    are dropped (logged); the CPU is always last, as the fallback.
    """
    names = [canonical_provider(p) for p in requested]
    if names == ["auto"]:
        names = [CUDA, CPU] if CUDA in available else [CPU]
    out = []
    for p in names:
        if p in available and p not in out:
            out.append(p)
        elif p not in available:
            log.warning("execution provider %s is not in this onnxruntime build (it has %s); skipping it",
                        p, list(available))
    if CPU not in out:
        out.append(CPU)
    return out


def create_session(path: str, *, providers: Sequence[str] = ("auto",), intra_op_threads: int = 1,
                   inter_op_threads: int = 1, allow_spinning: bool = False, require_gpu: bool = False,
                   label: str = "") -> tuple[Any, str]:
    """Open an ONNX Runtime session and report the provider it really uses.

    Returns ``(session, provider)`` where ``provider`` is ``session.get_providers()[0]``.

    Raises:
        GpuRequired: ``require_gpu`` and a GPU provider was wanted but is not in use
            (not in this build, or its libraries failed to load).
        LoadError: ONNX Runtime cannot load the file (the reason is its message).
    """
    import onnxruntime as ort

    available = available_providers()
    wanted = resolve_providers(providers, available)
    asked_gpu = any(canonical_provider(p) in GPU_PROVIDERS or p == "auto" for p in providers)
    if require_gpu and asked_gpu and not any(p in GPU_PROVIDERS for p in wanted):
        raise GpuRequired(f"{label}: --require-gpu, but this onnxruntime has no CUDA provider (available: "
                          f"{available}); install onnxruntime-gpu (pip install -e '.[gpu,serve]')")
    opts = ort_session_options(intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                               allow_spinning=allow_spinning)
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LoadError(f"{label}: ONNX Runtime cannot load {path}: {exc}",
                        "ONNX Runtime cannot load its model file") from exc
    in_use = list(session.get_providers())
    provider = in_use[0] if in_use else CPU
    if wanted[0] in GPU_PROVIDERS and provider not in GPU_PROVIDERS:
        msg = (f"{label}: {wanted[0]} was requested but ONNX Runtime runs the model on {provider} "
               f"(CUDA/cuDNN libraries missing or incompatible?)")
        if require_gpu:
            raise GpuRequired(msg + "; failing because of --require-gpu")
        log.warning("%s; serving on the CPU", msg)
    elif asked_gpu and provider == CPU and CUDA not in available:
        log.info("%s: no CUDA provider in this onnxruntime build; falling back to the CPU", label)
    log.info("%s: running on %s (session providers %s; intra-op threads %d, spinning %s)",
             label, provider, in_use, intra_op_threads, "on" if allow_spinning else "off")
    return session, provider


@dataclass
class Runner:
    """One model version's ONNX Runtime session: ``run(feeds)`` in the calling thread.

    ``io_binding``: None picks it for GPU providers; True forces it (tests on CPU).
    """

    session: Any
    name: str = "model"
    version: int = 1
    provider: str = CPU
    io_binding: bool | None = None

    def __post_init__(self) -> None:
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.io_binding is None:
            self.io_binding = self.provider in GPU_PROVIDERS

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session in the calling thread; returns ``{output name: array}``.

        Raises:
            InvalidInput: ONNX Runtime rejects the inputs (its InvalidArgument).
            ServeError: any other ONNX Runtime failure (answered INTERNAL).
        """
        try:
            if self.io_binding and not any(v.dtype == object for v in feeds.values()):
                return self._run_bound(feeds)
            outs = self.session.run(self.output_names, dict(feeds))
        except Exception as exc:
            kind = type(exc).__name__
            if kind == "InvalidArgument":
                raise InvalidInput(f"ONNX Runtime rejected the inputs: {exc}") from exc
            raise ServeError(f"ONNX Runtime failed on {self.name} v{self.version}: {kind}: {exc}") from exc
        return dict(zip(self.output_names, outs))

    def _run_bound(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
