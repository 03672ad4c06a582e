"""Frozen dataclass configs saved as JSON; loading rejects unknown keys.

Every stage describes its settings with one frozen dataclass (convention 1 of
DESIGN.md).  :func:`config_to_dict` / :func:`config_from_dict` turn such a
dataclass into plain JSON and back, refusing keys the dataclass does not have,
so a typo in a config file is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, TypeVar

from ctredge.errors import ConfigError

T = TypeVar("T")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a (possibly nested) dataclass instance."""
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from ``data``.

    Raises:
        ConfigError: ``data`` is not a dict, has keys ``cls`` does not define, or a
            value the dataclass constructor rejects.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown key(s) {unknown}; expected some of {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints.get(name)
        if isinstance(value, list) and _is_tuple_hint(hint):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def _is_tuple_hint(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_is_tuple_hint(a) for a in typing.get_args(hint))
    return False


def save_config(cfg: Any, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as indented JSON to ``path``."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config_to_dict(cfg), fh, indent=2, sort_keys=True)
        fh.write("\n")


def load_config(cls: type[T], path: str | os.PathLike[str]) -> T:
    """Read a JSON config written by :func:`save_config`.

    Raises:
        ConfigError: the file is missing, not JSON, or has unknown keys.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not valid JSON: {exc}") from exc
    return config_from_dict(cls, data)
