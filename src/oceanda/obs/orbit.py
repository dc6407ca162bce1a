"""Circular, J2-perturbed satellite orbits and their ground tracks.

The model is the classical secular (orbit-averaged) J2 theory for a circular orbit of
semi-major axis ``a`` and inclination ``i`` around a rotating Earth:

* mean motion                 ``n = sqrt(mu / a^3)``
* nodal precession            ``dOmega/dt = -3/2 n J2 (Re/a)^2 cos i``
* argument-of-latitude rate   ``du/dt = n [1 + 3/2 J2 (Re/a)^2 (4 cos^2 i - 1)]``
  (= dM/dt + domega/dt with ``dM/dt = n [1 + 3/4 J2 (Re/a)^2 (3 cos^2 i - 1)]`` and
  ``domega/dt = 3/4 n J2 (Re/a)^2 (5 cos^2 i - 1)``, e = 0)
* Earth rotation               ``dtheta/dt = omega_E`` (Greenwich mean sidereal angle)

so that ``u(t) = u0 + u' t``, ``Omega(t) = Omega0 + Omega' t`` and ``theta(t) = theta0 +
omega_E t``, with ``t`` in seconds since the J2000 epoch (2000-01-01T12:00 UT). The
sub-satellite point on a spherical Earth is

    lat = asin(sin u sin i),
    lon = Omega - theta + atan2(sin u cos i, cos u),

(latitude is the geocentric one; it differs from the geodetic latitude by < 0.2 deg, far
below what matters for sampling a 1/20 deg grid). ``lon``/``lat`` are then used as
coordinates on the WGS84 ellipsoid (pyproj ``Geod``) for distances and swath offsets.

Exact repeat orbits: a satellite's ground track repeats after ``N`` revolutions in ``D``
nodal days when ``N T_node = D T_nodal_day``, with the nodal period ``T_node = 2 pi / u'``
and the nodal day ``2 pi / (omega_E - Omega')``. :func:`repeat_semi_major_axis` solves this
for ``a`` (bisection; the relation is monotonic in ``a``), so the altitude is computed, not
hard-coded. The repeat period in seconds is ``N T_node``.

References: Vallado, *Fundamentals of Astrodynamics and Applications* (4th ed.), sec. 9.6
(J2 secular rates) and 11.4 (repeat ground tracks); Capderou, *Satellites: Orbits and
Missions* (2005), ch. 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from oceanda.errors import ConfigError

#: Earth's gravitational parameter [m^3 s^-2] (WGS84 / EGM96)
MU_EARTH = 3.986004418e14
#: equatorial radius [m] (WGS84)
R_EARTH = 6378137.0
#: second zonal harmonic (EGM2008, unnormalised)
J2 = 1.08262668e-3
#: Earth rotation rate relative to the mean equinox = GMST rate [rad s^-1]
OMEGA_EARTH = 7.2921158553e-5
#: reference epoch of orbit phases (J2000) and Greenwich mean sidereal angle there [deg]
J2000 = np.datetime64("2000-01-01T12:00:00", "ns")
GMST_J2000_DEG = 280.46061837
#: one mean solar day [s]
DAY_S = 86400.0


def _rates(a: float, inclination_deg: float) -> tuple[float, float, float]:
    """Mean motion ``n``, argument-of-latitude rate ``u'`` and nodal rate ``Omega'`` [rad/s]."""
    n = math.sqrt(MU_EARTH / a**3)
    k = J2 * (R_EARTH / a) ** 2
    c = math.cos(math.radians(inclination_deg))
    udot = n * (1.0 + 1.5 * k * (4.0 * c * c - 1.0))
    raan_rate = -1.5 * n * k * c
    return n, udot, raan_rate


def repeat_semi_major_axis(revs: int, days: int, inclination_deg: float) -> float:
    """Semi-major axis [m] of the circular orbit whose track repeats after ``revs``
    revolutions in ``days`` nodal days.

    Solves ``revs (omega_E - Omega'(a)) = days u'(a)`` by bisection on
    ``a in [Re + 150 km, Re + 6000 km]`` to machine precision.
    """
    if revs <= 0 or days <= 0:
        raise ConfigError(f"repeat cycle needs positive revolutions and days, got {revs}/{days}")

    def f(a: float) -> float:
        _, udot, raan_rate = _rates(a, inclination_deg)
        return revs * (OMEGA_EARTH - raan_rate) - days * udot

    lo, hi = R_EARTH + 150e3, R_EARTH + 6000e3
    flo, fhi = f(lo), f(hi)
    if flo * fhi > 0:
        raise ConfigError(
            f"no circular orbit between 150 and 6000 km altitude repeats after {revs} "
            f"revolutions in {days} days at inclination {inclination_deg} deg"
        )
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        fm = f(mid)
        if fm == 0.0 or hi - lo < 1e-7:
            break
        if (fm < 0) == (flo < 0):
            lo, flo = mid, fm
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Orbit:
    """A circular J2-perturbed orbit with its phase at J2000.

    Attributes:
        semi_major_axis_m: ``a`` [m].
        inclination_deg: ``i`` [deg] (> 90 is retrograde, e.g. sun-synchronous).
        raan_deg: right ascension of the ascending node ``Omega0`` at J2000 [deg].
        arglat_deg: argument of latitude ``u0`` at J2000 [deg] (0 = at the ascending node).
        repeat_revs, repeat_days: the exact-repeat cycle (``N`` revolutions in ``D`` nodal
            days) when the orbit was built by :meth:`exact_repeat`, else ``None``.
    """

    semi_major_axis_m: float
    inclination_deg: float
    raan_deg: float = 0.0
    arglat_deg: float = 0.0
    repeat_revs: int | None = None
    repeat_days: int | None = None

    @classmethod
    def exact_repeat(
        cls,
        inclination_deg: float,
        revs: int,
        days: int,
        raan_deg: float = 0.0,
        arglat_deg: float = 0.0,
    ) -> Orbit:
        """The circular orbit repeating after ``revs`` revolutions in ``days`` nodal days."""
        a = repeat_semi_major_axis(revs, days, inclination_deg)
        return cls(a, float(inclination_deg), float(raan_deg), float(arglat_deg), revs, days)

    # ----------------------------------------------------------------- derived rates
    @property
    def altitude_km(self) -> float:
        """``a - Re`` [km] (altitude above the equatorial radius, as quoted by missions)."""
        return (self.semi_major_axis_m - R_EARTH) / 1e3

    @property
    def arglat_rate(self) -> float:
        """``du/dt`` [rad/s] including the J2 correction."""
        return _rates(self.semi_major_axis_m, self.inclination_deg)[1]

    @property
    def raan_rate(self) -> float:
        """Nodal precession ``dOmega/dt`` [rad/s] (J2)."""
        return _rates(self.semi_major_axis_m, self.inclination_deg)[2]

    @property
    def raan_rate_deg_per_day(self) -> float:
        """Nodal precession [deg per mean solar day]; ~0.9856 when sun-synchronous."""
        return math.degrees(self.raan_rate) * DAY_S

    @property
    def nodal_period_s(self) -> float:
        """Time between two ascending-node crossings ``2 pi / u'`` [s]."""
        return 2.0 * math.pi / self.arglat_rate

    @property
    def repeat_period_s(self) -> float:
        """Exact-repeat period ``N T_node`` [s] (``NaN`` for a non-repeating orbit)."""
        if self.repeat_revs is None:
            return float("nan")
        return self.repeat_revs * self.nodal_period_s

    @property
    def ground_speed_max_m_s(self) -> float:
        """Upper bound of the sub-satellite point's speed on the ground [m/s]."""
        return (self.arglat_rate + OMEGA_EARTH + abs(self.raan_rate)) * R_EARTH

    @property
    def ground_speed_m_s(self) -> float:
        """Typical sub-satellite speed ``u' Re`` [m/s] (Earth rotation changes it by a few %)."""
        return self.arglat_rate * R_EARTH

    def angles(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Argument of latitude ``u`` and ``Omega - theta`` [rad] at ``t`` s since J2000."""
        t = np.asarray(t, dtype=np.float64)
        _, udot, raan_rate = _rates(self.semi_major_axis_m, self.inclination_deg)
        u0 = math.radians(self.arglat_deg)
        node0 = math.radians(self.raan_deg - GMST_J2000_DEG)
        # reduce the (large) phases modulo 2 pi before the trigonometry
        u = np.mod(u0 + udot * t, 2.0 * math.pi)
        node = np.mod(node0 + (raan_rate - OMEGA_EARTH) * t, 2.0 * math.pi)
        return u, node

    def ground_track(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sub-satellite ``(lon, lat)`` [deg] at ``t`` seconds since J2000.

        ``lon`` in [-180, 180), ``lat`` in [-i, i] (or [-(180 - i), 180 - i] if retrograde).
        """
        u, node = self.angles(t)
        inc = math.radians(self.inclination_deg)
        su, cu = np.sin(u), np.cos(u)
        lat = np.degrees(np.arcsin(su * math.sin(inc)))
        lon = np.degrees(node + np.arctan2(su * math.cos(inc), cu))
        lon = np.mod(lon + 180.0, 360.0) - 180.0
        return lon, lat

    def heading(self, t: np.ndarray, lat_deg: np.ndarray | None = None) -> np.ndarray:
        """Azimuth of the ground track [deg clockwise from north] at ``t`` s since J2000.

        Analytic: ``dlat/dt = u' cos u sin i / cos lat`` and
        ``dlon/dt = Omega' - omega_E + u' cos i / (cos^2 u + sin^2 u cos^2 i)``; the azimuth
        is ``atan2(N cos(lat) dlon, M dlat)`` with the WGS84 radii of curvature ``M``, ``N``.
        """
        u, _ = self.angles(t)
        inc = math.radians(self.inclination_deg)
        _, udot, raan_rate = _rates(self.semi_major_axis_m, self.inclination_deg)
        su, cu = np.sin(u), np.cos(u)
        if lat_deg is None:
            lat = np.arcsin(su * math.sin(inc))
        else:
            lat = np.radians(lat_deg)
        cl = np.cos(lat)
        dlat = udot * cu * math.sin(inc) / np.maximum(cl, 1e-12)
        ci = math.cos(inc)
        dlon = raan_rate - OMEGA_EARTH + udot * ci / (cu * cu + (su * ci) ** 2)
        e2 = 6.69437999014e-3
        w = 1.0 - e2 * np.sin(lat) ** 2
        m_rad = (1.0 - e2) / w**1.5
        n_rad = 1.0 / np.sqrt(w)
        return np.degrees(np.arctan2(n_rad * cl * dlon, m_rad * dlat))
