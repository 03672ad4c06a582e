"""The model repository: folders, per-model ``config.json`` (``ServingConfig``), loading.

Layout (Triton-like)::

    REPO/<model>/config.json               optional ServingConfig for every version
    REPO/<model>/<version>/model.onnx      version: a positive integer folder name
    REPO/<model>/<version>/config.json     optional; its keys override the model's for this version

Every model is loaded at start.  Which versions load is the model's
``version_policy`` (default: the latest one); a request without a version gets
the highest version that is ready.  A version that fails to load (unreadable
file, bad config, a FeatureSpec the graph does not follow, a failed warm-up) is
logged and listed by RepositoryIndex as ``UNAVAILABLE`` with the reason; the
others serve.

``config.json`` schema (every key optional; unknown keys are an error)::

    {
      "max_batch_size": 4096,          rows per request (and per batch), >= 1
      "providers": "auto",             "auto" (CUDA if this onnxruntime has it, then CPU) or a list,
                                       e.g. ["cuda", "cpu"] / ["CPUExecutionProvider"]
      "intra_op_threads": 1,           ONNX Runtime threads per Run
      "inter_op_threads": 1,
      "allow_spinning": false,         session.intra_op/inter_op.allow_spinning
      "inline_max_rows": 16,           requests up to this many rows run on the event-loop thread
                                       (no thread hop); larger ones on worker threads; 0 = never inline
      "dynamic_batching": {            (used by the batcher)
        "enabled": false,
        "max_batch_rows": 4096,        rows merged into one Run
        "max_queue_delay_us": 500,     how long the first request of a batch may wait
        "max_queue_size": 1024         requests waiting; beyond, RESOURCE_EXHAUSTED
      },
      "version_policy": {"kind": "latest", "num_versions": 1},
                                       or {"kind": "specific", "versions": [1, 3]}, or {"kind": "all"}
      "notes": ""                      free text, e.g. why batching is off
    }

``version_policy`` belongs to the model-level file only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctredge.config import config_from_dict, config_to_dict
from ctredge.errors import ConfigError, CtrEdgeError
from ctredge.features import METADATA_KEY, FeatureSpec
from ctredge.serve.errors import GpuRequired, LoadError, ModelNotFound, ModelUnavailable
from ctredge.serve.runtime import PROVIDER_ALIASES, Runner, create_session
from ctredge.serve.signature import CtrSignature, PlainSignature, check_session

log = logging.getLogger("ctredge.serve")

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"
VERSION_POLICY_KINDS = ("latest", "specific", "all")


def _is_int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@dataclass(frozen=True)
class DynamicBatching:
    """Server-side batching of concurrent requests (parsed now; the batcher uses it)."""

    enabled: bool = False
    max_batch_rows: int = 4096
    max_queue_delay_us: int = 500
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
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
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
        if not _is_int(self.inline_max_rows, 0):
            raise ConfigError(f"inline_max_rows: expected an integer >= 0, got {self.inline_max_rows!r}")
        if not isinstance(self.allow_spinning, bool):
            raise ConfigError(f"allow_spinning: expected true or false, got {self.allow_spinning!r}")
        if not isinstance(self.notes, str):
            raise ConfigError(f"notes: expected a string, got {self.notes!r}")
        if isinstance(self.dynamic_batching, dict):
            object.__setattr__(self, "dynamic_batching", config_from_dict(DynamicBatching, self.dynamic_batching))
        if isinstance(self.version_policy, dict):
            object.__setattr__(self, "version_policy", config_from_dict(VersionPolicy, self.version_policy))
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


# =========================================================================== models
@dataclass
class ModelVersion:
    """One ``REPO/<model>/<version>``: its state and, once loaded, its signature and predictor.

    ``predictor`` has ``async predict(feeds) -> {output: array}``: the runner
    itself, or a batcher in front of it.
    """

    name: str
    version: int
    path: Path
    config: ServingConfig | None = None
    state: str = LOADING
    reason: str = ""
    signature: Any = None
    runner: Runner | None = None
    predictor: Any = None
    provider: str = ""

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def spec(self) -> FeatureSpec | None:
        return getattr(self.signature, "spec", None)


def load_version(mv: ModelVersion, *, require_gpu: bool = False, intra_op_threads: int | None = None,
                 executor: Executor | None = None) -> None:
    """Load one model version in the calling thread: session, signature, warm-up; sets ``mv`` READY.

    Raises:
        GpuRequired: ``require_gpu`` and the model would not run on a GPU provider.
        LoadError / ConfigError / CtrEdgeError: the reason the version cannot serve.
    """
    label = f"{mv.name} v{mv.version}"
    cfg = mv.config if mv.config is not None else read_serving_config(mv.path.parent, mv.version)
    mv.config = cfg
    model_file = mv.path / MODEL_FILE
    if not model_file.is_file():
        raise LoadError(f"{label}: {model_file} is missing")
    threads = cfg.intra_op_threads if intra_op_threads is None else intra_op_threads
    session, provider = create_session(str(model_file), providers=cfg.providers, intra_op_threads=threads,
                                       inter_op_threads=cfg.inter_op_threads, allow_spinning=cfg.allow_spinning,
                                       require_gpu=require_gpu, label=label)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if METADATA_KEY in meta:
        try:
            spec = FeatureSpec.from_json(meta[METADATA_KEY])
        except CtrEdgeError as exc:
            raise LoadError(f"{label}: the FeatureSpec in its metadata is invalid: {exc}") from exc
        try:
            check_session(session, spec)
        except LoadError as exc:
            raise LoadError(f"{label}: {exc}") from exc
        signature: Any = CtrSignature(spec, cfg.max_batch_size)
    else:
        signature = PlainSignature(session, cfg.max_batch_size)
    runner = Runner(session, name=mv.name, version=mv.version, provider=provider, executor=executor,
                    inline_max_rows=cfg.inline_max_rows)
    try:
        out = runner.run(signature.warmup_feeds(seed=0))
    except Exception as exc:
        raise LoadError(f"{label}: warm-up inference failed: {exc}") from exc
    log.info("%s: warmed up (%s), %s", label, ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()),
             "ctredge FeatureSpec " + repr(spec.name) if signature.spec is not None else "plain ONNX model")
    mv.signature, mv.runner, mv.predictor, mv.provider = signature, runner, runner, provider
    mv.state, mv.reason = READY, ""


class Repository:
    """All models of a repository folder; :meth:`load` loads them, :meth:`get` finds one for a request."""

    def __init__(self, root: str | os.PathLike[str], *, require_gpu: bool = False,
                 intra_op_threads: int | None = None, executor: Executor | None = None):
        self.root = Path(root)
        self.require_gpu = require_gpu
        self.intra_op_threads = intra_op_threads
        self.executor = executor
        self.versions: dict[str, dict[int, ModelVersion]] = {}
        self.loaded = False

    def scan(self) -> list[ModelVersion]:
        """Find models and versions; mark the ones outside the version policy (or with a bad config).

        Returns the versions to load.  Raises :class:`LoadError` if ``root`` is not a folder.
        """
        if not self.root.is_dir():
            raise LoadError(f"model repository {self.root} is not a folder")
        to_load = []
        self.versions = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = {int(p.name): p for p in model_dir.iterdir()
                     if p.is_dir() and p.name.isdigit() and int(p.name) > 0}
            if not found:
                log.warning("%s: no version folders (REPO/<model>/<version>/%s); skipped", model_dir, MODEL_FILE)
                continue
            entries = {v: ModelVersion(model_dir.name, v, p) for v, p in sorted(found.items())}
            self.versions[model_dir.name] = entries
            try:
                policy = read_serving_config(model_dir).version_policy
            except ConfigError as exc:
                for mv in entries.values():
                    mv.state, mv.reason = UNAVAILABLE, str(exc)
                log.error("model %s cannot be served: %s", model_dir.name, exc)
                continue
            selected = policy.select(list(entries))
            for v, mv in entries.items():
                if v in selected:
                    to_load.append(mv)
                else:
                    mv.state, mv.reason = UNAVAILABLE, "not selected by the version_policy"
        return to_load

    async def load(self) -> None:
        """Scan and load every selected version, one at a time, off the event loop.

        Raises:
            GpuRequired: with ``require_gpu``, the first model that would not run on the GPU.
            LoadError: ``root`` is not a folder.
        """
        loop = asyncio.get_running_loop()
        for mv in self.scan():
            try:
                await loop.run_in_executor(None, lambda mv=mv: load_version(
                    mv, require_gpu=self.require_gpu, intra_op_threads=self.intra_op_threads,
                    executor=self.executor))
            except GpuRequired:
                raise
            except Exception as exc:  # one bad model never stops the others
                mv.state, mv.reason = UNAVAILABLE, str(exc)
                if isinstance(exc, CtrEdgeError):
                    log.error("model %s v%d failed to load: %s", mv.name, mv.version, exc)
                else:
                    log.exception("model %s v%d failed to load", mv.name, mv.version)
        self.loaded = True
        ready = [f"{m.name} v{m.version} ({m.provider})" for m in self.all() if m.ready]
        log.info("repository %s: %d version(s) ready: %s", self.root, len(ready), ", ".join(ready) or "none")

    # ------------------------------------------------------------------ lookups
    def all(self) -> list[ModelVersion]:
        """Every version found, by model name then version."""
        return [mv for name in sorted(self.versions) for _, mv in sorted(self.versions[name].items())]

    def names(self) -> list[str]:
        return sorted(self.versions)

    def ready_versions(self, name: str) -> list[int]:
        return sorted(v for v, mv in self.versions.get(name, {}).items() if mv.ready)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The version a request names, or the highest ready one for ``""``.

        Raises:
            ModelNotFound: no such model, or no such version folder.
            ModelUnavailable: the version (or every version) is not ready; the reason says why.
        """
        entries = self.versions.get(name)
        if entries is None:
            raise ModelNotFound(f"model {name!r} is not in the repository; it has {self.names()}")
        if version == "":
            ready = self.ready_versions(name)
            if ready:
                return entries[ready[-1]]
            reasons = "; ".join(f"v{v}: {mv.state} {mv.reason}".strip() for v, mv in sorted(entries.items()))
            raise ModelUnavailable(f"model {name!r} has no ready version ({reasons})")
        try:
            v = int(version)
        except ValueError:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions are integers, "
                                f"it has {sorted(entries)}") from None
        mv = entries.get(v)
        if mv is None:
            raise ModelNotFound(f"model {name!r} has no version {version}; it has {sorted(entries)}")
        if not mv.ready:
            raise ModelUnavailable(f"model {name!r} version {v} is {mv.state}: {mv.reason}")
        return mv

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether :meth:`get` would succeed (False for unknown models, as Triton answers)."""
        try:
            self.get(name, version)
            return True
        except (ModelNotFound, ModelUnavailable):
            return False
