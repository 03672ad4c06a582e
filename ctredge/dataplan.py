"""Where an artifact's train/valid/test rows come from: the one home of the split rules.

A :class:`DataPlan` is what a ``train`` artifact's ``manifest.json`` records
under ``data``::

    {"files": [{"path": <absolute>, "sha256": ..., "bytes": ...}, ...],
     "parts": {"train": {"paths": [...], "split_part": "train" | None},
               "valid": {...}, "test": {...}},
     "split": {"seed": ..., "valid": ..., "test": ...} | None}

A part either is whole files (``split_part`` None) or the rows of the training
files that :class:`ctredge.reader.SplitSpec` assigns to it by ``(file_no,
line_no)``, ``file_no`` being the file's index within the part's ``paths``.
Training, pruning, ``compress all``, ``evaluate`` and the accuracy benchmark all
read their held-out rows through this class, so every AUC of the product is
computed on the same rows, and a data file that changed since training is an
error (:meth:`DataPlan.verify`), never a silently different test set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ctredge.artifacts import sha256_file
from ctredge.errors import ArtifactError, DataError
from ctredge.features import FeatureSpec
from ctredge.reader import (SPLIT_NAMES, Batch, ReadStats, SplitSpec, concat_batches, iter_batches, iter_raw,
                            read_all, to_batch)

PARTS = SPLIT_NAMES


@dataclass(frozen=True)
class DataFile:
    """One data file of a plan: its absolute path, content hash and size."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> "DataFile":
        """Hash the file at ``path``.  Raises :class:`DataError` when it is missing."""
        if not os.path.isfile(path):
            raise DataError(f"data file {path} is missing")
        return cls(os.path.abspath(path), sha256_file(path), os.path.getsize(path))


@dataclass(frozen=True)
class PartSource:
    """The files of one part and, when the part is carved out of them by the split, its name."""

    paths: tuple[str, ...]
    split_part: str | None = None


@dataclass
class HeldOut:
    """The rows of a plan, read: ``train`` is None when it is streamed from disk (too large for memory)."""

    train: Batch | None
    valid: Batch
    test: Batch

    @property
    def streamed(self) -> bool:
        return self.train is None


