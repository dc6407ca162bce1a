"""Orbits, ground tracks and swath geometry of oceanda.obs against closed forms and pyproj."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from pyproj import Geod

from oceanda import obs
from oceanda.errors import ConfigError, InputError
from oceanda.obs.orbit import DAY_S, MU_EARTH, OMEGA_EARTH, R_EARTH, Orbit

GEOD = Geod(ellps="WGS84")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "obs"
GULF = (-65.0, -55.0, 33.0, 43.0)
WIDE = (-80.0, -30.0, 20.0, 50.0)

# Mission values (not used by the code): repeat period [mean solar days], semi-major axis
# minus the equatorial radius [km] (Sentinel-3: a = 7177.93 km; CryoSat-2 "717 km" is a
# mean height above the ellipsoid, hence the wider tolerance).
MISSIONS = {
    "jason": (9.9156, 1336.3, 1.0),
    "sentinel3a": (27.0, 7177.93 - 6378.137, 1.0),
    "saral": (35.0, 781.5, 1.0),
    "cryosat2": (368.24, 717.0, 3.0),
    "swot": (20.864, 890.5, 1.0),
}


def _orbit(name: str) -> Orbit:
    return obs.orbits_for([obs.PRESETS[name]])[0]


def _t(days: float, dt: float = 1.0, start_days: float = 4700.0) -> np.ndarray:
    return start_days * DAY_S + np.arange(0.0, days * DAY_S, dt)


@pytest.mark.parametrize("name", sorted(MISSIONS))
def test_exact_repeat_orbit(name):
    o = _orbit(name)
    period_days, alt_km, tol_km = MISSIONS[name]
    assert o.repeat_period_s / DAY_S == pytest.approx(period_days, abs=0.01)
    assert o.altitude_km == pytest.approx(alt_km, abs=tol_km)
    # the ground track repeats after the cycle (to well below a metre) ...
    t = _t(0.3, dt=37.0)
    lon0, lat0 = o.ground_track(t)
    lon1, lat1 = o.ground_track(t + o.repeat_period_s)
    _, _, dist = GEOD.inv(lon0, lat0, lon1, lat1)
    assert dist.max() < 1.0
    # ... and not after a cycle off by one minute (the test can fail)
    lon2, lat2 = o.ground_track(t + o.repeat_period_s + 60.0)
    assert GEOD.inv(lon0, lat0, lon2, lat2)[2].min() > 100e3


def test_nodal_period_from_track_equator_crossings():
    o = _orbit("jason")
    t = _t(1.0, dt=0.5)
    _, lat = o.ground_track(t)
    up = np.flatnonzero((lat[:-1] < 0) & (lat[1:] >= 0))
    # linear interpolation of the crossing time
    tc = t[up] - lat[up] * (t[up + 1] - t[up]) / (lat[up + 1] - lat[up])
    assert np.diff(tc) == pytest.approx(o.nodal_period_s, abs=0.05)
    # J2 changes the period by < 0.3 % from Kepler's 2 pi sqrt(a^3/mu)
    kepler = 2 * math.pi * math.sqrt(o.semi_major_axis_m**3 / MU_EARTH)
    assert 0 < abs(o.nodal_period_s / kepler - 1) < 3e-3


@pytest.mark.parametrize("name", ["jason", "sentinel3a", "cryosat2", "swot"])
def test_inclination_is_max_latitude(name):
    o = _orbit(name)
    _, lat = o.ground_track(_t(0.2, dt=1.0))
    expected = min(o.inclination_deg, 180.0 - o.inclination_deg)
    assert np.abs(lat).max() == pytest.approx(expected, abs=1e-3)


def test_sun_synchronous_precession_measured_on_track():
    o = _orbit("sentinel3a")
    assert o.raan_rate_deg_per_day == pytest.approx(360.0 / 365.2422, rel=0.01)
    # measure it from the track: successive ascending nodes shift west by
    # (omega_E - Omega') T_node
    t = _t(1.0, dt=0.25)
    lon, lat = o.ground_track(t)
    up = np.flatnonzero((lat[:-1] < 0) & (lat[1:] >= 0))
    f = -lat[up] / (lat[up + 1] - lat[up])
    dlon = np.mod(lon[up + 1] - lon[up] + 180, 360) - 180
    lon_node = lon[up] + f * dlon
    tn = t[up] + f * 0.25
    shift = np.mod(np.diff(lon_node) + 180, 360) - 180  # deg per revolution, < 0
    rate = np.radians(shift) / np.diff(tn) + OMEGA_EARTH  # Omega' [rad/s]
    assert np.degrees(rate) * DAY_S == pytest.approx(0.9856, rel=0.01)
    # and the non-sun-synchronous Jason precesses the other way (~ -2 deg/day)
    assert _orbit("jason").raan_rate_deg_per_day == pytest.approx(-2.08, abs=0.05)


@pytest.mark.parametrize(
    "name,lo,hi", [("sentinel3a", 6.0, 7.0), ("saral", 6.0, 7.0), ("cryosat2", 6.0, 7.0),
                   ("swot_nadir", 6.0, 7.0), ("jason", 5.5, 6.2)]
)
def test_along_track_spacing(name, lo, hi):
    tr = obs.ground_tracks([obs.PRESETS[name]], "2013-01-01", "2013-01-02", WIDE)
    t = tr.time.astype(np.int64)
    same_pass = np.diff(t) == 1_000_000_000
    assert same_pass.sum() > 100
    _, _, d = GEOD.inv(tr.lon[:-1], tr.lat[:-1], tr.lon[1:], tr.lat[1:])
    d = d[same_pass] / 1e3
    assert lo < d.min() and d.max() < hi
    # the spacing is the ground speed within the few % that Earth rotation changes it
    v = _orbit(name).ground_speed_m_s / 1e3
    assert np.median(d) == pytest.approx(v, rel=0.05)


def test_ground_tracks_match_brute_force_and_chunking():
    sats = [obs.PRESETS["jason"], obs.PRESETS["cryosat2"]]
    t0 = np.datetime64("2013-03-01T00:00:00", "ns")
    tr = obs.ground_tracks(sats, t0, "2013-03-03", GULF)
    for code, sat in enumerate(sats):
        o = obs.orbits_for([sat])[0]
        k = np.arange(2 * 86400)
        ts = (t0 - obs.orbit.J2000).astype(np.int64) * 1e-9 + k
        lon, lat = o.ground_track(ts)
        inside = (lat >= 33) & (lat <= 43) & (lon >= -65) & (lon <= -55)
        mine = tr.time[tr.sat == code]
        assert inside.sum() > 100
        np.testing.assert_array_equal(mine, t0 + k[inside].astype("timedelta64[s]"))
    # chunking and the streaming iterator do not change the points
    tr2 = obs.ground_tracks(sats, t0, "2013-03-03", GULF, chunk_days=0.37, coarse_dt_s=7.0)
    np.testing.assert_array_equal(tr.time, tr2.time)
    np.testing.assert_array_equal(tr.lon, tr2.lon)
    chunks = obs.iter_ground_tracks(sats, t0, "2013-03-03", GULF, chunk_days=0.5)
    it = obs.TrackTable.concat(list(chunks))
    order = np.lexsort((it.time, it.sat))
    np.testing.assert_array_equal(it.time[order], tr.time)
    np.testing.assert_array_equal(it.lat[order], tr.lat)


def test_longitude_wrapping_across_dateline():
    sat = [obs.PRESETS["saral"]]
    tr = obs.ground_tracks(sat, "2013-01-01", "2013-01-04", (170.0, 200.0, -10.0, 10.0))
    assert len(tr) > 100
    assert tr.lon.min() >= 170 and tr.lon.max() <= 200
    assert (tr.lon > 180).any() and (tr.lon < 180).any()


def test_swot_swath_geometry():
    sat = obs.PRESETS["swot"]
    o = obs.orbits_for([sat])[0]
    tr = obs.ground_tracks([sat], "2013-01-01", "2013-01-01T12", WIDE)
    assert len(tr) > 1000
    x = tr.xtrack_km.astype(np.float64)
    assert np.all((np.abs(x) > 10) & (np.abs(x) < 60))
    np.testing.assert_allclose(np.unique(np.abs(x)), np.arange(11.0, 60.0, 2.0))
    ts = (tr.time - obs.orbit.J2000).astype(np.int64) * 1e-9
    nlon, nlat = o.ground_track(ts)
    az_pix, _, dist = GEOD.inv(nlon, nlat, tr.lon, tr.lat)
    np.testing.assert_allclose(dist / 1e3, np.abs(x), rtol=0, atol=0.001)  # < 1 m
    # positions agree with the exact geodesic (Geod.fwd per pixel) to < 1 m
    lo, la, _ = GEOD.fwd(nlon, nlat, o.heading(ts) + np.sign(x) * 90.0, np.abs(x) * 1e3)
    assert GEOD.inv(lo, la, tr.lon, tr.lat)[2].max() < 1.0
    # pixels sit perpendicular to the ground track, right side for x > 0
    heading, _, _ = GEOD.inv(*o.ground_track(ts - 0.5), *o.ground_track(ts + 0.5))
    rel = np.mod(az_pix - heading + 180.0, 360.0) - 180.0
    np.testing.assert_allclose(rel[x > 0], 90.0, atol=0.5)
    np.testing.assert_allclose(rel[x < 0], -90.0, atol=0.5)
    # pixels are ~2 km apart along track too
    edge = x == 59.0
    lo, la, tt = tr.lon[edge], tr.lat[edge], tr.time[edge].astype(np.int64)
    near = np.diff(tt) < 1e9
    d = GEOD.inv(lo[:-1], la[:-1], lo[1:], la[1:])[2][near] / 1e3
    assert near.sum() > 100
    assert np.median(d) == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_obs_configs_match_named_constellations(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["name"] == path.stem
    assert obs.constellation(cfg) == obs.constellation(path.stem)


def test_constellations_and_config_errors():
    names = [s.name for s in obs.constellation("4nadirs_swot")]
    assert names == ["jason", "sentinel3a", "saral", "cryosat2", "swot", "swot_nadir"]
    sat = obs.satellite({"preset": "jason", "noise": {"white_m": 0.05}, "name": "j2"})
    assert sat.name == "j2" and sat.noise.white_m == 0.05
    assert sat.orbit == obs.PRESETS["jason"].orbit
    with pytest.raises(ConfigError, match="unknown observation set"):
        obs.constellation("7nadirs")
    with pytest.raises(ConfigError, match="unknown satellite"):
        obs.constellation(["jason", "topex"])
    with pytest.raises(ConfigError, match="unknown key"):
        obs.constellation({"satellites": [{"preset": "jason", "noise": {"white": 1}}]})
    with pytest.raises(ConfigError, match="unique"):
        obs.constellation(["jason", "jason"])
    with pytest.raises(ConfigError, match="no circular orbit"):
        obs.Orbit.exact_repeat(66.0, 5, 10)
    with pytest.raises(InputError, match="bbox"):
        obs.ground_tracks(obs.constellation("jason"), "2013-01-01", "2013-01-02", (0, -10, 0, 10))
    with pytest.raises(InputError, match="after"):
        obs.ground_tracks(obs.constellation("jason"), "2013-01-02", "2013-01-01", GULF)


def test_unset_phases_are_drawn_from_seed():
    spec = {"name": "x", "orbit": {"inclination_deg": 66.04, "repeat_revs": 127, "repeat_days": 10}}
    sats = obs.constellation([spec, {**spec, "name": "y"}])
    a, b = obs.orbits_for(sats, seed=1)
    assert (a.raan_deg, a.arglat_deg) == (b.raan_deg, b.arglat_deg)  # same orbit spec
    c = obs.orbits_for(sats, seed=2)[0]
    assert (c.raan_deg, c.arglat_deg) != (a.raan_deg, a.arglat_deg)
    assert obs.orbits_for(sats, seed=1)[0] == a
    assert R_EARTH < a.semi_major_axis_m
