"""The model repository's folder layout: the one place that knows where a model's files are.

A repository (Triton-like) is::

    REPO/index.json                          written by ``ctredge compress all``
    REPO/<model>/config.json                 optional ServingConfig for every version
    REPO/<model>/<version>/model.onnx        version: a positive integer folder name
    REPO/<model>/<version>/config.json       optional; overrides the model's for this version
    REPO/<model>/<version>/manifest.json     the variant's provenance and metrics

A model is a folder whose name does not start with ``.`` (``staged_dir``'s
temporary folders do); a version is a sub-folder named by a positive integer.
``compress all`` writes through :class:`RepositoryLayout`, and the benchmarks
(and the server) read through it, so every stage agrees on which models and
versions a repository holds.  Only the standard library: nothing is loaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctredge.artifacts import MANIFEST as MANIFEST_FILE
from ctredge.errors import ArtifactError
from ctredge.serving_config import CONFIG_FILE

MODEL_FILE = "model.onnx"
INDEX_FILE = "index.json"


@dataclass(frozen=True)
class ModelEntry:
    """The latest version of one model: name, version, path of its ``model.onnx``, bytes on disk.

    ``bytes`` counts every file of the version folder except ``manifest.json``
    (what serving the version costs on disk).
    """

    name: str
    version: int
    path: str
    bytes: int


@dataclass(frozen=True)
class RepositoryLayout:
    """Paths and listings of one model repository rooted at ``root`` (see the module docstring)."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    # ------------------------------------------------------------------ listing
    def require(self) -> "RepositoryLayout":
        """Return self.  Raises :class:`ArtifactError` when the repository folder does not exist."""
        if not self.root.is_dir():
            raise ArtifactError(f"model repository {self.root} does not exist")
        return self

    def model_names(self) -> list[str]:
        """Folder names of the repository's models, sorted (hidden folders skipped; none when it is missing)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and is_model_name(p.name))

    def versions(self, model: str, *, with_model_file: bool = False) -> list[int]:
        """Version numbers of ``model``, ascending; with ``with_model_file`` only those holding a ``model.onnx``."""
        folder = self.model_dir(model)
        if not folder.is_dir():
            return []
        found = [int(p.name) for p in folder.iterdir() if p.is_dir() and is_version_name(p.name)]
        if with_model_file:
            found = [v for v in found if self.model_path(model, v).is_file()]
        return sorted(found)

    def latest(self, model: str) -> int | None:
        """The highest version of ``model`` that holds a ``model.onnx``, or None."""
        versions = self.versions(model, with_model_file=True)
        return versions[-1] if versions else None

    def latest_models(self) -> list[ModelEntry]:
        """Every model with a servable version, at its latest version, in name order.

        Raises:
            ArtifactError: the repository folder does not exist.
        """
        self.require()
        out = []
        for name in self.model_names():
            version = self.latest(name)
            if version is not None:
                out.append(ModelEntry(name, version, str(self.model_path(name, version)),
                                      self.version_bytes(name, version)))
        return out

    # ------------------------------------------------------------------ paths
    def model_dir(self, model: str) -> Path:
        return self.root / model

    def version_dir(self, model: str, version: int) -> Path:
        return self.root / model / str(int(version))

    def model_path(self, model: str, version: int) -> Path:
        return self.version_dir(model, version) / MODEL_FILE

    def manifest_path(self, model: str, version: int) -> Path:
        return self.version_dir(model, version) / MANIFEST_FILE

    def config_path(self, model: str, version: int | None = None) -> Path:
        """``REPO/<model>/config.json``, or the version's own with ``version``."""
        folder = self.model_dir(model) if version is None else self.version_dir(model, version)
        return folder / CONFIG_FILE

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    # ------------------------------------------------------------------ sizes and the index
    def version_bytes(self, model: str, version: int, *, with_manifest: bool = False) -> int:
        """Bytes of every file under a version folder (``manifest.json`` only ``with_manifest``)."""
        folder = self.version_dir(model, version)
        return sum(f.stat().st_size for f in folder.rglob("*")
                   if f.is_file() and (with_manifest or f.name != MANIFEST_FILE))

    def read_index(self) -> dict[str, Any] | None:
        """``REPO/index.json`` as written by :meth:`write_index`, or None when absent.

        Raises:
            ArtifactError: the file exists but is not a JSON object.
        """
        if not self.index_path.is_file():
            return None
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{self.index_path} cannot be read as JSON: {exc}") from exc
        if not isinstance(index, dict):
            raise ArtifactError(f"{self.index_path}: expected a JSON object, got {type(index).__name__}")
        return index

    def write_index(self, index: dict[str, Any]) -> Path:
        """Write ``REPO/index.json`` (indented, newline-terminated); returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path.write_text(json.dumps(index, indent=2) + "\n")
        return self.index_path


MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def is_model_name(name: str) -> bool:
    """A model folder name: letters, digits and ``_ . -``, not starting with a dot, at most 128 characters.

    No separator, no ``..`` and no absolute path can pass, so a name that a
    client sends and that passes this check names an entry of the repository
    folder and nothing else (the server relies on it).
    """
    return isinstance(name, str) and MODEL_NAME.fullmatch(name) is not None


def is_version_name(name: str) -> bool:
    """A version folder name: a positive integer written in ASCII digits."""
    return name.isascii() and name.isdigit() and int(name) > 0


__all__ = ["MODEL_FILE", "MANIFEST_FILE", "CONFIG_FILE", "INDEX_FILE", "ModelEntry", "RepositoryLayout",
           "is_model_name", "is_version_name"]
