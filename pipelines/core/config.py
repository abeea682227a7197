"""Typed configs: a YAML file plus `key=value` overrides, loaded into (nested) dataclasses.

Every job's config is a dataclass whose fields carry the documentation and whose `__post_init__`
validates values. This module only moves data from YAML/CLI into those classes, strictly: an
unknown key or a value of the wrong type is an error that names the key, where it came from and
what was expected, never a silent default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class _Override:
    """A CLI value: parsed with yaml.safe_load, but a `str` field takes the text as typed.

    Without this, `run_name=007` would arrive as the int 7 and `tag=1e3` as a float.
    """

    text: str
    parsed: Any


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    return build_config(cls, *load_raw(path, overrides))


def load_raw(path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """The YAML mapping with overrides applied (not yet typed) and a description of where it came from,
    for callers that fill in keys of their own before `build_config` (e.g. the DAG runner's wiring)."""
    source = str(path) if path is not None else "<defaults>"
    data = _read_yaml(path) if path is not None else {}
    for item in overrides:
        _apply_override(data, item)
    if overrides:
        source += f" + overrides {list(overrides)}"
    return data, source


def raw_value(value: Any) -> Any:
    """A value of the `load_raw` mapping as plain YAML data (a command-line override is held with its text)."""
    return value.parsed if isinstance(value, _Override) else value


def build_config(cls: type[T], data: dict[str, Any], source: str) -> T:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    return _build_dataclass(cls, data, prefix="", source=source)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain YAML/JSON types (tuples become lists) for saving next to output."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return _plain(dataclasses.asdict(cfg))


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nested sections)")
    try:
        parsed = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        node = child
    node[leaf] = _Override(text, parsed)


def _build_dataclass(cls: type[T], data: Any, prefix: str, source: str) -> T:
    section = prefix.rstrip(".") or "<top level>"
    if isinstance(data, _Override):
        data = data.parsed
    if not isinstance(data, dict):
        raise ConfigError(f"{section} in {source} must be a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        guess = did_you_mean(str(unknown[0]), cls)
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}" + (f" (did you mean {prefix}{guess}?)" if guess else "")
            + f" in {source}; valid keys for {section} ({cls.__name__}): {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{prefix}{name}", source)
        elif _has_no_default(fields[name]):
            raise ConfigError(f"missing required key {prefix}{name} in {source}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid {section} ({cls.__name__}) in {source}: {err}") from err


def config_keys(cls: type) -> list[str]:
    """Every dotted key of a config class, nested dataclasses flattened (`fetch.max_bytes`); a nested
    section's own name is listed too (`fetch`)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        out.append(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(f"{f.name}.{k}" for k in config_keys(hints[f.name]))
    return out


def did_you_mean(key: str, cls: type) -> str | None:
    """The key of `cls` (dotted, relative to it) a mistyped `key` most likely meant, or None.

    A near spelling of one of the section's own keys first (`epoch` -> `epochs`), then the same name
    or a near spelling deeper down (`max_bytes` -> `fetch.max_bytes`)."""
    keys = config_keys(cls)
    own = [k for k in keys if "." not in k]
    for pool in (own, keys):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.75)
        if match:
            return match[0]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    return leaves[match[0]] if match else None


def _has_no_default(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, prefix=f"{key}.", source=source)
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, key, source)
    raw = value.parsed if isinstance(value, _Override) else value
    if tp is Any:
        return raw
    if tp is str:
        if isinstance(value, _Override) and value.parsed is not None and not isinstance(value.parsed, (list, dict)):
            return value.text
        return _check(isinstance(raw, str), raw, tp, key, source)
    if tp is bool:
        return _check(isinstance(raw, bool), raw, tp, key, source)
    if tp is int:
        return _check(isinstance(raw, int) and not isinstance(raw, bool), raw, tp, key, source)
    if tp is float:
        ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
        return float(_check(ok, raw, tp, key, source))
    if origin is Literal:
        # type check too: True == 1 in Python, but Literal[1] should not accept `true`
        if not any(raw == a and type(raw) is type(a) for a in args):
            raise ConfigError(f"{key} in {source} must be one of {list(args)}, got {raw!r}")
        return raw
    if tp is list or origin is list:
        _check(isinstance(raw, list), raw, tp, key, source)
        item = args[0] if args else Any
        return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(raw)]
    if tp is tuple or origin is tuple:
        return _convert_tuple(tp, args, raw, key, source)
    if tp is dict or origin is dict:
        _check(isinstance(raw, dict), raw, tp, key, source)
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, f"{key}.<key>", source): _convert(vt, v, f"{key}.{k}", source) for k, v in raw.items()}
    raise ConfigError(f"{key} in {source}: config type {tp!r} is not supported by load_config")


def _convert_union(tp: Any, args: tuple, value: Any, key: str, source: str) -> Any:
    raw = value.parsed if isinstance(value, _Override) else value
    if raw is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key} in {source} must be {_type_name(tp)}, got null")
    errors = []
    for arm in args:
        if arm is type(None):
            continue
        try:
            return _convert(arm, value, key, source)
        except ConfigError as err:
            errors.append(str(err).replace(f"{key} in {source} ", ""))
    raise ConfigError(f"{key} in {source} must be {_type_name(tp)}, got {raw!r} ({'; '.join(errors)})")


def _convert_tuple(tp: Any, args: tuple, raw: Any, key: str, source: str) -> tuple:
    _check(isinstance(raw, (list, tuple)), raw, tp, key, source)
    if not args:
        return tuple(raw)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(raw))
    if len(raw) != len(args):
        raise ConfigError(f"{key} in {source} must have {len(args)} items ({_type_name(tp)}), got {raw!r}")
    return tuple(_convert(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, raw)))


def _check(ok: bool, raw: Any, tp: Any, key: str, source: str) -> Any:
    if not ok:
        raise ConfigError(f"{key} in {source} must be {_type_name(tp)}, got {raw!r} ({type(raw).__name__})")
    return raw


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
