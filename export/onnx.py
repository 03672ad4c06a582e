"""Keras -> ONNX through tf2onnx, validated before anything is written.

``export(trained_dir, out_dir)`` traces the model with an explicit input
signature built from the FeatureSpec (``tf2onnx.convert.from_function``;
``from_keras`` without a signature breaks on Keras 3), pins the opset, checks
the graph with the ONNX checker, compares ONNX Runtime with Keras at batch 1, 7
and 512 (``atol`` 1e-5), and only then renames the folder into place::

    OUT/model.onnx         FeatureSpec, name, version and parent hash in metadata_props
    OUT/feature_spec.json
    OUT/manifest.json      stage "export", opset, node count, validation diffs
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctredge.artifacts import manifest_hash, staged_dir, write_manifest
from ctredge.config import config_to_dict
from ctredge.errors import ConfigError, ValidationError
from ctredge.features import METADATA_KEY, OUTPUT_CTR, FeatureSpec
from ctredge.export.validate import DEFAULT_ATOL, DEFAULT_BATCHES, check_signature, compare, cpu_session, ort_predictor

log = logging.getLogger("ctredge.export")

MODEL_FILE = "model.onnx"
SPEC_FILE = "feature_spec.json"
PROTOBUF_LIMIT = 2 * 1024**3
MAX_OPSET = 18  # tf2onnx 1.17
MIN_OPSET = 13


@dataclass(frozen=True)
class ExportConfig:
    """Settings of one export (saved in the manifest)."""

    opset: int = 17
    atol: float = DEFAULT_ATOL
    batches: tuple[int, ...] = DEFAULT_BATCHES
    name: str = "ctr"
    version: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ConfigError(f"export: opset must be in [{MIN_OPSET}, {MAX_OPSET}] (tf2onnx 1.17), got {self.opset}")
        if not self.atol > 0:
            raise ConfigError(f"export: atol must be > 0, got {self.atol}")
        if self.version < 1:
            raise ConfigError(f"export: version must be >= 1, got {self.version}")


def weight_bytes(model: Any) -> int:
    """Bytes of all the model's weights."""
    return int(sum(np.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights))


def convert(model: Any, spec: FeatureSpec, opset: int) -> Any:
    """Trace a Keras model into an ONNX ModelProto whose inputs/outputs follow the spec.

    Raises:
        ValidationError: the weights would pass protobuf's 2 GB limit (tf2onnx's
            ``large_model`` path crashes on numpy 2), or tf2onnx fails.
    """
    import tensorflow as tf
    import tf2onnx

    size = weight_bytes(model)
    if size > PROTOBUF_LIMIT * 0.95:
        raise ValidationError(
            f"the model's weights take {size / 1024**3:.2f} GiB, over protobuf's 2 GiB limit for one ONNX file; "
            "tf2onnx's large_model path crashes on numpy 2: shrink the embedding tables (fewer buckets, "
            "vocabulary pruning) before exporting"
        )
    names = spec.input_names()
    sig = [tf.TensorSpec(shape, dtype=dt, name=name) for name, (dt, shape) in spec.input_signature().items()]

    @tf.function(input_signature=sig)
    def serve(*tensors):
        out = model(dict(zip(names, tensors)), training=False)
        if isinstance(out, dict):
            out = out[OUTPUT_CTR]
        return {OUTPUT_CTR: tf.identity(out)}

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=sig, opset=opset)
    except Exception as exc:  # tf2onnx raises many types
        raise ValidationError(f"tf2onnx could not convert the model: {exc}") from exc
    return proto


def set_metadata(proto: Any, entries: dict[str, str]) -> None:
    """Set (replace) ``metadata_props`` entries of an ONNX model."""
    keep = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    for p in keep:
        proto.metadata_props.add(key=p.key, value=p.value)
    for k, v in entries.items():
        proto.metadata_props.add(key=k, value=v)


