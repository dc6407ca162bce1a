"""Named domains (Gulf Stream data-challenge box, its training extent, North Atlantic).

``get_domain`` turns a name, or a mapping (e.g. a ``configs/domain/*.yaml`` entry or a
user's ``{lon_min, lon_max, lat_min, lat_max, resolution}``), into a :class:`Grid`.

==================  ===========================  ======  ===========
name                box (lon x lat, degrees)     res     cells
==================  ===========================  ======  ===========
``gulfstream``      -65..-55 x 33..43            1/20    200 x 200
``gulfstream_train``-66..-54 x 32..44            1/20    240 x 240
``natl``            -77..5 x 27..64              1/20    740 x 1640
==================  ===========================  ======  ===========

``gulfstream`` is the evaluation box of the 2020a SSH mapping data challenge (NATL60,
Gulf Stream); ``gulfstream_train`` adds a 1-degree margin for DAW patches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from oceanda.data.grid import Grid, box_shape
from oceanda.errors import ConfigError

#: name -> box and resolution (degrees). Cell counts are derived, see the module table.
DOMAINS: dict[str, dict[str, float]] = {
    "gulfstream": dict(lon_min=-65.0, lon_max=-55.0, lat_min=33.0, lat_max=43.0, resolution=0.05),
    "gulfstream_train": dict(lon_min=-66.0, lon_max=-54.0, lat_min=32.0, lat_max=44.0, resolution=0.05),
    "natl": dict(lon_min=-77.0, lon_max=5.0, lat_min=27.0, lat_max=64.0, resolution=0.05),
}

BOX_KEYS = ("lon_min", "lon_max", "lat_min", "lat_max")
#: keys of a domain mapping that are not part of the grid (descriptions, eval boxes, ...)
_META_KEYS = {"name", "description", "eval_box", "land"}


def domain_spec(name_or_dict: str | Mapping[str, Any]) -> dict[str, Any]:
    """The plain box spec ``{lon_min, lon_max, lat_min, lat_max, resolution, land}`` of a
    name or mapping (no grid is built). A mapping may carry ``name`` alone (a named
    domain), a name plus overrides (e.g. ``resolution``), or a full user box.
    """
    if isinstance(name_or_dict, str):
        spec: dict[str, Any] = {"name": name_or_dict}
    elif isinstance(name_or_dict, Mapping):
        spec = {str(k): v for k, v in name_or_dict.items()}
    else:
        raise ConfigError(f"domain: expected a name or a mapping, got {type(name_or_dict).__name__}")
    name = spec.get("name")
    base: dict[str, Any] = {}
    if name is not None and name not in DOMAINS and not all(k in spec for k in BOX_KEYS):
        raise ConfigError(f"domain={name!r}: unknown domain; one of {', '.join(DOMAINS)} "
                          f"or a box with {', '.join(BOX_KEYS)}, resolution")
    if name in DOMAINS:
        base = dict(DOMAINS[name])
    for key, value in spec.items():
        if key in BOX_KEYS or key == "resolution":
            base[key] = value
    missing = [k for k in (*BOX_KEYS, "resolution") if k not in base or base[k] is None]
    if missing:
        raise ConfigError(f"domain: missing key(s) {', '.join('domain.' + k for k in missing)}")
    unknown = set(spec) - set(BOX_KEYS) - {"resolution"} - _META_KEYS
    if unknown:
        raise ConfigError(f"domain: unknown key(s) {', '.join(sorted('domain.' + k for k in unknown))}")
    base["land"] = bool(spec.get("land", True))
    base["name"] = name if name is not None else "box"
    try:
        box_shape(*(base[k] for k in (*BOX_KEYS, "resolution")))
    except ConfigError as exc:
        raise ConfigError(f"domain {base['name']}: {exc}") from None
    return base


def get_domain(name_or_dict: str | Mapping[str, Any]) -> Grid:
    """Grid of a named domain (``gulfstream``, ``gulfstream_train``, ``natl``) or a user box.

    Args:
        name_or_dict: a domain name, or a mapping with ``lon_min, lon_max, lat_min,
            lat_max, resolution`` (degrees) and optionally ``land`` (default True: GLOBE
            land mask; False: all ocean) and ``name``.

    Raises:
        ConfigError: unknown name, missing/unknown key or a bad box (names the key).
    """
    spec = domain_spec(name_or_dict)
    try:
        return Grid.regular(spec["lon_min"], spec["lon_max"], spec["lat_min"], spec["lat_max"],
                            spec["resolution"], land=spec["land"])
    except ConfigError as exc:
        raise ConfigError(f"domain {spec['name']}: {exc}") from None
