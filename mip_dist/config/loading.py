"""Loading the run configuration: YAML files with `_base_` inheritance, `key.sub=value` overrides, type checks
that name the key, and the resolved config written back as YAML."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mip_dist.config.sections import Config, ConfigError


def _type_name(tp: Any) -> str:
    """Readable name of a type hint for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the declared field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                if isinstance(value, (list, tuple)) and typing.get_origin(arg) in (list, tuple):
                    raise  # the list arm's own error names the bad entry
        names = " or ".join(_type_name(a) for a in args if a is not type(None))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _dataclass_item(key, value, tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


def _dataclass_item(key: str, value: Any, tp: type) -> Any:
    """A list entry that is a section of its own (a data.shards dataset): a mapping, or its first field alone."""
    item = tp()
    if not isinstance(value, dict):  # `data.shards=[a, b]`: paths, with every other field at its default
        value = {dataclasses.fields(tp)[0].name: value}
    _apply(item, value, key + ".")
    return item


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    """Write a nested dict into a dataclass tree, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; allowed here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value`, parsing the value as YAML (so 3, 1e-3, true, [1,2] keep their types)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict:
    """`a.b.c`, v -> {a: {b: {c: v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def validate(cfg: Config) -> Config:
    """Reject impossible values and combinations before any work starts (each section, then across)."""
    return cfg.validate()


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from defaults, an optional YAML file (with `_base_` inheritance) and overrides."""
    cfg = Config()
    if path is not None:
        for layer in _yaml_layers(Path(path)):
            _apply(cfg, layer)
    return _overridden(cfg, overrides)


def _overridden(cfg: Config, overrides: Optional[list[str]]) -> Config:
    """`key.sub=value` overrides applied in order, then the whole config validated."""
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
    return validate(cfg)


def _yaml_layers(path: Path, seen: Optional[set] = None) -> list[dict]:
    """A YAML file and its `_base_` chain, base first."""
    seen = seen or set()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through _base_")
    seen.add(path.resolve())
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    base = data.pop("_base_", None)
    layers = _yaml_layers(path.parent / base, seen) if base else []
    return layers + [data]


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for saving the resolved config."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(dataclasses.asdict(cfg))


def from_dict(data: dict, overrides: Optional[list[str]] = None) -> Config:
    """Rebuild and validate a Config from `to_dict` output (e.g. a checkpoint's saved config), then overrides."""
    cfg = Config()
    _apply(cfg, data)
    return _overridden(cfg, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
