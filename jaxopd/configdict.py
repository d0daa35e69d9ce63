"""Frozen dataclasses <-> ml_collections ConfigDicts.

Config files and `--config.a.b=v` overrides (ConfigDicts) are the user's interface; the code receives frozen
dataclasses. `config_dict_of` turns a dataclass's defaults into the ConfigDict a config file starts from, so every key,
default and type is written once, on the dataclass. `from_config_dict` builds the dataclass back, checking every value
against its field's type (`Literal` choices included) and collecting every problem instead of stopping at the first.

Three conventions: a `dict[str, SomeDataclass]` field is a ConfigDict of named ConfigDicts (ml_collections keeps
them sorted by name), each checked as that dataclass; an `Optional[SomeDataclass]` field is a ConfigDict of that dataclass's fields whose required fields
are left unset (None) to mean "None" (so each field stays overridable from the command line); and a dataclass may name
nested dataclass fields in `FLATTENED` whose keys sit at its own level instead of in a sub-dict.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Mapping, Optional

import ml_collections
from ml_collections import config_dict


def config_dict_of(cls: type, instance: Any = None) -> ml_collections.ConfigDict:
    """Every field of dataclass `cls` as a ConfigDict, with the values of `instance` (default: the field defaults;
    None values and fields without a default become typed placeholders)."""
    result = ml_collections.ConfigDict()
    _fill(result, cls, _values_of(cls, instance))
    return result


def _values_of(cls: type, instance: Any) -> dict[str, Any]:
    if instance is None:
        return dataclass_defaults(cls)
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)}


def _fill(result: ml_collections.ConfigDict, cls: type, values: Mapping[str, Any]) -> None:
    hints = typing.get_type_hints(cls)
    flattened = getattr(cls, "FLATTENED", ())
    for field in dataclasses.fields(cls):
        value, hint = values.get(field.name), hints[field.name]
        if field.name in flattened:
            _fill(result, hint, _values_of(hint, value))
            continue
        inner = _optional_inner(hint)
        if dataclasses.is_dataclass(inner):
            nested = ml_collections.ConfigDict()
            _fill(nested, inner, _values_of(inner, value))
            result[field.name] = nested
        elif _named_dataclasses(inner):
            result[field.name] = ml_collections.ConfigDict(
                {name: config_dict_of(_named_dataclasses(inner), item) for name, item in (value or {}).items()})
        elif value is None:
            result[field.name] = config_dict.placeholder(_python_type(inner))
        else:
            result[field.name] = value


def from_config_dict(cls: type, values: Mapping[str, Any], problems: list[str], where: str = "config") -> Any:
    """The dataclass `cls` built from `values` (a ConfigDict or dict); each problem is appended to `problems` as one
    line naming the key and the fix, and the result is None when there was any."""
    values = values.to_dict() if isinstance(values, ml_collections.ConfigDict) else dict(values)
    hints = typing.get_type_hints(cls)
    flattened = getattr(cls, "FLATTENED", ())
    consumed, kwargs, before = set(), {}, len(problems)
    for field in dataclasses.fields(cls):
        if field.name in flattened:
            group = hints[field.name]
            names = {f.name for f in dataclasses.fields(group)}
            consumed |= names
            kwargs[field.name] = from_config_dict(group, {k: v for k, v in values.items() if k in names}, problems,
                                                  where)
            continue
        consumed.add(field.name)
        if field.name not in values:
            if _default(field) is dataclasses.MISSING:
                problems.append(f"{where}.{field.name} is missing: set it in the config file")
            continue
        kwargs[field.name] = _convert(hints[field.name], values[field.name], f"{where}.{field.name}", problems)
    for unknown in sorted(set(values) - consumed):
        problems.append(f"{where}.{unknown} is not a key of {cls.__name__}: remove it from the config file")
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:
        problems.append(f"{where}: {error}")
        return None


def check_choices(instance: Any, where: str = "config") -> None:
    """Raises ValueError naming the first `Literal` field of the dataclass `instance` whose value is not one of its
    choices (for dataclasses built in code rather than through from_config_dict)."""
    for name, hint in typing.get_type_hints(type(instance)).items():
        inner = _optional_inner(hint)
        value = getattr(instance, name, None)
        if typing.get_origin(inner) is Literal and value is not None and value not in typing.get_args(inner):
            raise ValueError(f"{where}.{name}={value!r} must be one of {', '.join(map(repr, typing.get_args(inner)))}")


def _convert(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    inner = _optional_inner(hint)
    optional = inner is not hint
    if value is None:
        if not optional:
            problems.append(f"{key} is None: it needs a value of type {_describe(hint)}")
        return None
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, Mapping):
            problems.append(f"{key}={value!r} must be a dict of {inner.__name__} fields")
            return None
        required = [f.name for f in dataclasses.fields(inner) if _default(f) is dataclasses.MISSING]
        if optional and required and all(value.get(name) is None for name in required):
            return None  # its required fields unset: the convention for "no such block" (module docstring)
        return from_config_dict(inner, value, problems, key)
    item_class = _named_dataclasses(inner)
    if item_class:
        if not isinstance(value, Mapping):
            problems.append(f"{key}={value!r} must be a dict of named {item_class.__name__} dicts")
            return None
        items = {str(name): _convert(item_class, item, f"{key}.{name}", problems) for name, item in value.items()}
        return items if all(item is not None for item in items.values()) else None
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            problems.append(f"{key}={value!r} must be one of {', '.join(map(repr, choices))}")
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (int, float, str, bool) and (not isinstance(value, inner) or (inner is int and isinstance(value, bool))):
        problems.append(f"{key}={value!r} must be of type {inner.__name__}")
    return value


def _named_dataclasses(hint: Any) -> Optional[type]:
    """D for dict[str, D] with D a dataclass, else None."""
    if typing.get_origin(hint) is dict:
        key, item = typing.get_args(hint)
        if key is str and dataclasses.is_dataclass(item):
            return item
    return None


def _optional_inner(hint: Any) -> Any:
    """X for Optional[X] (or X | None), else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _python_type(hint: Any) -> type:
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return hint if isinstance(hint, type) else object


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def dataclass_defaults(cls: type) -> dict[str, Optional[Any]]:
    """{field: default} of a dataclass, None for fields without one."""
    return {f.name: (None if _default(f) is dataclasses.MISSING else _default(f)) for f in dataclasses.fields(cls)}
