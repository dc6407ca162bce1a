"""Typed settings from plain dicts (what the apps pass from hydra configs).

:func:`from_mapping` builds a (possibly nested) dataclass from a mapping: unknown keys are
refused with their dotted path, missing mandatory keys are named, and each value is checked
against the field's annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``, unions,
``Literal``, ``tuple[int, int, int]``, ``tuple[X, ...]``, ``list[X]``, ``dict``, nested
dataclasses); lists become tuples where the field is a tuple. Value ranges are the
dataclass' own ``__post_init__``. The one place where a config mapping becomes typed.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from oceanda.errors import ConfigError

T = TypeVar("T")

__all__ = ["from_mapping", "check_value", "kwargs_for", "dataclass_from_dict"]


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "dict": "a mapping", "list": "a list", "tuple": "a list"}.get(tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return str(tp)


def check_value(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (converted: int -> float for a float,
    list -> tuple for a tuple, mapping -> dataclass); :class:`ConfigError` naming ``where``."""
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_mapping(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # an exact type match first (so that 1 stays an int in ``int | float``), then conversions
        for a in args:
            if isinstance(a, type) and type(value) is a:
                return value
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(a, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin is tuple or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
            items = [check_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [check_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or tp is tuple:
        if isinstance(value, (list, tuple)):
            return tp(value)
    elif tp is type(None):
        if value is None:
            return None
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return value
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # unresolvable annotation (e.g. a TYPE_CHECKING-only name): no type check
        return {}


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """The dataclass ``cls`` built from ``data`` (see the module docstring).

    ``where`` is the dotted prefix of the keys in messages (``"train"`` -> ``train.lr``).
    Keys listed in ``cls.IGNORED`` (a tuple class attribute) are accepted and dropped.
    """
    label = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping of {cls.__name__} keys, got {data!r}")
    flds = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    ignored = set(getattr(cls, "IGNORED", ()))
    prefix = f"{where}." if where else ""
    unknown = sorted(str(k) for k in data if k not in flds and k not in ignored)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(flds))}")
    missing = [n for n, f in flds.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(prefix + k for k in missing)}")
    hints = _hints(cls)
    kw = {k: check_value(hints.get(k, Any), v, prefix + k) for k, v in data.items() if k in flds}
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


def kwargs_for(func: Callable[..., Any], data: Any, where: str) -> dict[str, Any]:
    """``data`` checked as the keyword arguments of ``func`` (a function or class): unknown
    and missing ones named, each value checked against its annotation."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    params = {n: p for n, p in inspect.signature(func).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(str(k) for k in data if k not in params)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(f'{where}.{k}' for k in unknown)}; known: {', '.join(sorted(params))}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in data]
    if missing:
        raise ConfigError(f"missing key{'s' if len(missing) > 1 else ''} {', '.join(f'{where}.{k}' for k in missing)}")
    hints = _hints(func.__init__ if isinstance(func, type) else func)
    return {k: check_value(hints.get(k, Any), v, f"{where}.{k}") for k, v in data.items()}


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """``cls(**d)`` for a dataclass ``cls`` through :func:`from_mapping` (``what`` names the
    settings in messages, e.g. ``"model"``)."""
    return from_mapping(cls, d, what)
