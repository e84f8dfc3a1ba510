"""Typed dataclass configs: YAML/dict -> dataclass, dotted ``key=value`` overrides.

This is the project's one config machinery. It lives in ``core/``, the package every layer
(``model/``, ``stages/``, ``trainer/``, ``synth/``, ``pipeline/``) may import: it needs nothing but
the standard library and PyYAML. Every error names the offending key, the file it came from and what is accepted, and
is raised before any work starts.
"""
from __future__ import annotations

import contextvars
import dataclasses
import enum
import re
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config problem a user can fix: the message names the key, the file and the fix."""


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if get_origin(tp) in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if get_origin(tp) is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, source: str | None) -> Any:
    """Convert ``value`` to ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}{_where(source)}: {value!r} is not {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}{_where(source)}: expected a mapping of "
                              f"{[f.name for f in dataclasses.fields(tp)]}, got {value!r}")
        return from_dict(tp, value, source=source, prefix=key + ".")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}{_where(source)}: {value!r} is not valid; accepted: "
                              + ", ".join(repr(m.value) for m in tp)) from None
    if origin in (list, tuple):
        if isinstance(value, str) and get_args(tp) and get_args(tp)[0] is str:
            value = [value]          # a single path/pattern where a list of strings is expected
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}{_where(source)}: expected {_type_name(tp)}, got {value!r}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in get_args(tp):
            if len(value) != len(args):
                raise ConfigError(f"{key}{_where(source)}: expected {len(args)} items, got {value!r}")
            return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}{_where(source)}: expected a mapping, got {value!r}")
        args = get_args(tp)
        if len(args) == 2:
            # null removes an entry (``data.sources.cc=null``) unless null is a value the mapping holds
            drop = not _accepts_none(args[1])
            return {_coerce(args[0], k, f"{key} (a key)", source): _coerce(args[1], v, f"{key}.{k}", source)
                    for k, v in value.items() if not (drop and v is None)}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}{_where(source)}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}{_where(source)}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            return float(value)         # YAML 1.1 reads 3e-4 (no dot) as a string
        raise ConfigError(f"{key}{_where(source)}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}{_where(source)}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}{_where(source)}: cannot read {value!r} as {_type_name(tp)}")


def _accepts_none(tp: Any) -> bool:
    return tp is Any or tp is type(None) or (get_origin(tp) in (Union, types.UnionType)
                                             and type(None) in get_args(tp))


_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict | None, source: str | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) mapping, checking every key and type."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}{_where(source)}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}{_where(source)}; accepted keys here: "
                          + ", ".join(prefix + k for k in fields))
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}{_where(source)}: {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check) and _VALIDATE.get():
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}{_where(source)}: {exc}") from None
    return obj


# A config that a program completes before use (``pipeline selftrain`` sets the trainer's output
# and sources) is read with validation deferred, completed with ``dataclasses.replace`` and then
# checked whole by ``validate_tree``.
_VALIDATE: contextvars.ContextVar[bool] = contextvars.ContextVar("core_config_validate", default=True)


def validate_tree(obj: Any, prefix: str = "", source: str | None = None) -> None:
    """Run ``validate()`` on ``obj`` and every dataclass inside it (fields, lists, dict values),
    innermost first; a ValueError becomes a ConfigError naming the key path."""
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            validate_tree(item, f"{prefix}[{i}].", source)
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            validate_tree(item, f"{prefix}{key}.", source)
        return
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        validate_tree(getattr(obj, f.name), f"{prefix}{f.name}.", source)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise ConfigError(f"{prefix.rstrip('.') or type(obj).__name__}{_where(source)}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain YAML/JSON-able structure (enums as values, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. ray.num_cpus=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        stripped = raw.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            # e.g. [data/{00000..00009}.tar]: braces are not YAML flow syntax here
            value = [item.strip() for item in stripped[1:-1].split(",") if item.strip()]
        else:
            value = raw
    return key.split("."), value


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides onto a nested dict (types are checked later).

    ``KEY=null`` on an entry of a typed mapping (``dict[str, SomeConfig]``, e.g.
    ``data.sources.cc=null``) removes that entry when the config is built (``from_dict``); on a
    field it sets the field to null."""
    data = dict(data or {})
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         validate: bool = True) -> T:
    """Load ``cls`` from a YAML file (optional) plus ``key=value`` overrides.

    ``validate=False`` checks keys and types only; the caller completes the config and then
    calls ``validate_tree``.
    """
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "overrides"
    if overrides:
        data = merge_overrides(data, overrides)
        source = f"{source} (with overrides)" if path is not None else "overrides"
    token = _VALIDATE.set(validate)
    try:
        return from_dict(cls, data, source=source)
    finally:
        _VALIDATE.reset(token)
