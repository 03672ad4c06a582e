"""The model repository: folders, per-model ``config.json`` (``ServingConfig``), loading.

Layout (Triton-like)::

    REPO/<model>/config.json               optional ServingConfig for every version
    REPO/<model>/<version>/model.onnx      version: a positive integer folder name
    REPO/<model>/<version>/config.json     optional; its keys override the model's for this version

Every model is loaded at start, and reloaded by RepositoryModelLoad or polling
(see :class:`Repository`).  Which versions load is the model's
``version_policy`` (default: the latest one); a request without a version gets
the highest version that is ready.  A version that fails to load (unreadable
file, bad config, a FeatureSpec the graph does not follow, a failed warm-up) is
logged and listed by RepositoryIndex as ``UNAVAILABLE`` with the reason; the
others serve.

Each model's settings are its ``config.json``, a
:class:`ctredge.serving_config.ServingConfig` (schema there).
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ctredge.artifacts import MANIFEST, read_manifest
from ctredge.errors import ArtifactError, ConfigError, CtrEdgeError
from ctredge.features import METADATA_KEY, FeatureSpec
from ctredge.layout import MODEL_FILE, RepositoryLayout, is_model_name
from ctredge.serving_config import CONFIG_FILE, ServingConfig, VersionPolicy, read_serving_config
from ctredge.serve.codec import shown
from ctredge.serve.errors import GpuRequired, IntegrityError, LoadError, ModelNotFound, ModelUnavailable
from ctredge.serve.runtime import Runner, create_session
from ctredge.serve.signature import CtrSignature, PlainSignature, check_session
from ctredge.serve.stats import ModelStats

log = logging.getLogger("ctredge.serve")

READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"


# =========================================================================== models
@dataclass
class ModelVersion:
    """One ``REPO/<model>/<version>``: its state and, once loaded, its signature, runner and scheduler.

    ``scheduler``: :class:`~ctredge.serve.batcher.Scheduler`,
    ``await scheduler.predict(feeds, deadline) -> ({output: array}, Timing)``.
    ``fingerprint`` identifies the files it was loaded from, ``config`` the
    settings it was built with: a change of either rebuilds it on reload.
    ``reason`` is what clients see (no paths, no file contents); the server log
    has the details.
    """

    name: str
    version: int
    path: Path
    config: ServingConfig | None = None
    state: str = LOADING
    reason: str = ""
    signature: Any = None
    runner: Runner | None = None
    scheduler: Any = None
    provider: str = ""
    stats: ModelStats | None = None
    fingerprint: tuple = ()

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def spec(self) -> FeatureSpec | None:
        return getattr(self.signature, "spec", None)


def fingerprint(path: Path) -> tuple:
    """(name, size, mtime_ns) of every file under ``path`` (a model or version folder), sorted."""
    out = []
    for p in sorted(path.rglob("*")):
        try:
            if p.is_file():
                st = p.stat()
                out.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
        except OSError:
            continue
    return tuple(out)


def verify_files(mv: ModelVersion) -> dict[str, Any] | None:
    """Check the version's files against its ``manifest.json`` when it has one (``compress`` writes it).

    ``config.json`` is the operator's to edit and is not checked.  Returns the
    manifest, or None when the version has none.

    Raises:
        IntegrityError: the manifest is unreadable, or a listed file is missing or changed.
    """
    if not (mv.path / MANIFEST).is_file():
        return None
    try:
        return read_manifest(mv.path, unchecked=(CONFIG_FILE,))
    except ArtifactError as exc:
        raise IntegrityError(f"{mv.name} v{mv.version}: {exc}") from exc


def _log_int8_isa(manifest: dict[str, Any] | None, label: str) -> None:
    """Log the verdict on the int8 ISA a verified manifest records (:func:`ctredge.cpuinfo.int8_isa_check`)."""
    from ctredge.cpuinfo import int8_isa_check

    if manifest is None:
        return
    verdict = int8_isa_check(label, manifest)
    if verdict is not None:
        log.log(*verdict)


def public_reason(exc: BaseException) -> str:
    """What a client is told about a version that failed to load: the kind of failure, never paths or contents."""
    if isinstance(exc, ConfigError):
        return "its config.json is invalid (details in the server log)"
    if isinstance(exc, LoadError):
        return f"{exc.public} (details in the server log)"
    return "it failed to load (details in the server log)"


@dataclass(frozen=True)
class LoadSettings:
    """Server-wide settings applied while loading versions (from ``ServerOptions``).

    ``dynamic_batching``: None keeps each model's config, True/False forces it.
    ``max_concurrency``: runs of one model at once when its config says ``instances: 0``.
    ``providers``: None keeps each model's ``providers``, else overrides them (``--providers``).
    """

    require_gpu: bool = False
    intra_op_threads: int | None = None
    dynamic_batching: bool | None = None
    max_concurrency: int = 1
    providers: tuple[str, ...] | None = None


def load_version(mv: ModelVersion, *, executor: Executor | None = None, settings: LoadSettings | None = None,
                 on_execution: Callable[[ModelVersion, Any], None] | None = None) -> None:
    """Load one model version in the calling thread: files checked, session, signature, warm-up, scheduler.

    Sets ``mv`` READY.  ``mv.config`` is used when set, else read from disk.

    Raises:
        GpuRequired: ``require_gpu`` and the model would not run on a GPU provider.
        IntegrityError: its files do not match its manifest.
        LoadError / ConfigError / CtrEdgeError: the reason the version cannot serve.
    """
    from ctredge.serve.batcher import Scheduler

    settings = settings or LoadSettings()
    label = f"{mv.name} v{mv.version}"
    if not mv.fingerprint:
        mv.fingerprint = fingerprint(mv.path)
    cfg = mv.config if mv.config is not None else read_serving_config(mv.path.parent, mv.version)
    mv.config = cfg
    model_file = mv.path / MODEL_FILE
    if not model_file.is_file():
        raise LoadError(f"{label}: {model_file} is missing", f"its {MODEL_FILE} is missing")
    _log_int8_isa(verify_files(mv), label)
    threads = cfg.intra_op_threads if settings.intra_op_threads is None else settings.intra_op_threads
    providers = settings.providers or cfg.providers
    session, provider = create_session(str(model_file), providers=providers, intra_op_threads=threads,
                                       inter_op_threads=cfg.inter_op_threads, allow_spinning=cfg.allow_spinning,
                                       require_gpu=settings.require_gpu, label=label)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if METADATA_KEY in meta:
        try:
            spec = FeatureSpec.from_json(meta[METADATA_KEY])
        except CtrEdgeError as exc:
            raise LoadError(f"{label}: the FeatureSpec in its metadata is invalid: {exc}",
                            "the FeatureSpec in its metadata is invalid") from exc
        try:
            check_session(session, spec)
        except LoadError as exc:
            raise LoadError(f"{label}: {exc}", "its graph does not follow its FeatureSpec") from exc
        signature: Any = CtrSignature(spec, cfg.max_batch_size, cfg.limits,
                                      encoder=_text_encoder(mv, cfg, spec, label, threads))
    else:
        signature = PlainSignature(session, cfg.max_batch_size, cfg.limits)
    runner = Runner(session, name=mv.name, version=mv.version, provider=provider)
    try:
        out = runner.run(signature.warmup_feeds(seed=0))
    except Exception as exc:
        raise LoadError(f"{label}: warm-up inference failed: {exc}", "its warm-up inference failed") from exc
    batching = cfg.dynamic_batching
    if settings.dynamic_batching is not None and settings.dynamic_batching != batching.enabled:
        log.info("%s: dynamic batching forced %s by the server (config.json says %s)", label,
                 "on" if settings.dynamic_batching else "off", "on" if batching.enabled else "off")
        batching = replace(batching, enabled=settings.dynamic_batching)
    stats = ModelStats(mv.name, mv.version)
    scheduler = Scheduler(runner, batching, batchable=bool(signature.batched), alignment=cfg.row_alignment,
                          max_concurrency=cfg.instances or settings.max_concurrency,
                          inline_max_rows=cfg.inline_max_rows, executor=executor,
                          on_execution=(lambda e: on_execution(mv, e)) if on_execution else None)
    log.info("%s: warmed up (%s), %s; dynamic batching %s", label,
             ", ".join(f"{k} {list(v.shape)}" for k, v in out.items()),
             "ctredge FeatureSpec " + repr(spec.name) if signature.spec is not None else "plain ONNX model",
             (f"on (max {batching.max_batch_rows} rows, delay {batching.max_queue_delay_us} us, queue "
              f"{batching.max_queue_size}, {scheduler.max_concurrency} concurrent runs)")
             if scheduler.enabled else "off")
    mv.signature, mv.runner, mv.scheduler, mv.provider, mv.stats = signature, runner, scheduler, provider, stats
    mv.state, mv.reason = READY, ""


def _text_encoder(mv: ModelVersion, cfg: ServingConfig, spec: FeatureSpec, label: str, threads: int) -> Any:
    """The :class:`~ctredge.textenc.SentenceEncoder` named by ``cfg.text_encoder``, or None.

    The encoder is a model of the same repository (``REPO/<text_encoder>/<highest version>/``,
    model.onnx + tokenizer.json); its tokens are cut at ``limits.max_query_tokens``.

    Raises:
        LoadError: the config names an encoder that is missing or does not load, or names one
            for a model without request text features.
    """
    if not cfg.text_encoder:
        return None
    if not spec.request_text:
        raise LoadError(f"{label}: config.json names text_encoder {cfg.text_encoder!r}, but the model has no "
                        f"request text feature", "its text_encoder is set for a model without text features")
    from ctredge.textenc import SentenceEncoder

    folder = mv.path.parent.parent / cfg.text_encoder
    versions = sorted((int(p.name), p) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) \
        if folder.is_dir() else []
    if not versions:
        raise LoadError(f"{label}: its text encoder {cfg.text_encoder!r} has no version folder in {folder.parent}",
                        f"its text encoder {cfg.text_encoder!r} is missing")
    try:
        enc = SentenceEncoder(versions[-1][1], max_tokens=cfg.limits.max_query_tokens,
                              intra_op_threads=threads)
    except Exception as exc:
        raise LoadError(f"{label}: its text encoder {versions[-1][1]} does not load: {exc}",
                        f"its text encoder {cfg.text_encoder!r} does not load") from exc
    log.info("%s: text encoder %s (%d-d, at most %d tokens a query)", label, versions[-1][1], enc.dim,
             enc.max_tokens)
    return enc


@dataclass
class ModelScan:
    """What a model folder holds, read in one pass off the event loop (:meth:`Repository._scan`)."""

    found: dict[int, Path]
    folder: tuple  # fingerprint of the whole model folder
    versions: dict[int, tuple]  # fingerprint of each version folder
    configs: dict[int, ServingConfig | ConfigError]
    policy: VersionPolicy | ConfigError


class Repository:
    """All models of a repository folder: load, reload, unload, and find the version a request names.

    Reloads (:meth:`load_model`, from RepositoryModelLoad or polling) load and
    warm every new or changed version the policy selects before it takes
    traffic (changed: its files, or the config it would be built with); the
    versions it replaces stop taking new requests, finish the ones they have,
    and are released.  If a selected version fails to load, the versions
    already serving keep serving (logged) and the failed one is listed
    ``UNAVAILABLE`` with the reason.  Every filesystem walk, read and hash runs
    on a worker thread, never on the event loop.

    A model name is the name of an entry directly inside ``root``
    (:func:`is_model_name`); any other name is :class:`ModelNotFound` before the
    filesystem is touched, so no name a client sends reaches another folder.
    An entry may be a symbolic link the operator placed (the benchmarks build
    repositories of links): whoever writes the repository folder is trusted.
    """

    def __init__(self, root: str | os.PathLike[str], *, executor: Executor | None = None,
                 settings: LoadSettings | None = None, metrics: Any = None, drain_seconds: float = 30.0):
        self.root = Path(root)
        self.layout = RepositoryLayout(self.root)
        self.settings = settings or LoadSettings()
        self.executor = executor
        self.metrics = metrics
        self.drain_seconds = drain_seconds
        self.versions: dict[str, dict[int, ModelVersion]] = {}
        self.loaded = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._seen: dict[str, tuple] = {}  # model folder fingerprints at the last (re)load
        self._draining: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ the folder (worker threads)
    def model_dirs(self) -> list[Path]:
        """Model folders of the repository (hidden ones and names that cannot be models skipped).

        Raises :class:`LoadError` if ``root`` is not a folder.
        """
        if not self.root.is_dir():
            raise LoadError(f"model repository {self.root} is not a folder")
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and not is_model_name(p.name):
                log.warning("repository: folder %r skipped: a model name has only letters, digits and _ . -",
                            p.name)
        return [self.layout.model_dir(n) for n in self.layout.model_names()]

    def _model_dir(self, name: str) -> Path:
        """``root/name`` after checking it is a model folder inside ``root``; raises :class:`ModelNotFound`."""
        if not is_model_name(name):
            raise ModelNotFound(f"model {shown(name)} is not in the repository")
        path = self.layout.model_dir(name)
        if path.parent != self.root or not path.is_dir():  # a checked name is one entry of root, never more
            raise ModelNotFound(f"model {shown(name)} is not in the repository")
        return path

    def _scan(self, name: str) -> ModelScan:
        model_dir = self._model_dir(name)
        found = {v: self.layout.version_dir(name, v) for v in self.layout.versions(name)}
        try:
            policy: VersionPolicy | ConfigError = read_serving_config(model_dir).version_policy
        except ConfigError as exc:
            policy = exc
        configs: dict[int, ServingConfig | ConfigError] = {}
        for v in found:
            try:
                configs[v] = read_serving_config(model_dir, v)
            except ConfigError as exc:
                configs[v] = exc
        return ModelScan(found, fingerprint(model_dir), {v: fingerprint(p) for v, p in found.items()}, configs,
                         policy)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ------------------------------------------------------------------ loading
    async def load(self) -> None:
        """Load every model of the repository, one version at a time, off the event loop.

        Raises:
            GpuRequired: with ``require_gpu``, the first model that would not run on the GPU.
            LoadError: ``root`` is not a folder.
        """
        for model_dir in await self._in_thread(self.model_dirs):
            await self.load_model(model_dir.name, initial=True)
        self.loaded = True
        ready = [f"{m.name} v{m.version} ({m.provider})" for m in self.all() if m.ready]
        log.info("repository %s: %d version(s) ready: %s", self.root, len(ready), ", ".join(ready) or "none")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _set_state(self, mv: ModelVersion, state: str, reason: str = "") -> None:
        mv.state, mv.reason = state, reason
        if self.metrics is not None:
            self.metrics.state(mv.name, str(mv.version), state, mv.provider)

    def _on_execution(self, mv: ModelVersion, e: Any) -> None:
        if e.ok and mv.stats is not None:
            mv.stats.execution(e.rows, e.input_ns, e.infer_ns, e.output_ns)
        if e.ok and self.metrics is not None:
            self.metrics.execution(mv.name, str(mv.version), e.rows)

    async def load_model(self, name: str, *, initial: bool = False) -> list[str]:
        """(Re)load model ``name`` from its folder; returns the problems found (empty when all went well).

        New and changed versions that the policy selects are loaded and warmed
        first; only then does the model's version table switch, and the versions
        no longer served drain in the background.  The problems are safe to show
        a client (no paths, no file contents); the log has the details.

        Raises:
            ModelNotFound: ``name`` is not a model folder of the repository.
            GpuRequired: with ``require_gpu``.
        """
        if not is_model_name(name):  # before any lock or filesystem access
            raise ModelNotFound(f"model {shown(name)} is not in the repository")
        async with self._lock(name):
            return await self._load_model(name, initial)

    async def _load_model(self, name: str, initial: bool) -> list[str]:
        scan: ModelScan = await self._in_thread(self._scan, name)
        self._seen[name] = scan.folder
        current = self.versions.get(name, {})
        if not scan.found:
            log.warning("%s: no version folders (REPO/<model>/<version>/%s); skipped", self.root / name, MODEL_FILE)
            if current:
                await self._retire(name, list(current.values()), "its version folders were removed")
                self.versions.pop(name, None)
            return [f"{name}: no version folders"]
        if isinstance(scan.policy, ConfigError):
            return self._config_refused(name, current, scan, scan.policy)
        selected = scan.policy.select(list(scan.found))
        problems: list[str] = []
        new: dict[int, ModelVersion] = {}
        for v in sorted(scan.found):
            old = current.get(v)
            if v not in selected:
                continue
            cfg = scan.configs[v]
            if (old is not None and old.ready and old.fingerprint == scan.versions[v]
                    and isinstance(cfg, ServingConfig) and old.config == cfg):
                new[v] = old  # unchanged and serving
                continue
            mv = ModelVersion(name, v, scan.found[v], fingerprint=scan.versions[v])
            if isinstance(cfg, ConfigError):
                self._failed(mv, cfg)
            else:
                mv.config = cfg
                await self._load_version(mv)
            if not mv.ready:
                problems.append(f"v{v}: {mv.reason}")
            new[v] = mv
        failed = [v for v in selected if not new[v].ready]
        retire: list[ModelVersion] = []
        for v, old in current.items():
            if not old.ready or new.get(v) is old:
                continue
            if failed and (v not in new or not new[v].ready):
                # a selected version failed: what already serves keeps serving
                log.error("model %s: keeping v%d serving because v%s failed to load", name, v,
                          ", v".join(map(str, failed)))
                new[v] = old
                continue
            retire.append(old)
        for v, p in scan.found.items():
            if v not in new:
                new[v] = mv = ModelVersion(name, v, p)
                self._set_state(mv, UNAVAILABLE, "not selected by the version_policy")
        self.versions[name] = dict(sorted(new.items()))
        if retire:
            await self._retire(name, retire, "replaced" if not initial else "")
        if not initial:
            log.info("model %s reloaded: serving %s", name,
                     ", ".join(f"v{v}" for v in self.ready_versions(name)) or "nothing")
        return problems

    def _config_refused(self, name: str, current: dict[int, ModelVersion], scan: ModelScan,
                        exc: ConfigError) -> list[str]:
        serving = [mv for mv in current.values() if mv.ready]
        log.error("model %s: config refused: %s", name, exc)
        if serving:
            return [f"its config.json is invalid (details in the server log); keeping "
                    f"{', '.join(f'v{mv.version}' for mv in serving)} serving"]
        entries = {v: ModelVersion(name, v, p) for v, p in sorted(scan.found.items())}
        for mv in entries.values():
            self._set_state(mv, UNAVAILABLE, public_reason(exc))
        self.versions[name] = entries
        return [public_reason(exc)]

    def _failed(self, mv: ModelVersion, exc: BaseException) -> None:
        self._set_state(mv, UNAVAILABLE, public_reason(exc))
        if isinstance(exc, CtrEdgeError):
            log.error("model %s v%d failed to load: %s", mv.name, mv.version, exc)
        else:
            log.error("model %s v%d failed to load", mv.name, mv.version, exc_info=exc)

    async def _load_version(self, mv: ModelVersion) -> None:
        loop = asyncio.get_running_loop()
        self._set_state(mv, LOADING)
        try:
            await loop.run_in_executor(None, lambda: load_version(
                mv, executor=self.executor, settings=self.settings, on_execution=self._on_execution))
        except GpuRequired:
            raise
        except Exception as exc:  # one bad version never stops the others
            self._failed(mv, exc)
            return
        self._set_state(mv, READY)
        if self.metrics is not None and mv.scheduler is not None:
            self.metrics.track_queue(mv.name, str(mv.version), lambda s=mv.scheduler: s.queued)

    async def _retire(self, name: str, versions: list[ModelVersion], why: str) -> None:
        """Stop routing to ``versions``; they finish their requests in the background, then are released."""
        for mv in versions:
            if mv.scheduler is None:
                continue
            log.info("model %s v%d: draining (%s)", name, mv.version, why or "unloaded")
            task = asyncio.get_running_loop().create_task(self._drain(mv))
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)

    async def _drain(self, mv: ModelVersion) -> None:
        drained = await mv.scheduler.drain(self.drain_seconds)
        if not drained:
            log.warning("model %s v%d: %d request(s) still running after %.0fs; releasing it anyway",
                        mv.name, mv.version, mv.scheduler.pending, self.drain_seconds)
        if self.metrics is not None:
            self.metrics.state(mv.name, str(mv.version), "UNAVAILABLE", mv.provider)
        mv.runner = None
        mv.scheduler = None
        log.info("model %s v%d: unloaded", mv.name, mv.version)

    async def unload_model(self, name: str) -> None:
        """Stop serving every version of ``name`` (RepositoryModelUnload); in-flight requests finish.

        Raises:
            ModelNotFound: the model is not in the repository.
        """
        if name not in self.versions:
            raise ModelNotFound(f"model {shown(name)} is not in the repository")
        async with self._lock(name):
            entries = self.versions.get(name)
            if entries is None:
                raise ModelNotFound(f"model {shown(name)} is not in the repository")
            serving = [mv for mv in entries.values() if mv.ready]
            for mv in serving:
                self._set_state(mv, UNAVAILABLE, "unloaded (RepositoryModelUnload)")
            await self._retire(name, serving, "RepositoryModelUnload")
            self._seen.pop(name, None)

    def _changes(self) -> tuple[list[str], list[str]]:
        """(names whose folder changed or is new, names whose folder is gone): one walk, on a worker thread."""
        dirs = {p.name: p for p in self.model_dirs()}
        changed = [n for n, p in dirs.items() if self._seen.get(n) != fingerprint(p)]
        return changed, [n for n in self.versions if n not in dirs]

    async def poll_once(self) -> list[str]:
        """Reload the models whose folders changed since the last look; load new ones, unload removed ones.

        Returns the names that were (re)loaded or unloaded.
        """
        try:
            changed, removed = await self._in_thread(self._changes)
        except LoadError as exc:
            log.error("polling: %s", exc)
            return []
        for name in changed:
            log.info("polling: %s changed on disk; reloading", name)
            try:
                await self.load_model(name)
            except Exception:
                log.exception("polling: reloading %s failed", name)
        for name in removed:
            log.info("polling: %s was removed from the repository; unloading", name)
            await self.unload_model(name)
            async with self._lock(name):
                self.versions.pop(name, None)
        return changed + removed

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
            raise ModelNotFound(f"model {shown(name)} is not in the repository; it has {self.names()}")
        if version == "":
            ready = self.ready_versions(name)
            if ready:
                return entries[ready[-1]]
            reasons = "; ".join(f"v{v}: {mv.state} {mv.reason}".strip() for v, mv in sorted(entries.items()))
            raise ModelUnavailable(f"model {shown(name)} has no ready version ({reasons})")
        try:
            v = int(version)
        except ValueError:
            raise ModelNotFound(f"model {shown(name)} has no version {shown(version)}; versions are integers, "
                                f"it has {sorted(entries)}") from None
        mv = entries.get(v)
        if mv is None:
            raise ModelNotFound(f"model {shown(name)} has no version {v}; it has {sorted(entries)}")
        if not mv.ready:
            raise ModelUnavailable(f"model {shown(name)} version {v} is {mv.state}: {mv.reason}")
        return mv

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether :meth:`get` would succeed (False for unknown models, as Triton answers)."""
        try:
            self.get(name, version)
            return True
        except (ModelNotFound, ModelUnavailable):
            return False
