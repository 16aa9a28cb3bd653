"""Typed configs from plain data (TOML/JSON) and back, with errors that name the bad key.

Every component's config is a dataclass; a run's config file is nested tables of their fields.
`build(cls, data)` checks names and types against the dataclass before anything runs.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or dict does not fit the typed config it should build."""


def build(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from nested dicts; tuples, nested configs and Literals are checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table of {cls.__name__} fields, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where or cls.__name__}: unknown key(s) {unknown}; {cls.__name__} takes {sorted(fields)}"
        )
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} fits none of {hint}: {'; '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else None
        if item is None and args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        kinds = [item] * len(value) if item is not None else list(args) or [Any] * len(value)
        return tuple(_convert(k, v, f"{where}[{i}]") for i, (k, v) in enumerate(zip(kinds, value)))
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of {args[1].__name__} tables, got {type(value).__name__}")
        return {key: build(args[1], item, f"{where}.{key}") for key, item in value.items()}
    if origin is dict or hint is Any or origin is list:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data for a config (what `build` reads back)."""
    return dataclasses.asdict(config)


def load_file(path: str) -> dict[str, Any]:
    """A config file as plain data: TOML (`.toml`) or JSON (`.json`); a syntax error names the file."""
    import json
    import tomllib

    if not path.endswith((".toml", ".json")):
        raise ConfigError(f"{path}: a config file is .toml or .json")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f) if path.endswith(".toml") else json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.rsplit('.', 1)[1].upper()}: {exc}") from None


def apply_override(data: dict[str, Any], assignment: str) -> dict[str, Any]:
    """`data` with one `dotted.key=value` override (a command line's `--set`), the value read as a TOML value
    (`3`, `1e-4`, `true`, `["a", "b"]`, `"text"`) or else taken as a bare string. Missing tables are created;
    whether the key exists is checked when the config is built."""
    import tomllib

    path, sep, text = assignment.partition("=")
    if not sep or not all(path.strip().split(".")):
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    return set_field(data, path.strip(), value)


def set_field(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """`data` with the field at `dotted.key` set to `value` (missing tables are created; whether the key exists
    is checked when the config is built)."""
    keys = dotted.split(".")
    out = dict(data)
    node = out
    for i, key in enumerate(keys[:-1]):
        child = node.get(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {'.'.join(keys[:i + 1])} is {child!r}, not a table")
        node[key] = dict(child)
        node = node[key]
    node[keys[-1]] = value
    return out
