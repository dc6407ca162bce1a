"""Registry of assimilation methods for ``oceanda infer``: name -> factory.

Methods register themselves with :func:`register`; :func:`build_method` builds one by name
from config keyword arguments, importing the module that defines it on first use (so the
registry does not import every method's dependencies up front)::

    @register("oi")
    class OptimalInterpolation: ...

    method = build_method("oi", Lx_km=100.0)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from oceanda.errors import ConfigError

#: name -> factory (class or function returning a :class:`~oceanda.assim.base.Method`)
_REGISTRY: dict[str, Callable[..., Any]] = {}

#: name -> module that registers it when imported (first-use import)
_MODULES: dict[str, str] = {
    "oi": "oceanda.assim.oi",
    "identity": "oceanda.assim.identity",
    "spde_oi": "oceanda.assim.spde_oi",
    "4dvarnet": "oceanda.assim.fourdvarnet",
    "spde_4dvarnet": "oceanda.assim.spde_fourdvarnet",
}


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class/function decorator registering a method factory under ``name``."""

    def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def available() -> list[str]:
    """Names of methods that are registered or known to a module."""
    return sorted(set(_REGISTRY) | set(_MODULES))


def get(name: str) -> Callable[..., Any]:
    """The factory registered under ``name`` (imports its module on first use)."""
    if name not in _REGISTRY and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except ModuleNotFoundError as exc:
            raise ConfigError(f"method={name}: its module {_MODULES[name]} is not available "
                              f"({exc})") from None
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; one of: {', '.join(available())}")
    return _REGISTRY[name]


def build_method(name: str, **kwargs: Any) -> Any:
    """Build the method ``name`` with keyword arguments ``kwargs`` (from the config).

    Raises :class:`~oceanda.errors.ConfigError` naming the method and the argument when a
    keyword is unknown or missing.
    """
    factory = get(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"method={name}: {exc}") from None
    return factory(**kwargs)
