"""Client-side pieces of the hostile harness: the attack context, outcomes, requests and calls.

:class:`Ctx` is what an attack of :mod:`ctredge.benchmarks.hostile_attacks`
gets (address, pid, model, spec, metrics URL); :class:`Outcome` what it
returns.  Requests are built from the model's
:class:`~ctredge.features.FeatureSpec`: ids 0 are always valid (0 =
empty/padding), so zeros of the contract shapes make an ordinary request.
Every call has a timeout; channels have no client-side message limit (the
server's limit is what is tested).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ctredge.features import FeatureSpec
from ctredge.serve.codec import build_request

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
MESSAGE_CHARS = 200
CALL_TIMEOUT = 60.0


@dataclass
class Ctx:
    """What an attack may use: the server's address, pid and metrics URL, the model and its spec."""

    url: str
    pid: int
    model: str
    spec: FeatureSpec
    metrics_url: str | None
    max_message_bytes: int
    quick: bool = False
    grace_seconds: float = 5.0
    _channel: Any = None

    def channel(self) -> grpc.Channel:
        """One plaintext channel (no message limits on the client side) shared by the sync calls."""
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.url, options=CHANNEL_OPTIONS)
        return self._channel

    def stub(self) -> Any:
        """The ``GRPCInferenceService`` stub on :meth:`channel`."""
        return service_pb2_grpc.GRPCInferenceServiceStub(self.channel())

    def n(self, full: int, quick: int) -> int:
        """``full`` calls, or ``quick`` with ``--quick``."""
        return quick if self.quick else full

    def close(self) -> None:
        """Close the shared channel (a later :meth:`channel` opens a new one)."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None


@dataclass
class Outcome:
    """The statuses an attack's calls got (``codes``: name -> count), the first error message, extra figures."""

    codes: collections.Counter = field(default_factory=collections.Counter)
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    window: tuple[float, float] | None = None  # time.monotonic() span of the hostile calls, when narrower

    @contextlib.contextmanager
    def timed(self) -> Any:
        """Mark the hostile calls (not the checks before and after) as the attack's time window."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.window = (t0, time.monotonic())

    def add(self, code: str, message: str = "") -> None:
        """Count one call's status; keep the first non-OK message (truncated)."""
        self.codes[code] += 1
        if code != "OK" and not self.message and message:
            self.message = message[:MESSAGE_CHARS]


# ----------------------------------------------------------------------------- requests
def zeros_inputs(spec: FeatureSpec, rows: int) -> dict[str, np.ndarray]:
    """The contract tensors, all zeros (NaN-free, id 0 = empty): an ordinary request of ``rows`` rows."""
    return {name: np.zeros((rows, *shape[1:]), dtype=dt) for name, (dt, shape) in spec.input_signature().items()}


def ordinary_request(spec: FeatureSpec, model: str, rows: int = 1) -> bytes:
    """A serialized ``ModelInferRequest`` of ``rows`` zero rows for ``model``."""
    return build_request(model, zeros_inputs(spec, rows)).SerializeToString()


def rows_for_bytes(spec: FeatureSpec, nbytes: int) -> int:
    """Rows of zeros whose contract tensors weigh about ``nbytes``."""
    per_row = sum(np.dtype(dt).itemsize * int(np.prod(shape[1:], dtype=np.int64))
                  for dt, shape in spec.input_signature().values())
    return max(1, nbytes // per_row)


def rpc_error(exc: grpc.RpcError) -> tuple[str, str]:
    """``(status code name, details)`` of a failed call."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return getattr(code, "name", str(code)), (details or "")


def call_raw(ctx: Ctx, payload: bytes, method: str = MODEL_INFER, timeout: float = CALL_TIMEOUT,
             compression: Any = None) -> tuple[str, str, bytes | None]:
    """One unary call with an already serialized message: ``(code, message, response bytes or None)``."""
    call = ctx.channel().unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        return "OK", "", call(payload, timeout=timeout, compression=compression)
    except grpc.RpcError as exc:
        return (*rpc_error(exc), None)


def call_stub(out: Outcome, fn: Callable[..., Any], request: Any, timeout: float = CALL_TIMEOUT) -> Any:
    """Call a stub method, count its status in ``out``; returns the response or None."""
    try:
        response = fn(request, timeout=timeout)
    except grpc.RpcError as exc:
        out.add(*rpc_error(exc))
        return None
    out.add("OK")
    return response


def burst(ctx: Ctx, payloads: Sequence[bytes], *, timeout: float = CALL_TIMEOUT, concurrency: int | None = None,
          compression: Any = None, during: Callable[[], None] | None = None, during_after_s: float = 0.0,
          method: str = MODEL_INFER) -> list[tuple[str, str]]:
    """Send ``payloads`` from one ``grpc.aio`` channel, all in flight at once (or ``concurrency`` at a time).

    ``during``, when given, is called once the first call has been answered or
    ``during_after_s`` seconds after the calls were started, whichever comes
    first (SIGTERM with requests in flight).  Returns each call's ``(code,
    message)`` in order.
    """

    async def main() -> list[tuple[str, str]]:
        async with grpc.aio.insecure_channel(ctx.url, options=CHANNEL_OPTIONS, compression=compression) as ch:
            call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            gate = asyncio.Semaphore(concurrency or len(payloads) or 1)
            first = asyncio.Event()

            async def one(p: bytes) -> tuple[str, str]:
                async with gate:
                    try:
                        await call(p, timeout=timeout)
                        return "OK", ""
                    except grpc.RpcError as exc:
                        return rpc_error(exc)
                    finally:
                        first.set()

            tasks = [asyncio.ensure_future(one(p)) for p in payloads]
            if during is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(first.wait(), during_after_s)
                during()
            return list(await asyncio.gather(*tasks))

    return asyncio.run(main())


def add_all(out: Outcome, results: Sequence[tuple[str, str]]) -> Outcome:
    """Count every ``(code, message)`` of :func:`burst` in ``out``."""
    for code, message in results:
        out.add(code, message)
    return out


def model_stats(ctx: Ctx) -> tuple[int, int] | None:
    """The model's ModelStatistics (success count, fail count) summed over its versions, or None."""
    try:
        resp = ctx.stub().ModelStatistics(pb.ModelStatisticsRequest(name=ctx.model), timeout=30)
    except grpc.RpcError:
        return None
    return (sum(m.inference_stats.success.count for m in resp.model_stats),
            sum(m.inference_stats.fail.count for m in resp.model_stats))


def index_names(ctx: Ctx, ready: bool = False) -> list[str] | None:
    """The model names of RepositoryIndex (only the ready ones with ``ready``), or None when the call fails."""
    try:
        return [m.name for m in ctx.stub().RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), timeout=30).models]
    except grpc.RpcError:
        return None


def model_ready(ctx: Ctx, name: str) -> bool | None:
    """ModelReady of ``name``, or None when the call fails."""
    try:
        return ctx.stub().ModelReady(pb.ModelReadyRequest(name=name), timeout=30).ready
    except grpc.RpcError:
        return None


def scrape(url: str, timeout: float = 60.0) -> tuple[int, float]:
    """GET the metrics endpoint: ``(bytes, seconds)``."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        size = len(resp.read())
    return size, time.perf_counter() - t0


def max_batch(ctx: Ctx) -> int | None:
    """``max_batch_size`` in the model's ModelConfig, or None when the call fails."""
    try:
        return ctx.stub().ModelConfig(pb.ModelConfigRequest(name=ctx.model), timeout=30).config.max_batch_size
    except grpc.RpcError:
        return None
