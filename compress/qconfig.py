"""Settings of one quantization: :class:`QuantizeConfig` and the names of the variant kinds.

Saved as JSON in every quantized model's ``metadata_props`` (``ctredge.quantization_config``)
and in its manifest, so a variant carries what rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctredge.errors import ConfigError

VARIANT_KINDS = ("fp16", "int8-dynamic", "int8-static", "emb-int8", "emb-int4",
                 "int8-static+emb-int8", "int8-static+emb-int4")
METADATA_QUANTIZATION = "ctredge.quantization"
METADATA_QUANTIZATION_CONFIG = "ctredge.quantization_config"
QUANT_TYPES = ("uint8", "int8")
CALIBRATE_METHODS = ("minmax", "entropy", "percentile")
EMB_SCALES = ("absmax", "mse")


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one quantization (saved in the variant's metadata and manifest).

    Static int8 (``int8-static*``): ``static_activation_type`` / ``static_weight_type``
    (``uint8`` | ``int8``; U8S8 is the default because S8S8 QDQ measured several
    times slower at batch 1 on this CPU), ``static_per_channel``,
    ``static_op_types`` (ops given QDQ; the embedding Gather is left to the
    ``emb-*`` path), ``static_quantize_outputs`` (also QDQ the outputs of those
    ops; off by default: quantizing the final logit alone cost up to 0.1 in
    probability on a trained DCN-v2, and ORT runs DQ -> MatMul/Gemm -> float
    faster on CPU), ``static_exclude_nodes`` (node-name fragments kept in float,
    e.g. ``("deep_dense_0",)``), ``calibrate_method`` (``minmax`` | ``entropy`` |
    ``percentile``), ``calibration_rows`` (rows used at most, 0 = all) in batches
    of ``calibration_batch``.  ``reduce_range`` (default on): 7-bit weights, so
    two adjacent uint8 x int8 products always fit int16 (2 x 255 x 64 = 32640)
    and U8S8 cannot saturate on x86 without VNNI.  Chosen by measurement on the
    demo dcnv2 (``python -m ctredge.compress.int8compare``, AMD EPYC with
    avx512_vnni): with 8-bit weights 90% of the first MLP layer's outputs
    have an overflowing int16 pair sum (what cost 0.03 AUC on an AVX2-only
    EPYC); with ``reduce_range`` none, at +0.0002 AUC against fp32 and the same
    latency; U8U8 (also safe) ran 1.5x slower at batch 256 there.

    Dynamic int8: ``dynamic_weight_type``, ``dynamic_per_channel``,
    ``dynamic_op_types`` (``Gather`` included: ORT then stores the tables per-tensor
    int8, the stock ORT recipe this variant stands for).  ``reduce_range`` applies
    here too: dynamic int8 runs the same U8S8 kernels (on the demo dcnv2 its dAUC
    went from -0.0007 to +0.0001 with it, within the noise).

    Row-wise embeddings (``emb-*``): tables with at least ``emb_min_rows`` rows
    whose quantized form is smaller than fp32 (``dim >= 2``) are rewritten;
    ``emb_scale``: ``absmax`` (``s = max|row| / qmax``) or ``mse`` (per row, the
    clipping of ``max|row|`` among 0.5..1 with the least squared error).

    ``fp16_keep_input_transform``: keep the element-wise ops fed by the float
    inputs (NaN fill, signed log1p) in fp32 (raw counts overflow fp16).

    Raises:
        ConfigError: a value out of range or of the wrong type.
    """

    static_activation_type: str = "uint8"
    static_weight_type: str = "int8"
    static_per_channel: bool = True
    static_quantize_outputs: bool = False
    static_op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    static_exclude_nodes: tuple[str, ...] = ()
    calibrate_method: str = "minmax"
    calibration_rows: int = 4096
    calibration_batch: int = 256
    reduce_range: bool = True
    dynamic_weight_type: str = "int8"
    dynamic_per_channel: bool = False
    dynamic_op_types: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
    emb_min_rows: int = 256
    emb_scale: str = "absmax"
    fp16_keep_input_transform: bool = True

    def __post_init__(self) -> None:
        for name in ("static_activation_type", "static_weight_type", "dynamic_weight_type"):
            if getattr(self, name) not in QUANT_TYPES:
                raise ConfigError(f"{name}: expected one of {QUANT_TYPES}, got {getattr(self, name)!r}")
        if self.calibrate_method not in CALIBRATE_METHODS:
            raise ConfigError(f"calibrate_method: expected one of {CALIBRATE_METHODS}, got {self.calibrate_method!r}")
        if self.emb_scale not in EMB_SCALES:
            raise ConfigError(f"emb_scale: expected one of {EMB_SCALES}, got {self.emb_scale!r}")
        for name in ("static_op_types", "dynamic_op_types", "static_exclude_nodes"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value)
                    or (not value and name != "static_exclude_nodes")):
                raise ConfigError(f"{name}: expected a {'' if name == 'static_exclude_nodes' else 'non-empty '}"
                                  f"list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name, minimum in (("calibration_rows", 0), ("calibration_batch", 1), ("emb_min_rows", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
        for name in ("static_per_channel", "static_quantize_outputs", "reduce_range", "dynamic_per_channel",
                     "fp16_keep_input_transform"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")


__all__ = ["VARIANT_KINDS", "METADATA_QUANTIZATION", "METADATA_QUANTIZATION_CONFIG", "QUANT_TYPES",
           "CALIBRATE_METHODS", "EMB_SCALES", "QuantizeConfig"]
