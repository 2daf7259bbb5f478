"""Dataclasses from nested dicts (JSON / YAML), checked field by field.

The one builder behind every config of the project (``ModelConfig.from_dict``, the
training package's ``TrainConfig``): unknown keys, a section that is not a mapping and
a scalar of the wrong type are ``ConfigError``s naming the field, with the same wording
for every config. Nested sections and tuples follow the dataclass annotations.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from refvlm_core.errors import ConfigError

_SCALARS = (bool, int, float, str)


def dataclass_from_dict(cls: type, data: Any, root: str) -> Any:
    """``cls(**data)`` with nested dataclass sections built the same way.

    ``root`` names the whole config in messages ("config", "train config", a file name):
    ``"<root>.optim: unknown field(s) ['lrr']; known: [...]"``,
    ``"<root>: field optim.lr is '1e-4' (str); expected float"``.
    """
    return _build(cls, data, root, "")


def _build(cls: type, data: Any, root: str, prefix: str) -> Any:
    where = f"{root}.{prefix.rstrip('.')}" if prefix else root
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping (JSON object), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**{key: _value(hints[key], value, root, f"{prefix}{key}") for key, value in data.items()})


def _value(hint: Any, value: Any, root: str, name: str) -> Any:
    options = _union_members(hint)
    if value is None and type(None) in options:
        return None
    nested = [option for option in options if dataclasses.is_dataclass(option)]
    if nested:
        return _build(nested[0], value, root, f"{name}.")
    origins = {typing.get_origin(option) or option for option in options} - {type(None)}
    if tuple in origins and isinstance(value, (list, tuple)):
        return tuple(value)
    _check_type(origins, value, root, name, hint)
    return value


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _check_type(origins: set, value: Any, root: str, name: str, hint: Any) -> None:
    """Scalars and containers of the declared type (an int where a float is declared is
    fine; a bool is not a number); anything else annotated (Any, ...) passes."""
    allowed: set[type] = set()
    for origin in origins:
        if origin in _SCALARS:
            allowed |= {int, float} if origin is float else {origin}
        elif origin in (list, tuple):
            allowed |= {list, tuple}
        elif origin in (dict, Mapping):
            allowed.add(Mapping)
        else:
            return
    wrong = not isinstance(value, tuple(allowed)) or (isinstance(value, bool) and bool not in allowed)
    if allowed and wrong:
        shown = hint if isinstance(hint, str) else _hint_name(hint)
        raise ConfigError(f"{root}: field {name} is {value!r} ({type(value).__name__}); expected {shown}")


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
