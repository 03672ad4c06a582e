"""Quantization of exported ONNX CTR models: ONNX + ONNX Runtime + numpy, no TensorFlow.

:func:`quantize` turns an fp32 ONNX model (``ctredge.export``) into one variant:

========================  ==================================================================
kind                      what changes
========================  ==================================================================
``fp16``                  every float op/initializer in fp16 (ORT's
                          ``convert_float_to_float16``), inputs/outputs stay fp32; the dense
                          input transform (NaN fill, signed log1p) stays fp32 because raw
                          counts overflow fp16's 65504
``int8-dynamic``          ORT ``quantize_dynamic``: int8 weights, activation ranges per batch
                          (a row's score depends on its batch-mates, DESIGN.md)
``int8-static``           ORT ``quantize_static``, QDQ, per-channel weights, activation ranges
                          calibrated on feed dicts (:mod:`ctredge.compress.calibration`)
``emb-int8``              row-wise symmetric int8 embedding table + fp32 scale per row
``emb-int4``              row-wise symmetric int4 (two nibbles per uint8) + fp32 scale per row
``int8-static+emb-int8``  both: row-wise embeddings first, then static QDQ (calibrated on the
``int8-static+emb-int4``  graph that will be served)
========================  ==================================================================

The jobs live in their own modules: :mod:`.qconfig` (settings),
:mod:`.rowwise` (numpy reference of the row-wise quantizers), :mod:`.graph`
(graph surgery), :mod:`.ortquant` (ORT's quantizers and fp16 converter),
:mod:`.onnxio` (writing), :mod:`.scoring` (ORT predictions, session memory).
This module composes them and re-exports their public names.

Every variant keeps the source's ``metadata_props`` (``ctredge.feature_spec``, ...)
and adds ``ctredge.quantization`` (the kind) and ``ctredge.quantization_config``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ctredge.compress.graph import EmbeddingTable, find_embedding_tables, quantize_embeddings, quantize_vectors
from ctredge.compress.onnxio import PROTOBUF_LIMIT, proto_bytes, save_model, set_ir_version
from ctredge.compress.ortquant import dynamic_int8, fp16, static_int8
from ctredge.compress.qconfig import METADATA_QUANTIZATION, METADATA_QUANTIZATION_CONFIG, VARIANT_KINDS, QuantizeConfig
from ctredge.compress.rowwise import (dequantize_rows_int4, dequantize_rows_int8, pack_int4, quantize_rows_int4,
                                      quantize_rows_int8, unpack_int4)
from ctredge.compress.scoring import ort_predict, session_rss_bytes
from ctredge.config import config_to_dict
from ctredge.errors import ArtifactError, ConfigError, CtrEdgeError, ValidationError
from ctredge.export.onnx import read_metadata, set_metadata


def quantize(src: Any, kind: str, calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
             cfg: QuantizeConfig | None = None) -> Any:
    """Make one quantized variant of an fp32 ONNX model.

    Takes: ``src`` (``onnx.ModelProto`` -- not modified -- or a path), ``kind``
    (one of :data:`VARIANT_KINDS`), ``calibration`` (an iterable of feed dicts
    ``{input name: array}``; needed by ``int8-static*``, ignored by the rest) and
    a :class:`QuantizeConfig` (default settings when ``None``).

    Returns: the variant as an ``onnx.ModelProto`` that ONNX Runtime 1.31 loads
    (IR version set explicitly), with the source's ``metadata_props`` plus
    ``ctredge.quantization`` = ``kind`` and ``ctredge.quantization_config``.
    Write it with :func:`save_model`.

    Raises:
        ConfigError: unknown kind, a config that is not a QuantizeConfig, a source
            that is already quantized, ``emb-*`` on a model without an embedding
            table (float initializer read only by ``Gather``), or ``int8-static*``
            without calibration data (or with feeds that do not fit the model).
        ValidationError: the result fails the ONNX checker.
    """
    import onnx

    if kind not in VARIANT_KINDS:
        raise ConfigError(f"unknown quantization kind {kind!r}; expected one of {VARIANT_KINDS}")
    cfg = QuantizeConfig() if cfg is None else cfg
    if not isinstance(cfg, QuantizeConfig):
        raise ConfigError(f"quantize: expected a QuantizeConfig, got {type(cfg).__name__}")
    if isinstance(src, (str, os.PathLike)):
        try:
            model = onnx.load(str(src))
        except Exception as exc:  # onnx raises OSError, DecodeError, ...
            raise ConfigError(f"cannot read ONNX model {src}: {exc}") from exc
    elif isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
    else:
        raise ConfigError(f"quantize: expected an onnx.ModelProto or a path, got {type(src).__name__}")
    meta = read_metadata(model)
    if meta.get(METADATA_QUANTIZATION, "none") != "none":
        raise ConfigError(f"the source is already quantized ({meta[METADATA_QUANTIZATION]!r}); "
                          "quantize the fp32 export instead")
    parts = kind.split("+")
    if "int8-static" in parts and calibration is None:
        raise ConfigError(f"{kind}: static quantization needs calibration data: pass an iterable of feed dicts "
                          "({input name: array}), e.g. held-out click-log rows read with the hub reader")

    emb = next((p for p in parts if p.startswith("emb-")), None)
    if emb is not None:
        model, _ = quantize_embeddings(model, 8 if emb == "emb-int8" else 4, cfg)
        model, _ = quantize_vectors(model, cfg)  # the wide part's weight per id: int8, a scale per block
    if "int8-static" in parts:
        model = static_int8(model, calibration, cfg)
    elif kind == "int8-dynamic":
        model = dynamic_int8(model, cfg)
    elif kind == "fp16":
        model = fp16(model, cfg)

    del model.metadata_props[:]
    set_metadata(model, {**meta, METADATA_QUANTIZATION: kind,
                         METADATA_QUANTIZATION_CONFIG: json.dumps(config_to_dict(cfg), sort_keys=True)})
    set_ir_version(model)
    if proto_bytes(model) < PROTOBUF_LIMIT:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # onnx raises its own ValidationError types
            raise ValidationError(f"{kind}: the quantized graph fails the ONNX checker: {exc}") from exc
    return model


def quantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], kind: str,
                  calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
                  cfg: QuantizeConfig | None = None) -> dict[str, Any]:
    """:func:`quantize` ``src`` and write it to ``dst`` (:func:`save_model`).

    Returns ``{"kind", "files", "bytes", "source_bytes"}``.  Raises what :func:`quantize` raises.
    """
    model = quantize(src, kind, calibration, cfg)
    files = save_model(model, dst)
    src = Path(src)
    src_files = [src] + ([src.with_name(src.name + ".data")] if src.with_name(src.name + ".data").exists() else [])
    return {"kind": kind, "files": [str(f) for f in files], "bytes": sum(f.stat().st_size for f in files),
            "source_bytes": sum(f.stat().st_size for f in src_files)}


def verified_source(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the ctredge artifact an ONNX file belongs to, as ``export`` checks its parent.

    The file's folder must hold a ``manifest.json`` of an ``export`` or ``variant``
    artifact that lists the file, and every file it lists must match its sha256.
    Returns that manifest.

    Raises:
        ArtifactError: no manifest, a manifest of another stage or one that does
            not list the file, or a file that changed since the manifest was written.
    """
    from ctredge.artifacts import MANIFEST, read_manifest

    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        raise ArtifactError(f"{path}: no {MANIFEST} beside it, so its content cannot be checked: quantize the "
                            f"output of `ctredge export` (or pass --no-verify for an ONNX file made elsewhere)")
    manifest = read_manifest(path.parent, stage=("export", "variant"))
    if path.name not in manifest.get("files", {}):
        raise ArtifactError(f"{path}: the artifact's {MANIFEST} does not list {path.name}; "
                            f"expected one of {sorted(manifest.get('files', {}))}")
    return manifest