def read_metadata(proto_or_session: Any) -> dict[str, str]:
    """``metadata_props`` of a ModelProto, or custom metadata of an ORT session."""
    if hasattr(proto_or_session, "metadata_props"):
        return {p.key: p.value for p in proto_or_session.metadata_props}
    return dict(proto_or_session.get_modelmeta().custom_metadata_map)


def export(trained_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           cfg: ExportConfig | None = None) -> dict[str, Any]:
    """Export a trained (or pruned) artifact to a validated ONNX artifact folder.

    Returns the manifest written.

    Raises:
        ArtifactError: the trained artifact fails verification.
        ValidationError: conversion fails, the checker fails, the signature is
            wrong, or ONNX Runtime disagrees with Keras beyond ``atol``; nothing
            is written then.
    """
    from ctredge.train.train import load_trained

    model, spec, parent_manifest = load_trained(trained_dir)
    return export_model(model, spec, parent_manifest, trained_dir, out_dir, cfg)


def export_model(model: Any, spec: FeatureSpec, parent_manifest: dict[str, Any],
                 trained_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 cfg: ExportConfig | None = None) -> dict[str, Any]:
    """Export a Keras model already in memory, loaded from the verified artifact ``trained_dir``.

    Takes the model, its spec and parent manifest (what
    :func:`ctredge.train.train.load_trained` returned for ``trained_dir``), the
    output folder and the config.  Returns the manifest written.  Raises what
    :func:`export` raises.
    """
    import onnx

    from ctredge.train.loop import keras_predict

    cfg = cfg or ExportConfig()
    log.info("converting %s with tf2onnx (opset %d)", trained_dir, cfg.opset)
    proto = convert(model, spec, cfg.opset)
    set_metadata(proto, {
        METADATA_KEY: spec.to_json(),
        "ctredge.model_name": cfg.name,
        "ctredge.model_version": str(cfg.version),
        "ctredge.parent_manifest_sha256": manifest_hash(trained_dir),
        "ctredge.architecture": str(parent_manifest.get("extra", {}).get("model", "")),
    })
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ValidationError(f"the ONNX checker rejects the converted graph: {exc}") from exc
    session = cpu_session(proto)
    check_signature(session, spec)
    diffs = compare(lambda f: keras_predict(model, f).reshape(-1, 1), ort_predictor(session), spec,
                    batches=cfg.batches, atol=cfg.atol, seed=cfg.seed)
    log.info("validated against Keras: %s", ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
    with staged_dir(out_dir) as tmp:
        onnx.save_model(proto, str(tmp / MODEL_FILE))
        spec.save(str(tmp / SPEC_FILE))
        manifest = write_manifest(
            tmp, stage="export", config=config_to_dict(cfg), parent=trained_dir,
            metrics={"validation_max_abs_diff": diffs, **{k: v for k, v in parent_manifest["metrics"].items()
                                                           if k.startswith(("test_", "valid_"))}},
            signature={"inputs": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec.input_signature().items()},
                       "outputs": {OUTPUT_CTR: {"dtype": "float32", "shape": [None, 1]}}},
            data=parent_manifest.get("data", {}),
            extra={"opset": cfg.opset, "nodes": len(proto.graph.node),
                   "ops": sorted({n.op_type for n in proto.graph.node}),
                   "onnx_bytes": (tmp / MODEL_FILE).stat().st_size,
                   "model": parent_manifest.get("extra", {}).get("model")},
        )
    return manifest


def load_spec_from_onnx(path: str | os.PathLike[str]) -> FeatureSpec | None:
    """The FeatureSpec stored in an ONNX file's metadata, or None for a plain ONNX model."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    meta = read_metadata(proto)
    return FeatureSpec.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None


__all__ = ["ExportConfig", "export", "export_model", "convert", "set_metadata", "read_metadata", "load_spec_from_onnx",
           "weight_bytes", "MODEL_FILE"]
