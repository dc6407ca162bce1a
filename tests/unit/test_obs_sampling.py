"""Sampling, gridding, noise and selection operators of oceanda.obs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.interpolate import RegularGridInterpolator

from oceanda import obs
from oceanda.errors import InputError

GULF = (-65.0, -55.0, 33.0, 43.0)
WIDE = (-80.0, -30.0, 20.0, 50.0)
# the data challenge's evaluation grid: 1/20 deg, cell centred, 200 x 200
LON = -65.0 + 0.025 + 0.05 * np.arange(200)
LAT = 33.0 + 0.025 + 0.05 * np.arange(200)


def _table(n, rng, days=3, lon=(-65.2, -54.8), lat=(32.8, 43.2)):
    dt = rng.integers(0, days * 86400, n).astype("timedelta64[s]")
    t = np.datetime64("2013-01-01", "ns") + dt
    return obs.TrackTable(
        t,
        rng.uniform(*lon, n),
        rng.uniform(*lat, n),
        np.zeros(n, np.int16),
        np.zeros(n, np.float32),
        ("jason",),
    )


@pytest.mark.parametrize("block_cells", [1 << 24, 31])
def test_grid_tracks_equals_naive_loop(block_cells, monkeypatch):
    monkeypatch.setattr(obs.sampling, "_BLOCK_CELLS", block_cells)  # 31: one day per bincount
    rng = np.random.default_rng(0)
    lon = np.array([-65.0, -64.5, -64.0, -63.0, -62.0, -61.5])  # irregular centres
    lat = np.array([33.0, 34.0, 35.0, 35.5, 37.0])
    days = np.arange("2013-01-01", "2013-01-03", dtype="datetime64[D]")  # day 3 is not gridded
    tr = _table(150, rng, days=3, lon=(-66.0, -61.0), lat=(32.0, 38.0))
    v = rng.normal(size=len(tr))
    v[::17] = np.nan
    g, c = obs.grid_tracks(tr, v, lon, lat, days, dtype=np.float64, return_counts=True)
    le, ae = obs.cell_edges(lon), obs.cell_edges(lat)
    s = np.zeros(g.shape)
    n = np.zeros(g.shape, int)
    for p in range(len(tr)):
        d = (tr.time[p].astype("datetime64[D]") - days[0]).astype(int)
        if d >= len(days) or not np.isfinite(v[p]):
            continue
        for i in range(len(lon)):
            for j in range(len(lat)):
                if le[i] <= tr.lon[p] < le[i + 1] and ae[j] <= tr.lat[p] < ae[j + 1]:
                    s[d, j, i] += v[p]
                    n[d, j, i] += 1
    ref = np.where(n > 0, s / np.maximum(n, 1), np.nan)
    np.testing.assert_array_equal(c, n)
    np.testing.assert_allclose(g, ref, rtol=1e-12, equal_nan=True)
    assert np.isnan(g).any() and np.isfinite(g).any()


def test_bilinear_sampling_matches_scipy_and_linear_fields():
    rng = np.random.default_rng(1)
    days = np.arange("2013-01-01", "2013-01-04", dtype="datetime64[D]")
    f = rng.normal(size=(3, LAT.size, LON.size))
    tr = _table(3000, rng, days=3, lon=(LON[0], LON[-1]), lat=(LAT[0], LAT[-1]))
    y = obs.sample_daily_fields(tr, f, LON, LAT, days)
    d = (tr.day() - days[0]).astype(int)
    for k in range(3):
        ref = RegularGridInterpolator((LAT, LON), f[k])(np.stack([tr.lat, tr.lon], -1)[d == k])
        np.testing.assert_allclose(y[d == k], ref, rtol=1e-12)
    # linear in time: a field linear in (t, lon, lat) is reproduced exactly
    t_days = (tr.time - days[0].astype("datetime64[ns]")).astype(np.int64) / 86400e9
    day_num = days.astype(np.int64)[:, None, None]
    lin = 0.1 + 0.02 * day_num + 0.3 * LON[None, None, :] - 0.2 * LAT[None, :, None]
    yl = obs.sample_daily_fields(tr, lin, LON, LAT, days, time_interp="linear")
    t0 = days[0].astype(np.int64)
    expect = 0.1 + 0.02 * (t0 + np.clip(t_days, 0, 2)) + 0.3 * tr.lon - 0.2 * tr.lat
    np.testing.assert_allclose(yl, expect, rtol=1e-12)
    # sample() with a user function gives the same values as the daily fields
    def field_at(day, lo, la):
        return obs.bilinear(f[(day - days[0]).astype(int)], LON, LAT, lo, la)

    ys = obs.sample(tr, field_at)
    np.testing.assert_allclose(ys, y, rtol=1e-14)


def test_bilinear_land_and_outside():
    f = np.arange(12.0).reshape(3, 4)
    lon, lat = np.arange(4.0), np.arange(3.0)
    f[1, 1] = np.nan
    v = obs.bilinear(f, lon, lat, np.array([0.5, 1.0, 5.0, -0.4]), np.array([0.5, 1.0, 1.0, 0.0]))
    # corners (0,0)=0, (0,1)=1, (1,0)=4 with equal weights: NaN corner left out
    assert v[0] == pytest.approx((0 + 1 + 4) / 3)
    assert np.isnan(v[1])  # exactly on the land point
    assert np.isnan(v[2])  # outside the grid
    assert v[3] == pytest.approx(0.0)  # between the edge and the first centre: nearest
    with pytest.raises(InputError, match="no field"):
        tr = _table(10, np.random.default_rng(0), days=5)
        two_days = np.arange("2013-01-01", "2013-01-03", dtype="datetime64[D]")
        obs.sample_daily_fields(tr, np.zeros((2, 3, 4)), lon, lat, two_days)


def test_swath_screening_is_complete():
    sat = [obs.PRESETS["swot"], obs.PRESETS["sentinel3a"]]
    a = obs.ground_tracks(sat, "2013-01-07", "2013-01-07T12", GULF)
    b = obs.ground_tracks(sat, "2013-01-07", "2013-01-07T12", WIDE)
    inside = (b.lon >= -65) & (b.lon <= -55) & (b.lat >= 33) & (b.lat <= 43)
    assert len(a) > 1000
    np.testing.assert_array_equal(a.time, b.time[inside])
    np.testing.assert_array_equal(a.xtrack_km, b.xtrack_km[inside])
    np.testing.assert_allclose(a.lon, b.lon[inside], rtol=0, atol=1e-9)


def test_observed_fraction_gulfstream():
    days = np.arange("2013-01-01", "2013-01-11", dtype="datetime64[D]")
    frac = {}
    for name in ("4nadirs", "4nadirs_swot"):
        tr = obs.ground_tracks(obs.constellation(name), days[0], days[-1] + 1, GULF)
        g = obs.grid_tracks(tr, np.ones(len(tr)), LON, LAT, days)
        frac[name] = np.isfinite(g).mean()
    # 4 nadirs observe ~1-2 % of the 1/20 deg cells per day (1.4 % over a year); SWOT x5+
    assert 0.005 < frac["4nadirs"] < 0.05
    assert frac["4nadirs_swot"] > 4 * frac["4nadirs"]


def test_ar1_segments_matches_recursion():
    rng = np.random.default_rng(2)
    e = rng.normal(size=50)
    start = np.zeros(50, bool)
    start[[0, 7, 8, 30]] = True
    phi = 0.8
    x = obs.ar1_segments(e, phi, start)
    ref = np.empty(50)
    for k in range(50):
        ref[k] = e[k] if start[k] else phi * ref[k - 1] + math.sqrt(1 - phi**2) * e[k]
    np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-12)


def test_nadir_noise_statistics():
    noise = {"white_m": 0.02, "ar1_m": 0.03, "ar1_corr_km": 50.0}
    sat = obs.satellite({"preset": "sentinel3a", "noise": noise})
    white = obs.satellite({"preset": "sentinel3a", "noise": {"white_m": 0.02}})
    tr = obs.ground_tracks([sat], "2013-01-01", "2013-01-11", WIDE)
    e_white = obs.noise_values(tr, [white], seed=3)
    assert e_white.std() == pytest.approx(0.02, rel=0.03)
    assert abs(e_white.mean()) < 3 * 0.02 / math.sqrt(len(tr))
    e = obs.noise_values(tr, [sat], seed=3)
    assert e.std() == pytest.approx(math.hypot(0.02, 0.03), rel=0.05)
    corr = e - e_white  # the AR(1) part (same white draw: same seed, drawn first)
    t = tr.time.astype(np.int64)
    same = np.diff(t) == 1_000_000_000
    step = obs.orbits_for([sat])[0].ground_speed_m_s / 1e3
    r1 = np.corrcoef(corr[:-1][same], corr[1:][same])[0, 1]
    assert r1 == pytest.approx(math.exp(-step / 50.0), abs=0.01)
    # reproducible from the seed, different for another seed
    np.testing.assert_array_equal(obs.noise_values(tr, [sat], seed=3), e)
    assert not np.allclose(obs.noise_values(tr, [sat], seed=4), e)


def test_karin_noise_structure():
    base = obs.PRESETS["swot"]
    tr = obs.ground_tracks([base], "2013-01-01", "2013-01-02", WIDE)
    x = tr.xtrack_km.astype(np.float64)
    # white part: std grows from white_m mid-swath to edge_factor * white_m at the edges
    noise = {"white_m": 0.01, "karin_edge_factor": 2.0, "roll_m": 0, "phase_m": 0}
    w = obs.satellite({"preset": "swot", "noise": noise})
    e = obs.noise_values(tr, [w], seed=0)
    assert e[np.abs(x) == 35.0].std() == pytest.approx(0.01 * (1 + 1 * (0 / 25) ** 2), rel=0.05)
    assert e[np.abs(x) == 59.0].std() == pytest.approx(0.01 * (1 + (24 / 25) ** 2), rel=0.05)
    # roll part: linear across track, std roll_m at 50 km, smooth along track
    noise = {"white_m": 0, "roll_m": 0.02, "roll_corr_km": 30.0, "phase_m": 0}
    r = obs.satellite({"preset": "swot", "noise": noise})
    e = obs.noise_values(tr, [r], seed=0)
    t = tr.time.astype(np.int64)
    for tt in np.unique(t)[:50]:
        row = t == tt
        slope = e[row] / x[row]
        np.testing.assert_allclose(slope, slope[0], rtol=1e-9)
    right = x == 49.0
    assert e[right].std() == pytest.approx(0.02 * 49 / 50, rel=0.1)
    # phase part: one offset per side and row
    p = obs.satellite({"preset": "swot", "noise": {"white_m": 0, "roll_m": 0, "phase_m": 0.01}})
    e = obs.noise_values(tr, [p], seed=0)
    for tt in np.unique(t)[:50]:
        row = t == tt
        for side in (x < 0, x > 0):
            sel = row & side
            if sel.any():
                assert np.ptp(e[sel]) == 0.0
    # noise-free satellites give zeros; sample() adds the noise
    assert not obs.noise_values(tr, obs.with_noise([base], False)).any()
    with pytest.raises(InputError, match="noise must be"):
        obs.noise_values(tr, True)
    with pytest.raises(InputError, match="no satellite definition"):
        obs.noise_values(tr, [obs.PRESETS["jason"]])
    assert np.array_equal(obs.sample(tr, lambda d, lo, la: np.zeros(lo.size), noise=[p]), e)


def test_observe_daily_fields_end_to_end():
    days = np.arange("2013-01-06", "2013-01-09", dtype="datetime64[D]")
    lon = -65.0 + 0.05 + 0.1 * np.arange(100)  # 1/10 deg, lighter than the test above
    lat = 33.0 + 0.05 + 0.1 * np.arange(100)
    truth = np.broadcast_to(0.5 + 0.01 * lon[None, None, :], (3, 100, 100)).copy()
    truth[:, :10, :10] = np.nan  # "land" corner
    sats = obs.constellation("4nadirs_swot")
    o = obs.observe_daily_fields(sats, truth, lon, lat, days, noise=False)
    assert len(o.tracks) > 1000 and np.all(np.isfinite(o.values))
    tl, ta = o.tracks.lon, o.tracks.lat
    interior = (tl >= lon[0]) & (tl <= lon[-1]) & ((tl > lon[10]) | (ta > lat[10]))
    assert interior.mean() > 0.9
    # linear in lon: bilinear interpolation is exact inside the centres and away from land
    np.testing.assert_allclose(o.values[interior], 0.5 + 0.01 * tl[interior], atol=1e-9)
    assert o.gridded.shape == truth.shape and o.gridded.dtype == np.float32
    assert np.all(np.isnan(o.gridded[:, :9, :9]))
    seen = np.isfinite(o.gridded)
    ref = np.broadcast_to(truth, seen.shape)[seen]
    np.testing.assert_allclose(o.gridded[seen], ref, atol=0.0006)  # 0.01 m/deg x half a cell
    noisy = obs.observe_daily_fields(sats, truth, lon, lat, days, noise=True, seed=5)
    resid = noisy.values - (0.5 + 0.01 * noisy.tracks.lon)
    assert 0.005 < resid.std() < 0.05


def test_day_index_consecutive_and_gappy_days():
    tr = _table(500, np.random.default_rng(4), days=6)
    ref = (tr.day() - np.datetime64("2013-01-01")).astype(int)
    days = np.arange("2013-01-01", "2013-01-05", dtype="datetime64[D]") + np.timedelta64(12, "h")
    np.testing.assert_array_equal(obs.sampling.day_index(tr, days), np.where(ref < 4, ref, -1))
    gappy = np.array(["2012-12-31", "2013-01-02", "2013-01-05"], dtype="datetime64[D]")
    expect = np.select([ref == 1, ref == 4], [1, 2], -1)
    np.testing.assert_array_equal(obs.sampling.day_index(tr, gappy), expect)
    with pytest.raises(InputError, match="one entry per calendar day"):
        same_day = np.array(["2013-01-01T01", "2013-01-01T05"], dtype="datetime64[h]")
        obs.sampling.day_index(tr, same_day)



def test_grid_and_sample_wrap_longitudes():
    rng = np.random.default_rng(7)
    days = np.arange("2013-01-01", "2013-01-03", dtype="datetime64[D]")
    tr = _table(2000, rng, days=2)
    shifted = obs.TrackTable(tr.time, tr.lon + 360.0, tr.lat, tr.sat, tr.xtrack_km, tr.sat_names)
    v = rng.normal(size=len(tr))
    np.testing.assert_array_equal(
        obs.grid_tracks(shifted, v, LON, LAT, days), obs.grid_tracks(tr, v, LON, LAT, days)
    )
    f = rng.normal(size=(2, LAT.size, LON.size))
    np.testing.assert_allclose(
        obs.sample_daily_fields(shifted, f, LON, LAT, days),
        obs.sample_daily_fields(tr, f, LON, LAT, days),
        rtol=0, atol=1e-9, equal_nan=True,  # lon + 360 - 360 rounds at 1e-14 deg
    )
