"""Satellites (orbit + instrument + noise model) and named constellations.

A :class:`Satellite` is one observing instrument on one orbit: a nadir altimeter sampling
the sub-satellite point at ``sample_dt_s`` (1 Hz by default, 5.8-6.7 km on the ground
depending on altitude), or a SWOT-like swath (two swaths ``inner_km..outer_km`` either side
of nadir, pixels ``pixel_km`` across and along track). SWOT's interferometer swaths and its
nadir altimeter are two satellites sharing one orbit.

Presets (:data:`PRESETS`) mimic real missions; their altitude is *solved* from the repeat
cycle (:meth:`oceanda.obs.orbit.Orbit.exact_repeat`), the quoted altitude is only a check:

=============  ========  ===============  ==========  ==============================
preset         incl.     repeat           a - Re      mission
=============  ========  ===============  ==========  ==============================
``jason``      66.04     127 rev / 10 d   1336 km     Jason-1/2/3, 9.9156-day repeat
``sentinel3a`` 98.65     385 rev / 27 d    800 km     Sentinel-3A (a = 7177.9 km;
                                                      "814.5 km" is its mean height)
``sentinel3b`` 98.65     385 rev / 27 d    800 km     Sentinel-3B, 140 deg behind 3A
``saral``      98.55     501 rev / 35 d    781 km     SARAL/AltiKa, Envisat orbit
``cryosat2``   92.0      5344 rev / 369 d  715 km     CryoSat-2 (369 nodal days)
``swot``       77.6      292 rev / 21 d    890.5 km   SWOT KaRIn swaths, 20.86-day repeat
``swot_nadir`` 77.6      292 rev / 21 d    890.5 km   SWOT's nadir altimeter
=============  ========  ===============  ==========  ==============================

Constellations (:data:`CONSTELLATIONS`): ``4nadirs`` (jason, sentinel3a, saral, cryosat2:
the four nadir altimeters of the 2020a SSH mapping data challenge, "nadir4"), ``5nadirs``
(+ SWOT's nadir, "nadir5"), ``4nadirs_swot`` (4nadirs + SWOT swaths + SWOT nadir, the
challenge's "swot1nadir5"), and every preset alone by its name (``swot``: the swaths
only; ``swot_nadir``: SWOT's nadir altimeter only; SWOT as flown is
``["swot", "swot_nadir"]``). :func:`constellation` builds the list from a name or a config dict (the
``configs/obs/<name>.yaml`` files spell the same constellations out in full).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from oceanda.config_dataclass import from_mapping
from oceanda.errors import ConfigError
from oceanda.obs.orbit import Orbit


@dataclass(frozen=True)
class OrbitSpec:
    """Configuration of an exact-repeat circular orbit (see :class:`~oceanda.obs.orbit.Orbit`).

    Attributes:
        inclination_deg: orbit inclination [deg].
        repeat_revs, repeat_days: ``N`` revolutions in ``D`` nodal days; the semi-major axis
            is solved from them.
        raan_deg: ascending node at J2000 [deg]; ``None`` draws it from the seed.
        arglat_deg: argument of latitude at J2000 [deg]; ``None`` draws it from the seed.
        altitude_km: the mission's quoted altitude, for information only (not used).
    """

    inclination_deg: float
    repeat_revs: int
    repeat_days: int
    raan_deg: float | None = None
    arglat_deg: float | None = None
    altitude_km: float | None = None

    def build(self, raan_deg: float | None = None, arglat_deg: float | None = None) -> Orbit:
        """The :class:`Orbit`; phases given here override the spec's (used for ``None``)."""
        raan = self.raan_deg if self.raan_deg is not None else raan_deg
        arglat = self.arglat_deg if self.arglat_deg is not None else arglat_deg
        if raan is None or arglat is None:
            raise ConfigError("orbit phase (raan_deg / arglat_deg) is unset and no seed draw given")
        return Orbit.exact_repeat(
            self.inclination_deg, int(self.repeat_revs), int(self.repeat_days), raan, arglat
        )


