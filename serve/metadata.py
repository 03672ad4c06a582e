"""Protocol answers that describe the server and its models (metadata, config, index).

Where the execution provider shows:

* ``ModelConfig``: ``parameters["execution_provider"]`` (e.g. ``CPUExecutionProvider``)
  and ``instance_group[0].kind`` (``KIND_GPU`` / ``KIND_CPU``);
* ``ServerMetadata``: one extension ``execution_provider/<model>/<version>=<provider>``
  per ready version;
* ``ModelMetadata``: the protocol's message has no parameters, so the provider
  goes in the call's initial gRPC metadata, key ``ctredge-execution-provider``.

A ctredge model's ``ModelConfig.parameters`` also carry its FeatureSpec JSON
(``ctredge.feature_spec``), which ``ctredge predict`` reads to parse click logs, and
the names of the columns of the optional ``attributions`` output, in order
(``ctredge.attribution_groups``, a JSON list; :mod:`.explain`).
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

import ctredge
from ctredge.features import METADATA_KEY
from ctredge.serve import explain
from ctredge.serve.repository import ModelVersion, Repository
from ctredge.serve.runtime import GPU_PROVIDERS

SERVER_NAME = "ctredge"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
EXTENSIONS = ("model_configuration", "ctredge_cat_raw", "ctredge_ranking")
_MC_TYPES = {"BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
             "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
             "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
             "BYTES": mc.TYPE_STRING}


def server_metadata(repo: Repository) -> Any:
    """``ServerMetadataResponse``: name, version, extensions (+ the provider of each ready version)."""
    ext = list(EXTENSIONS) + [f"execution_provider/{mv.name}/{mv.version}={mv.provider}"
                              for mv in repo.all() if mv.ready]
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=ctredge.__version__, extensions=ext)


def model_metadata(repo: Repository, mv: ModelVersion) -> Any:
    """``ModelMetadataResponse`` of a ready version: every accepted input (alternatives included)."""
    sig = mv.signature
    return pb.ModelMetadataResponse(
        name=mv.name, versions=[str(v) for v in repo.ready_versions(mv.name)], platform=PLATFORM,
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                for t in sig.inputs],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                 for t in sig.outputs],
    )


def model_config(mv: ModelVersion) -> Any:
    """``ModelConfigResponse`` in Triton's terms (dims without the batch dimension when batched)."""
    sig, cfg = mv.signature, mv.config
    batched = bool(sig.batched)
    cut = 1 if batched else 0
    conf = mc.ModelConfig(name=mv.name, platform=PLATFORM, backend=BACKEND,
                          max_batch_size=cfg.max_batch_size if batched else 0)
    for t in sig.inputs:
        conf.input.add(name=t.name, data_type=_MC_TYPES[t.datatype], dims=list(t.shape[cut:]), optional=t.optional)
    for t in sig.outputs:
        conf.output.add(name=t.name, data_type=_MC_TYPES[t.datatype], dims=list(t.shape[cut:]))
    policy = cfg.version_policy
    if policy.kind == "all":
        conf.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        conf.version_policy.specific.versions.extend(policy.versions)
    else:
        conf.version_policy.latest.num_versions = policy.num_versions
    scheduler = mv.scheduler
    if scheduler is not None and getattr(scheduler, "enabled", False):
        db = cfg.dynamic_batching
        conf.dynamic_batching.max_queue_delay_microseconds = db.max_queue_delay_us
        conf.dynamic_batching.default_queue_policy.max_queue_size = db.max_queue_size
    conf.instance_group.add(name=mv.name, count=getattr(scheduler, "max_concurrency", 1),
                            kind=mc.ModelInstanceGroup.KIND_GPU if mv.provider in GPU_PROVIDERS
                            else mc.ModelInstanceGroup.KIND_CPU)
    params = {
        "execution_provider": mv.provider,
        "providers_requested": ",".join(cfg.providers),
        "intra_op_threads": str(cfg.intra_op_threads),
        "inter_op_threads": str(cfg.inter_op_threads),
        "allow_spinning": str(cfg.allow_spinning).lower(),
        "inline_max_rows": str(cfg.inline_max_rows),
        "dynamic_batching": "on" if getattr(scheduler, "enabled", False) else "off",
        "dynamic_batching.max_batch_rows": str(cfg.dynamic_batching.max_batch_rows),
        "row_alignment": str(getattr(scheduler, "alignment", 1)),
        "version": str(mv.version),
        "notes": cfg.notes,
    }
    if sig.spec is not None:
        params[METADATA_KEY] = sig.spec.to_json()
        params[explain.GROUPS_PARAMETER] = explain.groups_json(sig.spec)
    for k, v in params.items():
        conf.parameters[k].string_value = v
    return pb.ModelConfigResponse(config=conf)


def repository_index(repo: Repository, ready_only: bool = False) -> Any:
    """``RepositoryIndexResponse``: every version found, with state and the reason it is not ready."""
    resp = pb.RepositoryIndexResponse()
    for mv in repo.all():
        if ready_only and not mv.ready:
            continue
        resp.models.add(name=mv.name, version=str(mv.version), state=mv.state, reason=mv.reason)
    return resp