def quantize_to_folder(src: str | os.PathLike[str], kinds: Iterable[str], out: str | os.PathLike[str], *,
                       calibration_data: str | os.PathLike[str] | None = None, calibration_rows: int = 4096,
                       verify_manifest: bool = True) -> list[tuple[str, Path, int]]:
    """``ctredge compress quantize``: write ``OUT/model.<kind>.onnx`` for each kind.

    Takes the source ONNX file (its artifact's manifest checked first unless
    ``verify_manifest`` is False), the kinds, the output folder, and a click log
    whose first ``calibration_rows`` rows calibrate static int8 (read with the
    FeatureSpec in the model's metadata).  Returns ``[(kind, path, bytes)]``.

    Raises:
        ArtifactError: the source fails :func:`verified_source`.
        CtrEdgeError: the model carries no FeatureSpec to read calibration rows with.
        ConfigError, ValidationError: what :func:`quantize` raises.
    """
    from ctredge.export.onnx import load_spec_from_onnx
    from ctredge.reader import read_all

    if verify_manifest:
        verified_source(src)
    calibration = None
    if calibration_data:
        spec = load_spec_from_onnx(src)
        if spec is None:
            raise CtrEdgeError(f"{src} carries no ctredge FeatureSpec: calibration rows cannot be read for it")
        rows = read_all(calibration_data, spec, limit=calibration_rows)
        calibration = [rows.take(np.arange(i, min(i + 256, len(rows)))).feeds for i in range(0, len(rows), 256)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in kinds:
        path = out / f"model.{kind.replace('+', '_')}.onnx"
        save_model(quantize(src, kind, calibration), path)
        written.append((kind, path, path.stat().st_size))
    return written


__all__ = ["VARIANT_KINDS", "QuantizeConfig", "EmbeddingTable", "quantize", "quantize_file", "quantize_to_folder",
           "verified_source", "save_model",
           "ort_predict", "session_rss_bytes", "find_embedding_tables",
           "pack_int4", "unpack_int4", "quantize_rows_int8", "quantize_rows_int4",
           "dequantize_rows_int8", "dequantize_rows_int4", "METADATA_QUANTIZATION", "METADATA_QUANTIZATION_CONFIG"]