@dataclass(frozen=True)
class DataPlan:
    """Files (with sha256), parts and split of one artifact's data; see the module docstring.

    Build one with :meth:`from_files` (what ``ctredge train`` does) or
    :meth:`from_manifest`; :meth:`to_manifest` gives the JSON form back.
    """

    parts: Mapping[str, PartSource]
    split: SplitSpec | None = None
    files: tuple[DataFile, ...] = field(default=())

    # ------------------------------------------------------------------ building
    @classmethod
    def from_files(cls, data: Sequence[str], valid: Sequence[str] = (), test: Sequence[str] = (), *,
                   seed: int = 0, split_valid: float = 0.1, split_test: float = 0.1) -> "DataPlan":
        """The plan of ``ctredge train``: ``valid``/``test`` files when given, else split out of ``data``.

        The split (seed and fractions) covers only the parts not given as files;
        it is None when both are.  Files are hashed.

        Raises:
            DataError: a file is missing, or the fractions are out of range.
        """
        if not data:
            raise DataError("a data plan needs at least one training file")
        split = None
        if not (valid and test):
            split = SplitSpec(seed=seed, valid=0.0 if valid else split_valid, test=0.0 if test else split_test)
        parts = {}
        for part, files in (("train", data), ("valid", valid), ("test", test)):
            if files and part != "train":
                parts[part] = PartSource(tuple(files), None)
            else:
                parts[part] = PartSource(tuple(data), part if split is not None else None)
        paths = sorted({p for src in parts.values() for p in src.paths})
        return cls(parts, split, tuple(DataFile.of(p) for p in paths))

    @classmethod
    def from_manifest(cls, data: Mapping[str, Any] | None) -> "DataPlan":
        """The plan a manifest's ``data`` entry records.

        Raises:
            ArtifactError: the entry records no parts, or a part or the split is malformed.
        """
        data = data or {}
        if not isinstance(data.get("parts"), Mapping) or set(data["parts"]) != set(PARTS):
            raise ArtifactError(f"the manifest records no data plan: expected data.parts with {list(PARTS)}, "
                                f"got {sorted(data.get('parts') or [])}")
        try:
            parts = {k: PartSource(tuple(v["paths"]), v.get("split_part")) for k, v in data["parts"].items()}
            split = SplitSpec(**data["split"]) if data.get("split") else None
            files = tuple(DataFile(f["path"], f["sha256"], int(f["bytes"])) for f in data.get("files", []))
        except (KeyError, TypeError, ValueError, DataError) as exc:
            raise ArtifactError(f"the manifest's data plan is malformed: {exc}") from exc
        for name, src in parts.items():
            if src.split_part is not None and (split is None or src.split_part not in PARTS):
                raise ArtifactError(f"the manifest's data plan: part {name} is split part {src.split_part!r} "
                                    f"but the split is {data.get('split')!r}")
        return cls(parts, split, files)

    def to_manifest(self) -> dict[str, Any]:
        """The JSON form recorded under a manifest's ``data`` (see the module docstring)."""
        return {
            "files": [{"path": f.path, "sha256": f.sha256, "bytes": f.bytes} for f in self.files],
            "parts": {k: {"paths": list(v.paths), "split_part": v.split_part} for k, v in self.parts.items()},
            "split": None if self.split is None else {"seed": self.split.seed, "valid": self.split.valid,
                                                      "test": self.split.test},
        }

    # ------------------------------------------------------------------ files
    def recorded(self, path: str) -> DataFile | None:
        """The file record of a part path, or None.

        Part paths are kept as given to ``ctredge train`` (maybe relative to its
        working folder) and records hold absolute paths, so a record matches
        when it is the path's absolute form or the path as written, or else
        when it is the only record ending with that (normalized) relative path.
        """
        exact = [f for f in self.files if _matches(f, path)]
        if exact:
            return exact[0]
        tail = os.sep + os.path.normpath(path).lstrip(os.sep)
        ends = [f for f in self.files if os.path.normpath(f.path).endswith(tail)]
        return ends[0] if len(ends) == 1 else None

    def relocated(self, train_files: Sequence[str]) -> "DataPlan":
        """The same plan with the training files at new paths (the data moved); parts that share them follow.

        Raises:
            DataError: a different number of files than the training part has.
        """
        old = list(self.parts["train"].paths)
        if len(train_files) != len(old):
            raise DataError(f"data: the training part had {len(old)} file(s) {old}, "
                            f"got {len(train_files)}: {list(train_files)}")
        mapping = dict(zip(old, train_files))
        parts = {k: replace(v, paths=tuple(mapping.get(p, p) for p in v.paths)) for k, v in self.parts.items()}
        files = []
        for f in self.files:
            new = next((n for o, n in mapping.items() if _matches(f, o)), None)
            files.append(f if new is None else replace(f, path=os.path.abspath(new)))
        return DataPlan(parts, self.split, tuple(files))

    def verify(self) -> "DataPlan":
        """Check that every file of every part exists with the content recorded at training.

        Returns the plan with each file's record (absolute path, sha256, bytes)
        as found now.

        Raises:
            DataError: a file is missing or its sha256 differs from the recorded one
                (the held-out rows would differ).
        """
        paths = sorted({p for src in self.parts.values() for p in src.paths})
        found = []
        for p in paths:
            if not os.path.isfile(p):
                raise DataError(f"data file {p} is missing; give its new place if it moved")
            now = DataFile.of(p)
            rec = self.recorded(p)
            if rec is not None and rec.sha256 != now.sha256:
                raise DataError(f"data file {p} changed since training (sha256 {now.sha256[:12]}..., recorded "
                                f"{rec.sha256[:12]}...): the held-out rows would differ")
            found.append(now)
        return DataPlan(self.parts, self.split, tuple(found))

    # ------------------------------------------------------------------ reading
    def source(self, part: str) -> tuple[list[str], SplitSpec | None, str | None]:
        """``(paths, split, split part)`` of a part: what :func:`ctredge.reader.iter_batches` takes."""
        src = self.parts[part]
        if self.split is not None and src.split_part:
            return list(src.paths), self.split, src.split_part
        return list(src.paths), None, None

    def part_bytes(self, part: str) -> int:
        """Bytes on disk of the files a part is read from."""
        return sum(os.path.getsize(p) for p in self.parts[part].paths)

    def iter_part(self, part: str, spec: FeatureSpec, **kwargs: Any) -> Iterator[Batch]:
        """Stream one part in chunks (``kwargs``: :func:`ctredge.reader.iter_batches`'s options)."""
        paths, split, split_part = self.source(part)
        return iter_batches(paths, spec, split=split, part=split_part, **kwargs)

    def read(self, part: str, spec: FeatureSpec, *, skip_bad_rows: bool = False,
             stats: ReadStats | None = None) -> Batch:
        """Read one part (``train``/``valid``/``test``) into memory.  Raises what the reader raises."""
        paths, split, split_part = self.source(part)
        return read_all(paths, spec, skip_bad_rows=skip_bad_rows, stats=stats, split=split, part=split_part)

    def read_parts(self, spec: FeatureSpec, parts: Sequence[str] = PARTS, *, skip_bad_rows: bool = False,
                   stats: ReadStats | None = None) -> dict[str, Batch]:
        """Read several parts into memory, each distinct set of split files once.  Raises what the reader raises."""
        out: dict[str, Batch] = {}
        groups: dict[tuple[str, ...], list[str]] = {}
        for part in parts:
            src = self.parts[part]
            if src.split_part and self.split is not None:
                groups.setdefault(src.paths, []).append(part)
            else:
                out[part] = read_all(list(src.paths), spec, skip_bad_rows=skip_bad_rows, stats=stats)
        for paths, names in groups.items():
            rows = read_all(list(paths), spec, skip_bad_rows=skip_bad_rows, stats=stats)
            codes = self.split.codes(rows.file_no, rows.line_no)  # type: ignore[union-attr]
            for part in names:
                out[part] = rows.take(codes == SPLIT_NAMES.index(self.parts[part].split_part))  # type: ignore[arg-type]
        return {p: out[p] for p in parts}

    def read_held_out(self, spec: FeatureSpec, *, max_memory_bytes: int, skip_bad_rows: bool = False,
                      stats: ReadStats | None = None) -> HeldOut:
        """Valid and test rows in memory, and the train rows too unless their files exceed ``max_memory_bytes``.

        Raises:
            DataError: unreadable rows, or an empty valid/test part or one with a single class.
        """
        if self.part_bytes("train") > max_memory_bytes:
            held = HeldOut(None, *self.read_parts(spec, ("valid", "test"), skip_bad_rows=skip_bad_rows,
                                                  stats=stats).values())
        else:
            parts = self.read_parts(spec, skip_bad_rows=skip_bad_rows, stats=stats)
            held = HeldOut(parts["train"], parts["valid"], parts["test"])
        for part, batch in (("valid", held.valid), ("test", held.test)):
            if len(batch) == 0 or batch.labels.min() == batch.labels.max():
                raise DataError(f"the {part} part has {len(batch)} rows and needs both clicks and non-clicks; "
                                f"give more data or a larger split fraction")
        return held

    def test_rows_in(self, data_path: str | os.PathLike[str], sha256: str,
                     spec: FeatureSpec) -> tuple[Batch | None, dict[str, Any]]:
        """The plan's test rows that lie in the file ``data_path`` (identified by its content hash).

        Returns ``(batch, info)``: the batch is None when the file is not one of
        the test part's split files; ``info["rows_source"]`` says which case it is
        (``"test split"``, ``"test file"``, ``"training file"`` or ``"other file"``).
        """
        test = self.parts["test"]
        shas = [(self.recorded(p) or DataFile(p, "", 0)).sha256 for p in test.paths]
        if sha256 in shas and test.split_part and self.split is not None:
            k = shas.index(sha256)
            code = SPLIT_NAMES.index(test.split_part)
            chunks = []
            for raw in iter_raw(data_path, spec, file_no=k):
                raw = raw.take(self.split.codes(np.full(len(raw), k), raw.line_no) == code)
                if len(raw):
                    chunks.append(to_batch(raw, spec))
            split = {"seed": self.split.seed, "valid": self.split.valid, "test": self.split.test}
            return concat_batches(chunks, spec), {"rows_source": "test split", "split": {**split, "part": "test",
                                                                                   "file_no": k}}
        if sha256 in shas:
            return None, {"rows_source": "test file"}
        if any(f.sha256 == sha256 for f in self.files):
            return None, {"rows_source": "training file"}
        return None, {"rows_source": "other file"}


def _matches(record: DataFile, path: str) -> bool:
    return record.path in (os.path.abspath(path), path)


__all__ = ["PARTS", "DataFile", "PartSource", "HeldOut", "DataPlan"]
