"""How a model is served: ``REPO/<model>/config.json`` as one typed, frozen ``ServingConfig``.

Written by ``compress all`` and the benchmarks, read by the server
(:mod:`ctredge.serve.repository`); it lives in the hub so that no stage imports
``serve/`` to write one.  Unknown keys are an error at every level.

``config.json`` schema (every key optional; unknown keys are an error)::

    {
      "max_batch_size": 4096,          rows per request (and per batch), >= 1
      "providers": "auto",             "auto" (CUDA if this onnxruntime has it, then CPU) or a list,
                                       e.g. ["cuda", "cpu"] / ["CPUExecutionProvider"]
      "intra_op_threads": 1,           ONNX Runtime threads per Run
      "inter_op_threads": 1,
      "allow_spinning": false,         session.intra_op/inter_op.allow_spinning
      "inline_max_rows": 16,           runs of up to this many rows happen on the event-loop thread
                                       (no thread hop); larger ones on worker threads; 0 = never inline
      "row_alignment": 4,              each request is padded to a multiple of this many rows so its
                                       answer never depends on batch-mates (1 = no padding)
      "instances": 0,                  runs of this model at once (0 = the server's --run-threads)
      "dynamic_batching": {            (serve/batcher.py)
        "enabled": true,               false: every request is its own run
        "max_batch_rows": 4096,        rows merged into one run
        "max_queue_delay_us": 0,       how long the oldest waiting request may wait for batch-mates
                                       once a run slot is free (0: run what is queued at once;
                                       batches still form while every slot is busy)
        "max_queue_size": 1024         requests waiting; beyond, RESOURCE_EXHAUSTED
      },
      "version_policy": {"kind": "latest", "num_versions": 1},
                                       or {"kind": "specific", "versions": [1, 3]}, or {"kind": "all"}
      "limits": {                      bounds checked before any per-element work of a request
        "max_elements": 4194304,       elements of one request, all inputs together
        "max_bytes_elements": 262144,  elements of the BYTES inputs (raw values) of one request
        "max_bytes_payload": 8388608,  bytes of the BYTES inputs of one request
        "max_raw_value_bytes": 1024,   one raw categorical value or history item id
        "max_history_bytes": 16384,    one raw history (comma-separated item ids)
        "max_explain_rows": 4096,      rows B x (G + 1) of a request that asks for ``attributions``
        "hash_memo_bytes": 16777216,   memory of the raw-value -> id memo (LRU), per model version
        "max_query_bytes": 512,        one raw query string (BYTES input ``query``)
        "max_query_tokens": 64,        tokens a query is cut to before the encoder runs
        "max_query_strings": 64        query strings of one request (a ranking request sends 1)
      },
      "text_encoder": "",              a model of the same repository (e.g. "text-encoder") whose
                                       model.onnx + tokenizer.json encode the raw ``query`` input into
                                       the model's ``query_emb`` (README: Text semantics); "" = none,
                                       then a text model takes ``query_emb`` only
      "notes": ""                      free text, e.g. why batching is off
    }

``version_policy`` belongs to the model-level file only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctredge.config import config_from_dict, config_to_dict
from ctredge.errors import ConfigError
from ctredge.onnxrt import PROVIDER_ALIASES

CONFIG_FILE = "config.json"
VERSION_POLICY_KINDS = ("latest", "specific", "all")


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@dataclass(frozen=True)
class DynamicBatching:
    """Server-side batching of concurrent requests (:mod:`ctredge.serve.batcher`)."""

    enabled: bool = True
    max_batch_rows: int = 4096
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"dynamic_batching.enabled: expected true or false, got {self.enabled!r}")
        for name, low in (("max_batch_rows", 1), ("max_queue_delay_us", 0), ("max_queue_size", 1)):
            if not _is_int(getattr(self, name), low):
                raise ConfigError(f"dynamic_batching.{name}: expected an integer >= {low}, "
                                  f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model load: the ``num_versions`` latest, ``specific`` ones, or ``all``."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in VERSION_POLICY_KINDS:
            raise ConfigError(f"version_policy.kind: expected one of {VERSION_POLICY_KINDS}, got {self.kind!r}")
        if not _is_int(self.num_versions, 1):
            raise ConfigError(f"version_policy.num_versions: expected an integer >= 1, got {self.num_versions!r}")
        if not isinstance(self.versions, tuple) or not all(_is_int(v, 1) for v in self.versions):
            raise ConfigError(f"version_policy.versions: expected a list of integers >= 1, got {self.versions!r}")
        if self.kind == "specific" and not self.versions:
            raise ConfigError("version_policy: kind 'specific' needs a non-empty 'versions' list")

    def select(self, available: list[int]) -> list[int]:
        """The versions of ``available`` this policy loads."""
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions:]


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost; every bound is checked before the work it bounds (schema in the module doc)."""

    max_elements: int = 1 << 22
    max_bytes_elements: int = 1 << 18
    max_bytes_payload: int = 8 << 20
    max_raw_value_bytes: int = 1024
    max_history_bytes: int = 16384
    hash_memo_bytes: int = 16 << 20
    max_explain_rows: int = 4096
    max_query_bytes: int = 512
    max_query_tokens: int = 64
    max_query_strings: int = 64

    def __post_init__(self) -> None:
        for name in ("max_elements", "max_bytes_elements", "max_bytes_payload", "max_raw_value_bytes",
                     "max_history_bytes", "hash_memo_bytes", "max_explain_rows", "max_query_bytes",
                     "max_query_tokens", "max_query_strings"):
            if not _is_int(getattr(self, name), 1):
                raise ConfigError(f"limits.{name}: expected an integer >= 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class ServingConfig:
    """How one model is served (``REPO/<model>/config.json``); the schema is in the module doc.

    Raises:
        ConfigError: a value out of range or of the wrong type, or (through
            :func:`serving_config_from_dict`) an unknown key.
    """

    max_batch_size: int = 4096
    providers: tuple[str, ...] = ("auto",)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    inline_max_rows: int = 16
    row_alignment: int = 4
    instances: int = 0
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    limits: RequestLimits = field(default_factory=RequestLimits)
    text_encoder: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if not _is_int(self.max_batch_size, 1):
            raise ConfigError(f"max_batch_size: expected an integer >= 1, got {self.max_batch_size!r}")
        providers = (self.providers,) if isinstance(self.providers, str) else self.providers
        if not isinstance(providers, tuple) or not providers or not all(isinstance(p, str) for p in providers):
            raise ConfigError(f"providers: expected \"auto\" or a non-empty list of names, got {self.providers!r}")
        if "auto" in providers and len(providers) > 1:
            raise ConfigError(f"providers: \"auto\" stands alone, got {list(providers)}")
        for p in providers:
            if p != "auto" and p.lower() not in PROVIDER_ALIASES and not p.endswith("ExecutionProvider"):
                raise ConfigError(f"providers: unknown provider {p!r}; expected \"auto\", one of "
                                  f"{sorted(PROVIDER_ALIASES)} or an ONNX Runtime name such as "
                                  f"'CUDAExecutionProvider'")
        object.__setattr__(self, "providers", providers)
        for name in ("intra_op_threads", "inter_op_threads"):
            if not _is_int(getattr(self, name), 0):
                raise ConfigError(f"{name}: expected an integer >= 0 (0 = ONNX Runtime decides), "
                                  f"got {getattr(self, name)!r}")
        if not _is_int(self.row_alignment, 1):
            raise ConfigError(f"row_alignment: expected an integer >= 1 (1 = no padding), got {self.row_alignment!r}")
        if not _is_int(self.instances, 0):
            raise ConfigError(f"instances: expected an integer >= 0 (0 = the server's worker count), "
                              f"got {self.instances!r}")
        if not _is_int(self.inline_max_rows, 0):
            raise ConfigError(f"inline_max_rows: expected an integer >= 0, got {self.inline_max_rows!r}")
        if not isinstance(self.allow_spinning, bool):
            raise ConfigError(f"allow_spinning: expected true or false, got {self.allow_spinning!r}")
        if not isinstance(self.notes, str):
            raise ConfigError(f"notes: expected a string, got {self.notes!r}")
        if not isinstance(self.text_encoder, str) or "/" in self.text_encoder or self.text_encoder in (".", ".."):
            raise ConfigError(f"text_encoder: expected the name of a model in the same repository, got "
                              f"{self.text_encoder!r}")
        if isinstance(self.dynamic_batching, dict):
            object.__setattr__(self, "dynamic_batching", config_from_dict(DynamicBatching, self.dynamic_batching))
        if isinstance(self.version_policy, dict):
            object.__setattr__(self, "version_policy", config_from_dict(VersionPolicy, self.version_policy))
        if isinstance(self.limits, dict):
            object.__setattr__(self, "limits", config_from_dict(RequestLimits, self.limits))
        if not isinstance(self.limits, RequestLimits):
            raise ConfigError(f"limits: expected an object, got {self.limits!r}")
        if not isinstance(self.dynamic_batching, DynamicBatching):
            raise ConfigError(f"dynamic_batching: expected an object, got {self.dynamic_batching!r}")
        if not isinstance(self.version_policy, VersionPolicy):
            raise ConfigError(f"version_policy: expected an object, got {self.version_policy!r}")


def serving_config_from_dict(data: dict[str, Any]) -> ServingConfig:
    """Build a :class:`ServingConfig` from JSON data; unknown keys (also nested) raise :class:`ConfigError`."""
    return config_from_dict(ServingConfig, data)


def serving_config_to_dict(cfg: ServingConfig) -> dict[str, Any]:
    """The JSON form of ``cfg`` (every key, nested objects as objects)."""
    return config_to_dict(cfg)


def write_serving_config(path: str | os.PathLike[str], cfg: ServingConfig) -> Path:
    """Write ``cfg`` as ``config.json``; ``path`` is the file or the model folder. Returns the file."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILE
    p.write_text(json.dumps(serving_config_to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return p


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_serving_config(model_dir: str | os.PathLike[str], version: int | None = None) -> ServingConfig:
    """The config of a model (``model_dir/config.json``), with a version folder's overrides merged.

    Raises:
        ConfigError: unreadable JSON, unknown keys, bad values, or a
            ``version_policy`` in a version-level file.
    """
    model_dir = Path(model_dir)
    data: dict[str, Any] = {}
    if (model_dir / CONFIG_FILE).is_file():
        data = _read_json(model_dir / CONFIG_FILE)
    if version is not None and (model_dir / str(version) / CONFIG_FILE).is_file():
        path = model_dir / str(version) / CONFIG_FILE
        over = _read_json(path)
        if "version_policy" in over:
            raise ConfigError(f"{path}: version_policy belongs in {model_dir / CONFIG_FILE}, not in a version folder")
        for k, v in over.items():
            if k == "dynamic_batching" and isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
    try:
        return serving_config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{model_dir / CONFIG_FILE}: {exc}") from exc