@dataclass(frozen=True)
class Instrument:
    """What is sampled along the orbit.

    Attributes:
        kind: ``"nadir"`` (sub-satellite point) or ``"swath"`` (two swaths, no nadir point).
        sample_dt_s: time between along-track samples [s]; ``None`` for a swath means
            ``pixel_km`` along track (``pixel_km / ground speed``).
        inner_km, outer_km: swath edges, cross-track distance from nadir [km].
        pixel_km: swath pixel size across (and, by default, along) track [km]; pixel
            centres sit at ``inner_km + pixel_km/2, ..., outer_km - pixel_km/2``.
    """

    kind: str = "nadir"
    sample_dt_s: float | None = 1.0
    inner_km: float = 10.0
    outer_km: float = 60.0
    pixel_km: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("nadir", "swath"):
            raise ConfigError(f"instrument.kind must be 'nadir' or 'swath', got {self.kind!r}")
        if self.sample_dt_s is not None and not self.sample_dt_s > 0:
            raise ConfigError(f"instrument.sample_dt_s must be > 0, got {self.sample_dt_s}")
        if self.kind == "nadir" and self.sample_dt_s is None:
            raise ConfigError("instrument.sample_dt_s is required for a nadir altimeter")
        if self.kind == "swath":
            if not 0 <= self.inner_km < self.outer_km:
                raise ConfigError(
                    f"instrument swath needs 0 <= inner_km < outer_km, got "
                    f"{self.inner_km}, {self.outer_km}"
                )
            if not 0 < self.pixel_km <= self.outer_km - self.inner_km:
                raise ConfigError(f"instrument.pixel_km out of range: {self.pixel_km}")

    def pixel_offsets_km(self) -> tuple[float, ...]:
        """Cross-track pixel centres of one side [km], increasing."""
        if self.kind == "nadir":
            return (0.0,)
        n = int(round((self.outer_km - self.inner_km) / self.pixel_km))
        return tuple(self.inner_km + self.pixel_km * (k + 0.5) for k in range(n))

    def dt_s(self, orbit: Orbit) -> float:
        """Along-track sampling interval [s] on ``orbit``."""
        if self.sample_dt_s is not None:
            return float(self.sample_dt_s)
        return self.pixel_km * 1e3 / orbit.ground_speed_m_s


@dataclass(frozen=True)
class NoiseModel:
    """Observation errors [m]; every term is off when its amplitude is 0.

    Nadir altimeters:
        ``white_m``: std of independent errors per sample.
        ``ar1_m``, ``ar1_corr_km``: along-track correlated error, an AR(1) process along
            each pass with correlation ``exp(-distance / ar1_corr_km)`` and std ``ar1_m``.

    Swaths (simple KaRIn-like model, spectrum white at short and rising at long
    wavelengths):
        ``white_m``: std of the independent pixel noise at mid-swath; it grows
            quadratically to ``white_m * karin_edge_factor`` at the inner and outer edges
            (KaRIn's noise is lowest mid-swath).
        ``roll_m``, ``roll_corr_km``: roll-like error ``a(s) * x / 50 km`` (x the signed
            cross-track distance), ``a`` an along-track AR(1) with std ``roll_m`` (the
            error's std at 50 km from nadir) and correlation length ``roll_corr_km``.
        ``phase_m``, ``phase_corr_km``: phase-like error, one AR(1) offset per side.
    """

    white_m: float = 0.0
    ar1_m: float = 0.0
    ar1_corr_km: float = 100.0
    karin_edge_factor: float = 1.0
    roll_m: float = 0.0
    roll_corr_km: float = 1000.0
    phase_m: float = 0.0
    phase_corr_km: float = 2000.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not v >= 0:
                raise ConfigError(f"noise.{f.name} must be >= 0, got {v}")
        for name in ("ar1_corr_km", "roll_corr_km", "phase_corr_km"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"noise.{name} must be > 0")
        if self.karin_edge_factor < 1.0:
            raise ConfigError("noise.karin_edge_factor must be >= 1")


