"""Typed errors shared by every stage.

Every error ctredge raises on purpose derives from :class:`CtrEdgeError`, so a
caller can catch the family, and carries a message that says what was expected
and what came.  Errors caused by another exception are raised ``from`` it.
"""

from __future__ import annotations


class CtrEdgeError(Exception):
    """Base class of every error ctredge raises on purpose."""


class SpecError(CtrEdgeError, ValueError):
    """A FeatureSpec (or a config) is malformed or does not fit the data."""


class DataError(CtrEdgeError, ValueError):
    """A click-log row cannot be read; the message names file and line."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ArtifactError(CtrEdgeError):
    """An artifact folder is missing, incomplete or was changed after it was written."""


class ValidationError(CtrEdgeError):
    """An exported or compressed model disagrees with its reference beyond tolerance."""


class ConfigError(CtrEdgeError, ValueError):
    """A stage config has unknown keys or values out of range."""
