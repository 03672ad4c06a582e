"""The attacks of :mod:`ctredge.benchmarks.hostile`: issue 12's first list, replayed one by one.

Each attack is a function ``fn(ctx) -> Outcome`` registered in :data:`ATTACKS`
under a short name, in the order of the issue's bullets (group 1: model
control; 2: one request freezing the others; 3: memory clients can fill; 4:
misleading statuses; 5: SIGTERM).  An attack sends a bounded number of calls,
each with a timeout, to the server at ``ctx.url`` (127.0.0.1 only) and reports
what the client got: every call's status code, the first error message, and
attack-specific figures in ``extra``.  Nothing here asserts anything.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from ctredge.benchmarks.hostile_calls import (
    Ctx, Outcome, add_all, burst, call_raw, call_stub, index_names, max_batch, model_ready, model_stats,
    ordinary_request, rows_for_bytes, rpc_error, scrape, zeros_inputs,
)
from ctredge.serve.codec import build_request, decode_response


# ----------------------------------------------------------------------------- group 1: model control
def _load(ctx: Ctx, name: str) -> Outcome:
    out = Outcome()
    with out.timed():
        call_stub(out, ctx.stub().RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name))
    names = index_names(ctx)
    out.extra = {"model_name": name, "in_index_after": None if names is None else name in names,
                 "ready_after": model_ready(ctx, name)}
    return out


def load_abs_path(ctx: Ctx) -> Outcome:
    """RepositoryModelLoad of an absolute path (``/tmp``)."""
    return _load(ctx, "/tmp")


def load_traversal(ctx: Ctx) -> Outcome:
    """RepositoryModelLoad of ``<model>/../../x``."""
    return _load(ctx, f"{ctx.model}/../../x")


def load_dotdot(ctx: Ctx) -> Outcome:
    """RepositoryModelLoad of ``../x``."""
    return _load(ctx, "../x")


def load_inside_traversal(ctx: Ctx) -> Outcome:
    """RepositoryModelLoad of ``<model>/../<model>``: a name with separators that resolves inside the repository."""
    out = _load(ctx, f"{ctx.model}/../{ctx.model}")
    if out.extra.get("in_index_after"):
        unload = Outcome()
        call_stub(unload, ctx.stub().RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=out.extra[
            "model_name"]))
        out.extra["cleanup_unload"] = dict(unload.codes)
    return out


def unload_all(ctx: Ctx) -> Outcome:
    """RepositoryModelUnload of every ready model of the index, then ServerReady; then load them back."""
    out = Outcome()
    names = index_names(ctx, ready=True) or [ctx.model]
    with out.timed():
        for name in names:
            call_stub(out, ctx.stub().RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name))
        try:
            ready = ctx.stub().ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        except grpc.RpcError as exc:
            ready = rpc_error(exc)[0]
    restored = Outcome()
    for name in names:
        call_stub(restored, ctx.stub().RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name))
    out.extra = {"models": len(names), "server_ready_after_unload": ready, "reload_codes": dict(restored.codes)}
    return out


# ----------------------------------------------------------------------------- group 2: one request freezes all
def hist_raw_commas(ctx: Ctx) -> Outcome:
    """8 rows of ``hist_raw`` (BYTES [8, 1]), each 1 MB of commas."""
    out = Outcome()
    if ctx.spec.history is None:
        out.add("SKIPPED", "the model has no history input")
        return out
    feeds = zeros_inputs(ctx.spec, 8)
    feeds.pop("hist")
    feeds["hist_raw"] = np.array([[b"," * 1_000_000] for _ in range(8)], dtype=object)
    code, message, _ = call_raw(ctx, build_request(ctx.model, feeds).SerializeToString())
    out.add(code, message)
    return out


def _unknown_bytes_input(ctx: Ctx, count: int) -> Outcome:
    req = build_request(ctx.model, zeros_inputs(ctx.spec, 1))
    req.inputs.add(name="no_such_input", datatype="BYTES", shape=[count])
    req.raw_input_contents.append(b"\x00\x00\x00\x00" * count)  # `count` empty strings (4-byte length 0 each)
    payload = req.SerializeToString()
    out = Outcome()
    code, message, _ = call_raw(ctx, payload)
    out.add(code, message)
    out.extra = {"elements": count, "message_bytes": len(payload), "server_limit_bytes": ctx.max_message_bytes}
    return out


def unknown_input_9m(ctx: Ctx) -> Outcome:
    """An unknown input name carrying a BYTES tensor of 9,000,000 empty strings (36 MB raw)."""
    return _unknown_bytes_input(ctx, 9_000_000)


def unknown_input_fit(ctx: Ctx) -> Outcome:
    """The same, with as many elements as fit the server's message limit."""
    return _unknown_bytes_input(ctx, max(1, (ctx.max_message_bytes - 64 * 1024) // 4))


# ----------------------------------------------------------------------------- group 3: memory clients can fill
def cat_raw_unique(ctx: Ctx) -> Outcome:
    """20,000 unique 1 KB ``cat_raw`` values, 32 rows a request (the hash memo's worst case)."""
    total, rows, nc = ctx.n(20_000, 2_000), 32, ctx.spec.n_cat
    payloads, i = [], 0
    while i < total:
        feeds = zeros_inputs(ctx.spec, rows)
        feeds.pop("cat")
        vals = np.empty((rows, nc), dtype=object)
        for r in range(rows):
            for c in range(nc):
                vals[r, c] = (b"%012d-" % i).ljust(1024, b"x")
                i += 1
        feeds["cat_raw"] = vals
        payloads.append(build_request(ctx.model, feeds).SerializeToString())
    out = add_all(Outcome(), burst(ctx, payloads, concurrency=4))
    out.extra = {"unique_values": i, "value_bytes": 1024, "requests": len(payloads)}
    return out


def random_models(ctx: Ctx) -> Outcome:
    """2,000 requests naming random model names, then one /metrics scrape (size, time)."""
    rng = random.Random(12)
    n = ctx.n(2_000, 200)
    template = build_request("x", zeros_inputs(ctx.spec, 1))
    payloads = []
    for _ in range(n):
        template.model_name = "m-%016x" % rng.getrandbits(64)
        payloads.append(template.SerializeToString())
    before = scrape(ctx.metrics_url) if ctx.metrics_url else None
    out = Outcome()
    with out.timed():
        add_all(out, burst(ctx, payloads, concurrency=32))
    after = scrape(ctx.metrics_url) if ctx.metrics_url else None
    out.extra = {"metrics_bytes_before": before and before[0], "metrics_bytes": after and after[0],
                 "scrape_s": after and round(after[1], 4), "metrics_url": ctx.metrics_url}
    return out


def _big_payload(ctx: Ctx, nbytes: int) -> bytes:
    return build_request(ctx.model, zeros_inputs(ctx.spec, rows_for_bytes(ctx.spec, nbytes))).SerializeToString()


def gzip_50mb(ctx: Ctx) -> Outcome:
    """16 gzip-compressed requests (channel compression) each decompressing to ~50 MB of zeros."""
    payload = _big_payload(ctx, 50_000_000)
    n = ctx.n(16, 4)
    out = add_all(Outcome(), burst(ctx, [payload] * n, concurrency=4, compression=grpc.Compression.Gzip))
    out.extra = {"decompressed_bytes": len(payload)}
    return out


def big_55mb(ctx: Ctx) -> Outcome:
    """50 requests of ~55 MB each (over any sane message limit), two at a time."""
    payload = _big_payload(ctx, 55_000_000)
    out = add_all(Outcome(), burst(ctx, [payload] * ctx.n(50, 5), concurrency=2))
    out.extra = {"message_bytes": len(payload)}
    return out


# ----------------------------------------------------------------------------- group 4: statuses
def inflight_2000(ctx: Ctx) -> Outcome:
    """2,000 requests of 32 rows in flight at once; ModelStatistics before and after."""
    payload = ordinary_request(ctx.spec, ctx.model, rows=32)
    before = model_stats(ctx)
    out = Outcome()
    with out.timed():
        add_all(out, burst(ctx, [payload] * ctx.n(2_000, 300)))
    after = model_stats(ctx)
    if before and after:
        out.extra = {"stats_success_delta": after[0] - before[0], "stats_fail_delta": after[1] - before[1],
                     "note": "stats deltas include the probe stream's requests (probe_ok_during)"}
    return out


def deadline_1ms(ctx: Ctx) -> Outcome:
    """300 requests of 32 rows with a 1 ms deadline, all at once; how many the server counted as successes."""
    payload = ordinary_request(ctx.spec, ctx.model, rows=32)
    before = model_stats(ctx)
    out = Outcome()
    with out.timed():
        add_all(out, burst(ctx, [payload] * ctx.n(300, 100), timeout=0.001))
    time.sleep(1.0)  # let the server finish what it still runs
    after = model_stats(ctx)
    if before and after:
        out.extra = {"server_successes": after[0] - before[0], "server_failures": after[1] - before[1]}
    return out


def _shape_request(ctx: Ctx, shape: list[int], raw: bytes) -> bytes:
    feeds = zeros_inputs(ctx.spec, 1)
    feeds.pop("dense")
    req = build_request(ctx.model, feeds)
    req.inputs.add(name="dense", datatype="FP32", shape=shape)
    req.raw_input_contents.append(raw)
    return req.SerializeToString()


def shape_huge(ctx: Ctx) -> Outcome:
    """``dense`` with shape ``[2**63-1, 0]`` and no data."""
    out = Outcome()
    out.add(*call_raw(ctx, _shape_request(ctx, [2**63 - 1, 0], b""))[:2])
    return out


def shape_1000_dims(ctx: Ctx) -> Outcome:
    """``dense`` with a 1,000-dimension shape of ones (one element)."""
    out = Outcome()
    out.add(*call_raw(ctx, _shape_request(ctx, [1] * 1000, b"\x00" * 4))[:2])
    return out


def garbage_bytes(ctx: Ctx) -> Outcome:
    """Undecodable bytes as a ModelInfer message (identity serializer): 3 variants."""
    rng = random.Random(3)
    payloads = [b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 16, bytes(rng.getrandbits(8) for _ in range(4096))]
    out = Outcome()
    for p in payloads:
        out.add(*call_raw(ctx, p)[:2])
    return out


def shm_param(ctx: Ctx) -> Outcome:
    """An ordinary request whose first input names a ``shared_memory_region`` (the data is sent too)."""
    req = build_request(ctx.model, zeros_inputs(ctx.spec, 1))
    req.inputs[0].parameters["shared_memory_region"].string_param = "hostile-region"
    req.inputs[0].parameters["shared_memory_byte_size"].int64_param = len(req.raw_input_contents[0])
    out = Outcome()
    out.add(*call_raw(ctx, req.SerializeToString())[:2])
    return out


def _load_with(ctx: Ctx, params: dict[str, Any]) -> Outcome:
    req = pb.RepositoryModelLoadRequest(model_name=ctx.model)
    for key, value in params.items():
        if isinstance(value, bytes):
            req.parameters[key].bytes_param = value
        else:
            req.parameters[key].string_param = value
    out = Outcome()
    before = max_batch(ctx)
    with out.timed():
        call_stub(out, ctx.stub().RepositoryModelLoad, req)
    after = max_batch(ctx)
    code, message, _ = call_raw(ctx, ordinary_request(ctx.spec, ctx.model))
    restore = Outcome()
    call_stub(restore, ctx.stub().RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=ctx.model))
    out.extra = {"max_batch_size_before": before, "max_batch_size_after": after, "infer_after": code,
                 "plain_reload": dict(restore.codes)}
    return out


def load_config_override(ctx: Ctx) -> Outcome:
    """RepositoryModelLoad with Triton's ``config`` parameter (max_batch_size 1); then a plain reload."""
    return _load_with(ctx, {"config": json.dumps({"max_batch_size": 1})})


def load_file_override(ctx: Ctx) -> Outcome:
    """RepositoryModelLoad with a ``file:1/model.onnx`` parameter holding bytes that are not a model."""
    return _load_with(ctx, {"file:1/model.onnx": b"hostile: these bytes are not an ONNX model"})


def dense_inf(ctx: Ctx) -> Outcome:
    """Two rows: ``dense`` all +Inf, then all -Inf; an OK answer is checked for NaN."""
    feeds = zeros_inputs(ctx.spec, 2)
    feeds["dense"][0, :], feeds["dense"][1, :] = np.inf, -np.inf
    code, message, raw = call_raw(ctx, build_request(ctx.model, feeds).SerializeToString())
    out = Outcome()
    out.add(code, message)
    if raw is not None:
        ctr = decode_response(pb.ModelInferResponse.FromString(raw)).get("ctr")
        if ctr is not None:
            out.extra = {"ctr": [float(v) if np.isfinite(v) else str(v) for v in np.ravel(ctr)],
                         "nan_in_answer": bool(np.isnan(ctr).any())}
    return out


# ----------------------------------------------------------------------------- group 5: SIGTERM
def sigterm_inflight(ctx: Ctx) -> Outcome:
    """200 requests of 256 rows in flight, SIGTERM at the first answer; answers by status, exit status."""
    payload = ordinary_request(ctx.spec, ctx.model, rows=256)
    sent: dict[str, float] = {}

    def term() -> None:
        sent["t"] = time.monotonic()
        os.kill(ctx.pid, signal.SIGTERM)

    out = Outcome()
    with out.timed():
        t0 = time.monotonic()
        add_all(out, burst(ctx, [payload] * ctx.n(200, 40), timeout=ctx.grace_seconds + 30, during=term,
                            during_after_s=0.5))
    out.extra = {"sigterm_after_s": round(sent["t"] - t0, 3),
                 "last_answer_after_sigterm_s": round(time.monotonic() - sent["t"], 3)}
    return out


@dataclass(frozen=True)
class Attack:
    """One registered attack: ``probe`` False pauses the ordinary stream during it; ``terminal`` ends the server."""

    name: str
    group: int
    fn: Callable[[Ctx], Outcome]
    probe: bool = True
    terminal: bool = False

    @property
    def description(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]


ATTACKS: tuple[Attack, ...] = (
    Attack("load-abs-path", 1, load_abs_path), Attack("load-traversal", 1, load_traversal),
    Attack("load-dotdot", 1, load_dotdot), Attack("load-inside-traversal", 1, load_inside_traversal),
    Attack("unload-all", 1, unload_all),
    Attack("hist-raw-commas", 2, hist_raw_commas), Attack("unknown-input-9m", 2, unknown_input_9m),
    Attack("unknown-input-fit", 2, unknown_input_fit),
    Attack("cat-raw-unique", 3, cat_raw_unique), Attack("random-models", 3, random_models),
    Attack("gzip-50mb", 3, gzip_50mb), Attack("big-55mb", 3, big_55mb),
    Attack("inflight-2000", 4, inflight_2000), Attack("deadline-1ms", 4, deadline_1ms, probe=False),
    Attack("shape-huge", 4, shape_huge), Attack("shape-1000-dims", 4, shape_1000_dims),
    Attack("garbage-bytes", 4, garbage_bytes), Attack("shm-param", 4, shm_param),
    Attack("load-config-override", 4, load_config_override), Attack("load-file-override", 4, load_file_override),
    Attack("dense-inf", 4, dense_inf),
    Attack("sigterm-inflight", 5, sigterm_inflight, probe=False, terminal=True),
)
BY_NAME = {a.name: a for a in ATTACKS}
