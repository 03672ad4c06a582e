"""Artifact folders and their ``manifest.json``.

Every stage writes a folder holding its files and a ``manifest.json`` that
records the stage, its config, the parent artifact's manifest hash, the sha256
and size of every file, library versions, the input/output signature, data
provenance and metrics.  :func:`read_manifest` verifies all of it before a
stage reads the folder, so a changed or missing file is an error, never a
silently different model.  :func:`staged_dir` writes into a temporary sibling
folder that is renamed into place only when the block succeeds.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from ctredge.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT = "ctredge.manifest/1"
DEFAULT_LIBRARIES = (
    "ctredge", "numpy", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime",
    "onnxruntime-gpu", "grpcio", "protobuf", "tritonclient",
)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def library_versions(names: tuple[str, ...] = DEFAULT_LIBRARIES) -> dict[str, str]:
    """Installed versions of ``names`` (distributions not installed are left out); never imports them."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _files_of(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(folder).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def write_manifest(
    folder: str | os.PathLike[str],
    *,
    stage: str,
    config: dict[str, Any] | None = None,
    parent: str | os.PathLike[str] | None = None,
    metrics: dict[str, Any] | None = None,
    signature: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file in ``folder`` and write its ``manifest.json``.

    ``parent`` is the parent artifact folder: its manifest is verified and its
    hash recorded.  Returns the manifest dict.

    Raises:
        ArtifactError: ``folder`` is not a directory, or the parent fails verification.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist")
    parent_info = None
    if parent is not None:
        pm = read_manifest(parent)
        parent_info = {"path": str(Path(parent)), "stage": pm["stage"], "manifest_sha256": manifest_hash(parent)}
    manifest = {
        "format": FORMAT,
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config or {},
        "parent": parent_info,
        "files": _files_of(folder),
        "libraries": library_versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count()},
        "signature": signature or {},
        "data": data or {},
        "metrics": metrics or {},
        "extra": extra or {},
    }
    with open(folder / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")
    return manifest


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def manifest_hash(folder: str | os.PathLike[str]) -> str:
    """sha256 of the folder's ``manifest.json`` bytes: the artifact's identity."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a ctredge artifact: {MANIFEST} is missing")
    return sha256_file(path)


def read_manifest(
    folder: str | os.PathLike[str], *, stage: str | tuple[str, ...] | None = None, verify: bool = True,
    unchecked: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Load and verify an artifact's manifest.

    Takes the folder, the expected stage(s), whether to re-hash the files, and
    the listed files not to re-hash (``unchecked``: e.g. a config the operator may
    edit).  Returns the manifest dict.

    Raises:
        ArtifactError: no manifest, unreadable JSON, wrong stage, or a listed file
            that is missing or whose size/sha256 changed since it was written.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a ctredge artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: expected format {FORMAT!r}, got {manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    if stage is not None:
        stages = (stage,) if isinstance(stage, str) else stage
        if manifest.get("stage") not in stages:
            raise ArtifactError(f"{folder}: expected an artifact of stage {' or '.join(stages)}, "
                                f"got stage {manifest.get('stage')!r}")
    if verify:
        problems = []
        for rel, info in manifest.get("files", {}).items():
            if rel in unchecked:
                continue
            fp = folder / rel
            if not fp.is_file():
                problems.append(f"{rel} is missing")
            elif fp.stat().st_size != info.get("bytes") or sha256_file(fp) != info.get("sha256"):
                problems.append(f"{rel} changed since the manifest was written (sha256 mismatch)")
        if problems:
            raise ArtifactError(f"artifact {folder} failed verification: " + "; ".join(problems))
    return manifest


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``final`` when the block succeeds.

    On an exception the temporary folder is removed and ``final`` is untouched.

    Raises:
        ArtifactError: ``final`` exists and ``overwrite`` is False.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
