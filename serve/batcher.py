"""Scheduling of one model version's inferences: dynamic batching, a bounded queue, deadlines, row alignment.

A :class:`Scheduler` stands between the servicer and a :class:`~ctredge.serve.runtime.Runner`.
``await scheduler.predict(feeds, deadline)`` returns ``(outputs, Timing)``.

Batching off (``dynamic_batching.enabled: false``): every request is one ONNX
Runtime run: on the event-loop thread when it has at most ``inline_max_rows``
rows, else on an executor thread.

Batching on: while requests come slower than runs take (moving averages),
nothing waits or runs and ``max_queue_delay_us`` is 0, a small request runs at once as above: there is no
batch to form, and the queue path costs extra event-loop turns.
Otherwise requests join a FIFO queue of at most ``max_queue_size`` requests
(beyond: RESOURCE_EXHAUSTED, so memory stays bounded).  A dispatcher takes
whole requests from the head of the queue, up to ``max_batch_rows`` rows, as
soon as one of the model's ``max_concurrency`` run slots is free, concatenates
them, runs them once, and splits the outputs back in request order.  While
every slot is busy the queue fills, so batches grow with load and stay at one
request when the server is idle: no request waits for batch-mates unless
``max_queue_delay_us`` > 0 asks the dispatcher to wait that long (from the
oldest request's arrival) for a fuller batch.  A request whose deadline has
passed when its batch is formed is answered DEADLINE_EXCEEDED and never runs;
one whose client went away (its future cancelled) is dropped the same way.

Row alignment.  ONNX Runtime's CPU kernels treat the last partial SIMD vector
of a tensor, and a single-row MatMul, differently from the rest, so a row's
answer could change (by an ulp) with the number of rows around it.  Every
request is padded to a multiple of ``alignment`` rows (copies of its first
row, dropped from the answer), batched or not, so each request starts on an
aligned row and its answer is bit-identical whatever its batch-mates are.
Alignment 4 is the default because it made every total of 1..700 rows
bit-exact for the demo variants (the README has the figures and the command,
``python -m ctredge.benchmarks.alignment``).  ``alignment=1``
turns padding off.  Dynamic int8 computes activation scales per run, so its
answers depend on batch-mates whatever the alignment: its config turns
batching off.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from concurrent.futures import Executor
from typing import Any, Callable, Mapping

import numpy as np

from ctredge.serve.errors import DeadlineExceeded, ModelUnavailable, ResourceExhausted
from ctredge.serve.runtime import Runner

log = logging.getLogger("ctredge.serve")


@dataclass
class Timing:
    """Where one request's time went, in nanoseconds (Triton's queue / compute input / infer / output)."""

    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    batch_rows: int = 0  # rows of the run this request was part of (padding excluded)
    batch_requests: int = 0


@dataclass
class Execution:
    """One ONNX Runtime run, as reported to ``on_execution`` (statistics, metrics)."""

    rows: int
    padded_rows: int
    requests: int
    input_ns: int
    infer_ns: int
    output_ns: int
    ok: bool


@dataclass
class _Entry:
    feeds: dict[str, np.ndarray]
    rows: int
    padded_rows: int
    future: asyncio.Future
    deadline: float | None  # time.monotonic() seconds
    enqueued_ns: int


def _rows(feeds: Mapping[str, np.ndarray]) -> int:
    for v in feeds.values():
        return int(v.shape[0]) if v.ndim else 1
    return 0


def pad_rows(feeds: Mapping[str, np.ndarray], rows: int, alignment: int) -> tuple[dict[str, np.ndarray], int]:
    """``feeds`` padded with copies of their first row to a multiple of ``alignment`` rows; and that row count."""
    target = -(-rows // alignment) * alignment if alignment > 1 else rows
    if target == rows or rows == 0:
        return dict(feeds), rows
    extra = target - rows
    return {k: np.concatenate([v, np.repeat(v[:1], extra, axis=0)]) for k, v in feeds.items()}, target


class Scheduler:
    """Runs one model version's requests directly or through the dynamic batcher (see the module doc).

    ``batching``: a :class:`~ctredge.serve.repository.DynamicBatching` (``enabled``,
    ``max_batch_rows``, ``max_queue_delay_us``, ``max_queue_size``).  ``batchable``:
    the model has a dynamic batch dimension (only then are requests padded or merged).
    ``max_concurrency``: runs of this model at once.  ``executor``: where runs
    of more than ``inline_max_rows`` rows happen (None: the loop's default).
    ``on_execution``: called on the event-loop thread after every run, ok or
    failed: the one place runs are counted (requests are counted by the servicer).
    """

    def __init__(self, runner: Runner, batching: Any, *, batchable: bool = True, alignment: int = 4,
                 max_concurrency: int = 1, inline_max_rows: int = 0, executor: Executor | None = None,
                 on_execution: Callable[[Execution], None] | None = None):
        self.runner = runner
        self.executor = executor
        self.enabled = bool(batching.enabled) and batchable
        self.max_batch_rows = int(batching.max_batch_rows)
        self.max_queue_delay_ns = int(batching.max_queue_delay_us) * 1000
        self.max_queue_size = int(batching.max_queue_size)
        self.alignment = max(1, int(alignment)) if batchable else 1
        self.max_concurrency = max(1, int(max_concurrency))
        self.inline_max_rows = int(inline_max_rows)
        self.on_execution = on_execution
        self.label = f"{runner.name} v{runner.version}"
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queued_rows = 0
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._dispatcher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._running = 0  # runs in progress
        self._pending = 0  # predict() calls not yet answered
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._last_arrival_ns = 0
        self._gap_ns = 1 << 40  # moving average of the time between arrivals
        self._run_ns = 0  # moving average of a run's time

    # ------------------------------------------------------------------ state
    @property
    def queued(self) -> int:
        """Requests waiting in the batching queue."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Requests accepted and not yet answered (queued or running)."""
        return self._pending

    def _ensure_started(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._idle = asyncio.Event()
            self._idle.set()
            if self.enabled:
                self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_loop())

    # ------------------------------------------------------------------ entry point
    async def predict(self, feeds: Mapping[str, np.ndarray],
                      deadline: float | None = None) -> tuple[dict[str, np.ndarray], Timing]:
        """Run ``feeds`` (rows of one request); returns ``({output: array}, Timing)``.

        ``deadline``: ``time.monotonic()`` seconds after which the request must not run.

        Raises:
            ResourceExhausted: the batching queue is full.
            DeadlineExceeded: the deadline passed before the request ran.
            ModelUnavailable: the version is unloading.
            InvalidInput / ServeError: from the runner.
        """
        if self._closed:
            raise ModelUnavailable(f"{self.label} is unloading; retry (a request without a version goes to "
                                   f"the newest ready version)")
        self._ensure_started()
        rows = _rows(feeds)
        if self.enabled and len(self._queue) >= self.max_queue_size:
            raise ResourceExhausted(f"{self.label}: the batching queue is full ({self.max_queue_size} requests "
                                    f"waiting, dynamic_batching.max_queue_size); retry later")
        self._pending += 1
        self._idle.clear()
        try:
            if not self.enabled:
                return await self._direct(feeds, rows, deadline)
            now = time.perf_counter_ns()
            if self._last_arrival_ns:
                self._gap_ns += (min(now - self._last_arrival_ns, 1 << 40) - self._gap_ns) >> 3
            self._last_arrival_ns = now
            if (not self._queue and self._running == 0 and rows <= self.inline_max_rows
                    and self.max_queue_delay_ns == 0 and self._gap_ns > self._run_ns):
                # idle: requests come slower than runs take, so there is no batch to wait for; run it now,
                # inline (same padding as in a batch, so the same answer), skipping the queue's loop turns
                return await self._direct(feeds, rows, deadline)
            padded, padded_rows = pad_rows(feeds, rows, self.alignment)
            fut = asyncio.get_running_loop().create_future()
            self._queue.append(_Entry(padded, rows, padded_rows, fut, deadline, time.perf_counter_ns()))
            self._queued_rows += padded_rows
            self._wake.set()
            return await fut
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    # ------------------------------------------------------------------ batching off
    async def _direct(self, feeds: Mapping[str, np.ndarray], rows: int,
                      deadline: float | None) -> tuple[dict[str, np.ndarray], Timing]:
        t0 = time.perf_counter_ns()
        padded, padded_rows = pad_rows(feeds, rows, self.alignment)
        t1 = time.perf_counter_ns()
        try:
            if rows <= self.inline_max_rows:
                start_ns, outs, end_ns = self._timed_run(padded, rows, deadline)
            else:
                start_ns, outs, end_ns = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._timed_run, padded, rows, deadline)
        except Exception:
            self._report(Execution(rows, padded_rows, 1, t1 - t0, 0, 0, False))
            raise
        t2 = time.perf_counter_ns()
        out = {k: v[:rows] for k, v in outs.items()} if padded_rows != rows else outs
        t3 = time.perf_counter_ns()
        timing = Timing(queue_ns=max(0, start_ns - t1), input_ns=t1 - t0, infer_ns=end_ns - start_ns,
                        output_ns=t3 - t2, batch_rows=rows, batch_requests=1)
        self._report(Execution(rows, padded_rows, 1, timing.input_ns, timing.infer_ns, timing.output_ns, True))
        return out, timing

    def _timed_run(self, feeds: Mapping[str, np.ndarray], rows: int,
                   deadline: float | None) -> tuple[int, dict[str, np.ndarray], int]:
        """Run in the calling thread; refuse if the deadline passed while waiting for a thread."""
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"{self.label}: the request's deadline passed before it ran")
        start = time.perf_counter_ns()
        out = self.runner.run(feeds)
        end = time.perf_counter_ns()
        self._run_ns += (end - start - self._run_ns) >> 3
        return start, out, end

    # ------------------------------------------------------------------ batching on
    async def _dispatch_loop(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._slots.acquire()
            try:
                if self.max_queue_delay_ns > 0:
                    await self._wait_for_fuller_batch()
                else:
                    await self._gather_ready()
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            rows = sum(e.padded_rows for e in batch)
            # inline (no thread hop) while requests come slower than runs take; under load, runs go to
            # the executor so the event loop keeps taking requests meanwhile and the next batch grows
            if rows <= self.inline_max_rows and self._running == 0 and self._gap_ns > self._run_ns:
                self._running += 1
                await self._execute(batch, inline=True)  # never suspends: the run happens right here
            else:
                self._running += 1
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _gather_ready(self) -> None:
        """Let requests that are already on their way through the event loop join (costs a loop turn or two)."""
        n = -1
        while len(self._queue) != n and self._queued_rows < self.max_batch_rows:
            n = len(self._queue)
            await asyncio.sleep(0)

    async def _wait_for_fuller_batch(self) -> None:
        while self._queue and self._queued_rows < self.max_batch_rows:
            left = self._queue[0].enqueued_ns + self.max_queue_delay_ns - time.perf_counter_ns()
            if left <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left / 1e9)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Entry]:
        """Whole requests from the head of the queue, up to ``max_batch_rows`` rows (at least one)."""
        batch: list[_Entry] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            e = self._queue[0]
            if batch and rows + e.padded_rows > self.max_batch_rows:
                break
            self._queue.popleft()
            self._queued_rows -= e.padded_rows
            if e.future.done():  # the client went away (cancelled)
                continue
            if e.deadline is not None and now > e.deadline:
                e.future.set_exception(DeadlineExceeded(
                    f"{self.label}: the request's deadline passed while it waited in the batching queue "
                    f"({(time.perf_counter_ns() - e.enqueued_ns) / 1e6:.1f} ms); it was not run"))
                continue
            batch.append(e)
            rows += e.padded_rows
        return batch

    def _merge(self, batch: list[_Entry]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0].feeds
        return {k: np.concatenate([e.feeds[k] for e in batch]) for k in batch[0].feeds}

    def _split(self, batch: list[_Entry], outs: dict[str, np.ndarray], start_ns: int, input_ns: int,
               infer_ns: int, t_out: int) -> None:
        rows = sum(e.rows for e in batch)
        offset = 0
        for e in batch:
            part = {k: v[offset:offset + e.rows] for k, v in outs.items()}
            offset += e.padded_rows
            if not e.future.done():
                e.future.set_result((part, Timing(queue_ns=max(0, start_ns - e.enqueued_ns), input_ns=input_ns,
                                                  infer_ns=infer_ns, output_ns=0, batch_rows=rows,
                                                  batch_requests=len(batch))))
        output_ns = time.perf_counter_ns() - t_out
        for e in batch:  # the split's cost, shared
            if e.future.done() and not e.future.cancelled() and e.future.exception() is None:
                e.future.result()[1].output_ns = output_ns
        self._report(Execution(rows, sum(e.padded_rows for e in batch), len(batch), input_ns, infer_ns,
                               output_ns, True))

    def _fail(self, batch: list[_Entry], exc: BaseException, input_ns: int, infer_ns: int) -> None:
        for e in batch:
            if not e.future.done():
                e.future.set_exception(exc)
        self._report(Execution(sum(e.rows for e in batch), sum(e.padded_rows for e in batch), len(batch),
                               input_ns, infer_ns, 0, False))

    async def _execute(self, batch: list[_Entry], inline: bool = False) -> None:
        """Merge, run (on this thread when ``inline``, else on the executor), split; frees the run slot."""
        t0 = time.perf_counter_ns()
        rows = sum(e.rows for e in batch)
        # checked again just before the run: when every request of the batch has expired, nothing runs
        deadline = None if any(e.deadline is None for e in batch) else max(e.deadline for e in batch)
        try:
            feeds = self._merge(batch)
            t1 = time.perf_counter_ns()
            if inline:
                start, outs, end = self._timed_run(feeds, rows, deadline)
            else:
                start, outs, end = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._timed_run, feeds, rows, deadline)
        except Exception as exc:
            self._fail(batch, exc, 0, 0)
        else:
            self._split(batch, outs, t0, t1 - t0, end - start, time.perf_counter_ns())
        finally:
            self._running -= 1
            self._slots.release()

    def _report(self, execution: Execution) -> None:
        if self.on_execution is not None:
            try:
                self.on_execution(execution)
            except Exception:  # statistics must never fail a request
                log.exception("%s: execution observer failed", self.label)

    # ------------------------------------------------------------------ shutdown
    async def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests, wait until every accepted one is answered; True if it drained in time."""
        self._closed = True
        if self._idle is None:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            drained = True
        except asyncio.TimeoutError:
            drained = False
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            self._dispatcher = None
        return drained
