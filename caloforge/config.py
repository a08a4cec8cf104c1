"""Strict YAML <-> frozen dataclass configs.

Every job config is a frozen dataclass; YAML is only its serialisation. Loading is strict:
an unknown key, a missing required key or a value of the wrong type is a ``ConfigError``
(a ``ValueError``) naming the file and the dotted key path. ``--set a.b=c`` overrides are
parsed as YAML scalars and applied before validation, so they are checked like the file; a value that is not
valid YAML is a ``ConfigError`` too. A mapping that names one key twice is an error (plain YAML loaders keep
the last value silently).

Supported field types: bool, int, float, str, Path, Literal[...], Enum, nested dataclasses,
tuple[T, ...], tuple[T1, T2], list[T], dict[str, T], T | None.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names file and key."""


def _where(source: str, path: str) -> str:
    return f"{source}: {path or '<root>'}"


def _convert(value: Any, tp: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, source, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{_where(source, path)}: value {value!r} matches none of {tp}: {errors}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{_where(source, path)}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, path)}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, source, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{_where(source, path)}: {value!r} is not one of {[m.value for m in tp]}"
            ) from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(source, path)}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(source, path)}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "2e-3" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{_where(source, path)}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_where(source, path)}: expected str, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{_where(source, path)}: expected a path, got {value!r}")
        return Path(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{_where(source, path)}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], source, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{_where(source, path)}: expected {len(args)} items, got {len(value)}")
        return tuple(
            _convert(v, a, source, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{_where(source, path)}: expected a list, got {value!r}")
        return [_convert(v, args[0], source, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(source, path)}: expected a mapping, got {value!r}")
        return {
            _convert(k, args[0], source, f"{path}.<key>"): _convert(v, args[1], source, f"{path}.{k}")
            for k, v in value.items()
        }
    raise ConfigError(f"{_where(source, path)}: unsupported config type {tp!r}")


def _build(cls: type[T], data: Mapping[str, Any], source: str, path: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = _where(source, ".".join(p for p in (path, unknown[0]) if p))
        raise ConfigError(f"{where}: unknown key (allowed: {sorted(fields)})")
    kwargs = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], source, sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(source, sub)}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{_where(source, path)}: {exc}") from exc


def from_dict(cls: type[T], data: Mapping[str, Any], source: str = "<dict>") -> T:
    """Build a frozen config dataclass from a plain mapping, strictly."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return _build(cls, data, source, "")


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-serialisable form of a config (inverse of ``from_dict``)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming one key twice (the plain loader keeps the last
    value silently). Keys brought in by a ``<<`` merge may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def safe_load_strict(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_StrictLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value); a malformed value is a ConfigError."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    if not raw.strip():
        return parts, ""
    try:
        return parts, safe_load_strict(raw)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({detail})") from None


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a nested mapping (returns a new mapping)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = safe_load_strict(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus ``--set`` overrides."""
    data = read_yaml(path) if path is not None else {}
    overrides = list(overrides)
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with --set overrides)"
    return from_dict(cls, data, source)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """The standard trio of a config-driven command: --config, --set KEY=VALUE (repeatable), --dry-run."""
    parser.add_argument(
        "--config", default=default, help="YAML config file" + (f" (default {default})" if default else "")
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable), e.g. --set optim.lr=1e-4",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
