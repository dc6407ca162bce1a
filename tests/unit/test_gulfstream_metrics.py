"""Gulf Stream diagnostics (oceanda.metrics.gulfstream) on synthetic fields with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oceanda.metrics import gulfstream as gs

KM_PER_DEG = 6371.0 * math.pi / 180.0


def _grid(n: int = 100, res: float = 0.1, lon0: float = -65.0, lat0: float = 33.0):
    return lon0 + res * np.arange(n), lat0 + res * np.arange(n)


def _jet(lon, lat, axis_lat, amp=1.0, width_km=40.0):
    """SSH of a zonal jet: amp/2 * (1 - tanh((lat - axis) / w)), high to the south."""
    y = (lat[:, None] - np.asarray(axis_lat)[None, ...]) * KM_PER_DEG
    return 0.5 * amp * (1 - np.tanh(y / width_km)) + 0 * lon[None, :]


def test_mean_step_of_a_tanh_jet():
    lon, lat = _grid()
    f = np.stack([_jet(lon, lat, 38.0)] * 3)
    out = gs.mean_step(f, lon, lat, span_km=150.0)
    span = out["span_km"]
    expect = math.tanh(span / 2 / 40.0)  # symmetric window about the axis maximises the drop
    assert out["step_m"] == pytest.approx(expect, abs=0.01)
    assert out["step_min_m"] == pytest.approx(expect, abs=0.01)


def test_jet_axis_and_meander_range_of_an_oscillating_jet():
    lon, lat = _grid(res=0.05, n=200)
    days = np.arange(180)
    axis = 38.0 + 0.8 * np.sin(2 * np.pi * days / 60.0)  # 1.6 deg peak to peak every 60 days
    f = np.stack([_jet(lon, lat, a) for a in axis])
    got = gs.jet_axis(f, lon, lat)
    np.testing.assert_allclose(got, axis[:, None].repeat(len(lon), 1), atol=0.02)
    m = gs.meander_range(f, lon, lat, window_days=90)
    assert m["range_deg"] == pytest.approx(1.6, abs=0.05)
    # a slow oscillation moves less within a season
    slow = 38.0 + 0.8 * np.sin(2 * np.pi * days / 720.0)
    m2 = gs.meander_range(np.stack([_jet(lon, lat, a) for a in slow]), lon, lat, window_days=90)
    assert m2["range_deg"] < 0.9


def test_eddy_census_counts_inserted_rings_by_side():
    lon, lat = _grid(res=0.05, n=200)
    base = _jet(lon, lat, 38.0, amp=1.0)
    lon2, lat2 = np.meshgrid(lon, lat)

    def ring(lo, la, amp, r_km=50.0):
        d2 = ((lon2 - lo) * KM_PER_DEG * math.cos(math.radians(la))) ** 2 + ((lat2 - la) * KM_PER_DEG) ** 2
        return amp * np.exp(-d2 / (2 * r_km**2))

    f = base + ring(-62, 40.5, 0.4) + ring(-58, 41.0, 0.3) + ring(-60, 35.0, -0.4)  # 2 warm north, 1 cold south
    out = gs.eddy_census(np.stack([f, f]), lon, lat, radius_km=60.0, min_amp_m=0.1)
    assert out["warm_north"] == pytest.approx(2.0)
    assert out["cold_south"] == pytest.approx(1.0)
    assert out["cold_north"] == 0 and out["warm_south"] == 0
    weak = base + ring(-62, 40.5, 0.05)
    assert gs.eddy_census(weak[None], lon, lat, min_amp_m=0.1)["north_per_day"] == 0


def test_lagged_displacement_recovers_a_drift():
    lon, lat = _grid(res=0.05, n=160)
    rng = np.random.default_rng(0)
    # a smooth random field translated westward at 5 km/day (about 0.057 deg/day at 37N)
    big = rng.standard_normal((220, 600))
    from scipy.ndimage import gaussian_filter

    big = gaussian_filter(big, 6, mode="wrap")
    lat_c = float(lat.mean())
    dx = KM_PER_DEG * 0.05 * math.cos(math.radians(lat_c))
    days = 40
    f = np.stack([big[30:190, 200 + int(round(5.0 * t / dx)):360 + int(round(5.0 * t / dx))] for t in range(days)])
    out = gs.lagged_displacement(f, lon, lat, (lat[40], lat[120]), lag_days=10, max_shift_km=120)
    assert out["u_km_day"] == pytest.approx(-5.0, abs=0.6)  # the window slides east: the content moves west
    assert abs(out["v_km_day"]) < 0.6
    assert out["corr"] > 0.8


def test_zonal_phase_speeds_separate_an_eastward_meander_from_a_westward_wave():
    # a 300 km wave moving east at 5 km/day under a 1200 km wave moving west at 10 km/day, on a
    # box exactly 2400 km wide over 240 days (whole cycles in x and t): each band gets its speed
    # (the Hann windows leak power to the neighbouring bins: the bands are chosen around them)
    nx, days, lat0 = 240, 240, 38.0
    dlon = 10.0 / (KM_PER_DEG * math.cos(math.radians(lat0)))  # 10 km per column at lat0
    lon = -75.0 + dlon * np.arange(nx)
    lat = np.array([lat0 - 0.05, lat0, lat0 + 0.05])
    x = 10.0 * np.arange(nx) * np.cos(np.radians(lat))[:, None] / math.cos(math.radians(lat0))
    t = np.arange(days)[:, None, None]
    f = 0.1 * np.cos(2 * np.pi * (x - 5.0 * t) / 300.0) + 0.3 * np.cos(2 * np.pi * (x + 10.0 * t) / 1200.0)
    long, short = gs.zonal_phase_speeds(f, lon, lat, (lat0 - 0.1, lat0 + 0.1),
                                        bands_km=((1000.0, 2000.0), (250.0, 400.0)))
    assert long["c_km_day"] == pytest.approx(-10.0, rel=0.05) and long["east_over_west"] < 1e-3
    assert short["c_km_day"] == pytest.approx(5.0, rel=0.1) and short["east_over_west"] > 1e3
    # power 9:1; the long wave keeps 2/3 of its power in its one wavenumber bin (Hann: 1/16, 1/4, 1/16)
    assert long["frac"] == pytest.approx(0.9 * 2 / 3, abs=0.01) and short["frac"] == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="no latitude"):
        gs.zonal_phase_speeds(f, lon, lat, (50.0, 51.0))


def test_std_summary_is_largest_where_the_jet_wiggles():
    lon, lat = _grid(res=0.05, n=200)
    rng = np.random.default_rng(1)
    axis = 38.0 + 0.3 * rng.standard_normal(120)
    f = np.stack([_jet(lon, lat, a) for a in axis]) + 0.01 * rng.standard_normal((120, 200, 200))
    out = gs.std_summary(f, lon, lat)
    assert out["std_jet_over_rest"] > 3
    assert out["std_zonal_max_lat"] == pytest.approx(38.0, abs=0.3)
    ref = f.std(axis=0)
    assert out["std_mean_m"] == pytest.approx(ref.mean()) and out["std_max_m"] == pytest.approx(ref.max())


@pytest.mark.parametrize("slope", [-4.0, -5.0])
def test_spectral_slopes_of_power_law_fields(slope):
    lon, lat = _grid(res=0.05, n=256, lat0=36.0)
    rng = np.random.default_rng(2)
    n = 512
    k = np.fft.fftfreq(n)
    kk = np.hypot(k[:, None], np.fft.rfftfreq(n)[None, :])
    # isotropic 2-D spectrum K^(s-1) gives 1-D spectra ~ k^s
    amp = np.where(kk > 0, kk, np.inf) ** ((slope - 1) / 2)
    days = []
    for _ in range(6):
        w = np.fft.rfft2(rng.standard_normal((n, n)))
        days.append(np.fft.irfft2(w * amp, s=(n, n))[:256, :256])
    out = gs.spectral_slopes(np.stack(days), lon, lat, band_km=(30.0, 250.0))
    assert out["zonal"] == pytest.approx(slope, abs=0.35)
    assert out["meridional"] == pytest.approx(slope, abs=0.35)


def test_non_gaussianity_is_one_for_a_gaussian_field_and_large_for_vortices():
    lon, lat = _grid(res=0.05, n=128)
    rng = np.random.default_rng(3)
    from scipy.ndimage import gaussian_filter

    g = np.stack([gaussian_filter(rng.standard_normal((128, 128)), 4, mode="wrap") for _ in range(8)])
    out = gs.non_gaussianity(g, lon, lat)
    assert out["lap_kurtosis"] == pytest.approx(3.0, abs=0.3)
    assert out["lap_kurtosis_ratio"] == pytest.approx(1.0, abs=0.12)
    assert out["grad_ratio"] == pytest.approx(1.0, abs=0.08)
    # isolated sharp vortices: a heavy-tailed Laplacian and steep gradients at few points
    lon2, lat2 = np.meshgrid(np.arange(128), np.arange(128))
    v = np.zeros((8, 128, 128))
    for t in range(8):
        for _ in range(4):
            cx, cy = rng.uniform(10, 118, 2)
            v[t] += rng.choice([-1, 1]) * np.exp(-((lon2 - cx) ** 2 + (lat2 - cy) ** 2) / (2 * 3.0**2))
    out = gs.non_gaussianity(v + 0.01 * g, lon, lat)
    assert out["lap_kurtosis_ratio"] > 2.0
    assert out["grad_ratio"] > 1.5
    # the surrogate keeps the spectrum (and so the variance) of each day
    s = gs.phase_randomised(v)
    np.testing.assert_allclose(s.var(axis=(1, 2)), v.var(axis=(1, 2)), rtol=0.35)


def test_diagnostics_run_on_a_small_series():
    lon, lat = _grid(res=0.1, n=100)
    days = np.arange(40)
    f = np.stack([_jet(lon, lat, 38 + 0.5 * np.sin(2 * np.pi * d / 20.0)) for d in days])
    out = gs.gulfstream_diagnostics(f, lon, lat, lag_days=5)
    assert set(out) >= {"mean_step", "meander", "eddies", "std", "slopes", "non_gaussianity", "propagation"}
    assert out["jet_axis_lat_deg"] == pytest.approx(38.0, abs=0.2)
