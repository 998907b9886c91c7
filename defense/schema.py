"""Strict conversion of parsed YAML into frozen dataclasses.

Every config block, including each defense's ``Params``, is a dataclass; this module checks the
mapping against its fields: an unknown key names the key and lists the valid ones, a wrong type
names the field and the type expected, and ``__post_init__`` errors are reported with their path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from enum import Enum
from functools import cache
from typing import Any, Literal, Union

from .errors import ConfigError

_MISSING = dataclasses.MISSING


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " | ".join(repr(m.value) for m in tp)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin in (tuple, list):
        return "list"
    if origin in (dict, Mapping, typing.Mapping):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"must be {_type_name(tp)}, got null", path=path)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}", path=path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(next(c for c in choices if c == value)):
            return value
        hint = suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"invalid value {value!r}{hint}; valid: {', '.join(map(str, choices))}", path=path)
    if isinstance(tp, type) and issubclass(tp, Enum):
        valid = [m.value for m in tp]
        if value in valid:
            return tp(value)
        hint = suggest(value, valid) if isinstance(value, str) else ""
        raise ConfigError(f"invalid value {value!r}{hint}; valid: {', '.join(valid)}", path=path)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"must be a list, got {type(value).__name__} {value!r}", path=path)
        args = typing.get_args(tp)
        item = args[0] if args else Any
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis or origin is list:
            items = [convert(item, v, join(path, i)) for i, v in enumerate(value)]
        else:  # fixed-length tuple
            if len(value) != len(args):
                raise ConfigError(f"must be a list of {len(args)} items, got {len(value)}", path=path)
            items = [convert(a, v, join(path, i)) for i, (a, v) in enumerate(zip(args, value, strict=True))]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"must be a mapping, got {type(value).__name__} {value!r}", path=path)
        args = typing.get_args(tp) or (str, Any)
        out = {}
        for k, v in value.items():
            kk = convert(args[0], k, join(path, str(k)))
            out[kk] = convert(args[1], v, join(path, str(k)))
        return types.MappingProxyType(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"must be true or false, got {type(value).__name__} {value!r}", path=path)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"must be an integer, got {type(value).__name__} {value!r}", path=path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"must be a number, got {type(value).__name__} {value!r}", path=path)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"must be a string, got {type(value).__name__} {value!r}", path=path)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}", path=path)


def from_mapping(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, strictly."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"must be a mapping, got {type(data).__name__} {data!r}", path=path or "<top level>")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            where = f"in {path}" if path else "at the top level"
            name = str(key)
            raise ConfigError(
                f"unknown key {name!r} {where}{suggest(name, fields)}; valid keys: {', '.join(fields) or '(none)'}",
                path=join(path, name),
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], join(path, name))
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"required key {name!r} is missing", path=join(path, name))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e), path=path or "<top level>") from None


def to_mapping(obj: Any) -> Any:
    """The inverse, for printing a resolved config (enums as values, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_mapping(v) for k, v in obj.items()}
    return obj