@dataclass(frozen=True)
class Satellite:
    """One instrument on one orbit (``name`` is its code in track tables)."""

    name: str
    orbit: OrbitSpec
    instrument: Instrument = field(default_factory=Instrument)
    noise: NoiseModel = field(default_factory=NoiseModel)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, as written in ``configs/obs/*.yaml``."""
        return asdict(self)


# ----------------------------------------------------------------------------- presets
def _nadir(
    name: str,
    inc: float,
    revs: int,
    days: int,
    raan: float,
    arglat: float,
    alt: float,
    white: float,
) -> Satellite:
    return Satellite(
        name,
        OrbitSpec(inc, revs, days, raan, arglat, alt),
        Instrument("nadir", 1.0),
        NoiseModel(white_m=white),
    )


# Phases: sun-synchronous nodes put at their mission's local time of the ascending node
# (Omega = sun's mean longitude at J2000 280.46 deg + 15 deg/h * (LTAN - 12 h)):
# Sentinel-3 LTAN 22:00, SARAL 18:00; the others are arbitrary but fixed.
_SWOT_ORBIT = OrbitSpec(77.6, 292, 21, 300.0, 200.0, 890.5)

PRESETS: dict[str, Satellite] = {
    "jason": _nadir("jason", 66.04, 127, 10, 150.0, 0.0, 1336.0, 0.02),
    "sentinel3a": _nadir("sentinel3a", 98.65, 385, 27, 70.46, 0.0, 814.5, 0.015),
    "sentinel3b": _nadir("sentinel3b", 98.65, 385, 27, 70.46, 140.0, 814.5, 0.015),
    "saral": _nadir("saral", 98.55, 501, 35, 10.46, 90.0, 781.5, 0.01),
    "cryosat2": _nadir("cryosat2", 92.0, 5344, 369, 200.0, 45.0, 717.0, 0.015),
    "swot_nadir": _nadir("swot_nadir", 77.6, 292, 21, 300.0, 200.0, 890.5, 0.015),
    "swot": Satellite(
        "swot",
        _SWOT_ORBIT,
        Instrument("swath", None, 10.0, 60.0, 2.0),
        NoiseModel(
            white_m=0.01,
            karin_edge_factor=1.5,
            roll_m=0.01,
            roll_corr_km=1000.0,
            phase_m=0.005,
            phase_corr_km=2000.0,
        ),
    ),
}

CONSTELLATIONS: dict[str, tuple[str, ...]] = {
    "4nadirs": ("jason", "sentinel3a", "saral", "cryosat2"),
    "5nadirs": ("jason", "sentinel3a", "saral", "cryosat2", "swot_nadir"),
    "4nadirs_swot": ("jason", "sentinel3a", "saral", "cryosat2", "swot", "swot_nadir"),
    **{name: (name,) for name in PRESETS},
}


def satellite(spec: str | Mapping[str, Any] | Satellite) -> Satellite:
    """A :class:`Satellite` from a preset name, a dict, or a dict ``{"preset": name, ...}``
    whose other keys (``name``, ``orbit``, ``instrument``, ``noise``) override the preset
    field by field."""
    if isinstance(spec, Satellite):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(f"unknown satellite {spec!r}; presets: {sorted(PRESETS)}")
        return PRESETS[spec]
    if not isinstance(spec, Mapping):
        raise ConfigError(f"a satellite is a name or a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    base = satellite(spec.pop("preset")) if "preset" in spec else None
    unknown = set(spec) - {"name", "orbit", "instrument", "noise"}
    if unknown:
        raise ConfigError(f"satellite: unknown key(s) {sorted(unknown)}")
    parts: dict[str, Any] = {}
    for key, cls in (("orbit", OrbitSpec), ("instrument", Instrument), ("noise", NoiseModel)):
        sub = dict(spec.get(key) or {})
        if base is not None:
            sub = {**asdict(getattr(base, key)), **sub}
        if key == "orbit" and not sub:
            raise ConfigError("satellite: 'orbit' is required without a preset")
        parts[key] = from_mapping(cls, sub, f"satellite.{key}")
    name = spec.get("name", base.name if base is not None else None)
    if not name:
        raise ConfigError("satellite: 'name' is required without a preset")
    return Satellite(str(name), **parts)


def constellation(name_or_cfg: str | Mapping[str, Any] | Sequence[Any]) -> list[Satellite]:
    """The satellites of a named constellation or of a config.

    Args:
        name_or_cfg: a name of :data:`CONSTELLATIONS` (``"4nadirs"``, ``"4nadirs_swot"``,
            ``"jason"``, ...); or a mapping with a ``satellites`` list (the content of
            ``configs/obs/<name>.yaml``; other keys such as ``name`` and ``description``
            are ignored); or the list itself. List entries are preset names or dicts
            (see :func:`satellite`).

    Returns:
        list of :class:`Satellite`; names must be unique (they are the track codes).
    """
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in CONSTELLATIONS:
            raise ConfigError(
                f"unknown observation set {name_or_cfg!r}; known: {sorted(CONSTELLATIONS)}"
            )
        entries: Sequence[Any] = CONSTELLATIONS[name_or_cfg]
    elif isinstance(name_or_cfg, Mapping):
        if "satellites" not in name_or_cfg:
            raise ConfigError("observation config needs a 'satellites' list")
        entries = name_or_cfg["satellites"]
    else:
        entries = name_or_cfg
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence) or not entries:
        raise ConfigError("observation config: 'satellites' must be a non-empty list")
    sats = [satellite(e) for e in entries]
    names = [s.name for s in sats]
    if len(set(names)) != len(names):
        raise ConfigError(f"observation config: satellite names must be unique, got {names}")
    return sats


def with_noise(satellites: Sequence[Satellite], enabled: bool) -> list[Satellite]:
    """The same satellites, noise-free when ``enabled`` is False."""
    return [s if enabled else replace(s, noise=NoiseModel()) for s in satellites]
