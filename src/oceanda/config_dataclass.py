"""Typed settings from plain dicts (what the apps pass from hydra configs)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from oceanda.errors import ConfigError

T = TypeVar("T")


def dataclass_from_dict(cls: type[T], d: dict[str, Any], what: str) -> T:
    """``cls(**d)`` for a dataclass ``cls``; unknown keys raise :class:`ConfigError`
    naming them and the known ones (``what`` names the settings, e.g. ``"model config"``)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    bad = sorted(set(d) - known)
    if bad:
        raise ConfigError(f"unknown {what} keys {bad}; known: {sorted(known)}")
    return cls(**d)
