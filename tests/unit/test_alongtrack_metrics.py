"""Along-track scores (data challenge 2021a) against independent references: scipy's grid
interpolator, direct numpy RMSE per day, hand-made periodograms, a known PSD-score crossing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.interpolate import RegularGridInterpolator

from oceanda.cli import main
from oceanda.metrics.alongtrack import (
    AlongTrackOptions,
    interp_to_points,
    lambda_crossing,
    rmse_scores,
    segments,
    spectral_scores,
)
from oceanda.testing import write_l3_testset

pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")


def test_interp_to_points_matches_scipy_trilinear():
    rng = np.random.default_rng(0)
    time = np.datetime64("2017-01-01") + np.arange(6).astype("timedelta64[D]")
    lat, lon = 30 + 0.1 * np.arange(9), -60 + 0.2 * np.arange(11)
    field = rng.standard_normal((6, 9, 11))
    field[2, 4, 5] = np.nan
    n = 400
    pt = time[0].astype("datetime64[ns]") + (rng.uniform(-0.5, 5.5, n) * 86400e9).astype("timedelta64[ns]")
    py, px = rng.uniform(29.9, 30.9, n), rng.uniform(-60.1, -57.9, n)
    got = interp_to_points(field, time, lat, lon, pt, py, np.mod(px, 360.0))  # 0..360 points
    tdays = (time - time[0]) / np.timedelta64(1, "D")
    ref = RegularGridInterpolator((tdays, lat, lon), field, bounds_error=False, fill_value=np.nan)(
        np.stack([(pt - time[0].astype("datetime64[ns]")) / np.timedelta64(1, "D"), py, px], axis=1))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    # (the 0..360 round trip of the longitudes costs ~1e-13 deg)
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=0, atol=1e-10)
    assert np.isnan(got).sum() > 20 and (~np.isnan(got)).sum() > 200


def test_rmse_scores_match_a_direct_computation():
    rng = np.random.default_rng(1)
    t = np.datetime64("2017-03-01") + np.sort(rng.integers(0, 10 * 86400, 3000)).astype("timedelta64[s]")
    ref = rng.normal(0, 0.2, t.size)
    est = ref + rng.normal(0, 0.05, t.size)
    keep = ~((t >= np.datetime64("2017-03-04")) & (t < np.datetime64("2017-03-05")))
    keep[np.flatnonzero(~keep)[:5]] = True  # day 3 keeps 5 points (< min_obs: masked)
    t, ref, est = t[keep], ref[keep], est[keep]
    s = rmse_scores(t, ref, est, 1.0, 10)
    day = t.astype("datetime64[D]")
    scores = []
    for d in np.unique(day):
        m = day == d
        if m.sum() < 10:
            continue
        scores.append(1 - np.sqrt(np.mean((est[m] - ref[m]) ** 2)) / np.sqrt(np.mean(ref[m] ** 2)))
    assert len(scores) == 9
    assert s.mu == pytest.approx(np.mean(scores), abs=1e-14)
    assert s.sigma == pytest.approx(np.std(scores), abs=1e-14)
    assert s.rmse_m == pytest.approx(np.sqrt(np.mean((est - ref) ** 2)), abs=1e-15)


def _track(n_tracks=30, n=400, dx=6.0, seed=2):
    """Straight 1 Hz tracks along a meridian, dx km apart, separated by an hour."""
    rng = np.random.default_rng(seed)
    t, lat = [], []
    for k in range(n_tracks):
        t.append(np.datetime64("2017-01-01") + np.timedelta64(3600 * k, "s") + np.arange(n).astype("timedelta64[s]"))
        lat.append(20 + np.arange(n) * dx / 111.195)
    t, lat = np.concatenate(t), np.concatenate(lat)
    return t.astype("datetime64[ns]"), np.full(t.size, -40.0), lat, rng


def test_welch_spectra_equal_hand_made_hann_periodograms():
    t, lon, lat, rng = _track(n_tracks=3, n=300)
    ref = rng.standard_normal(t.size)
    est = ref + 0.3 * rng.standard_normal(t.size)
    opts = AlongTrackOptions(segment_km=600.0, dx_km=6.0)
    sc = spectral_scores(t, lon, lat, ref, est, opts)
    npt = 100
    segs = segments(t, lon, lat, npt, 4e9, 25)
    assert sc.npt == npt and sc.n_segments == len(segs) == 3 * 9
    w = np.hanning(npt + 1)[:-1]  # periodic Hann, as scipy's welch
    def psd(x):
        acc = 0
        for a, b in segs:
            s = x[a:b] - x[a:b].mean()
            acc = acc + np.abs(np.fft.rfft(s * w)) ** 2
        p = acc / len(segs) * 6.0 / (w ** 2).sum()
        p[1:-1] *= 2
        return p
    np.testing.assert_allclose(sc.psd_ref, psd(ref), rtol=1e-10)
    np.testing.assert_allclose(sc.psd_diff, psd(est - ref), rtol=1e-10)
    np.testing.assert_allclose(sc.wavenumber, np.fft.rfftfreq(npt, 6.0), rtol=1e-12)


def test_lambda_x_of_an_ideal_low_pass_analysis():
    """The analysis is the reference with every wavelength below 120 km removed (ideal
    low-pass per track): PSD(err) = PSD(ref) below 120 km, ~0 above, so the score falls from 1
    to 0 across 120 km and lambda_x lies between the two bracketing wavelengths."""
    t, lon, lat, rng = _track(n_tracks=40, n=600)
    ref = rng.standard_normal(t.size)
    est = np.empty_like(ref)
    for k in range(40):
        sl = slice(600 * k, 600 * (k + 1))
        spec = np.fft.rfft(ref[sl])
        kk = np.fft.rfftfreq(600, 6.0)
        spec[kk > 1 / 120.0] = 0
        est[sl] = np.fft.irfft(spec, 600)
    sc = spectral_scores(t, lon, lat, ref, est, AlongTrackOptions(segment_km=1000.0, dx_km=6.0))
    k = sc.wavenumber
    j = np.searchsorted(k, 1 / 120.0)
    assert 1 / k[j + 1] <= sc.lambda_x_km <= 1 / k[j - 2]
    assert sc.lambda_x_km == pytest.approx(120, rel=0.1)
    # the score is ~1 at long and ~0 at short wavelengths
    assert sc.score[1:j - 2].min() > 0.9 and np.abs(sc.score[j + 3:]).max() < 0.1


def test_lambda_crossing_is_linear_interpolation_in_wavelength():
    k = np.array([0.0, 0.001, 0.002, 0.004, 0.008])
    s = np.array([1.0, 0.9, 0.7, 0.3, 0.1])
    # crossing between k=0.002 (500 km, 0.7) and 0.004 (250 km, 0.3): halfway -> 375 km
    assert lambda_crossing(k, s) == pytest.approx(375.0)
    assert lambda_crossing(k, np.full(5, 0.2)) is None
    assert lambda_crossing(k, np.full(5, 0.9)) is None


def test_evaluate_alongtrack_cli_matches_direct_scores(tmp_path, capsys):
    """`oceanda evaluate analysis=A alongtrack=F`: mu/sigma equal a direct computation on the
    same points (scipy interpolation of the analysis, numpy daily RMSE)."""
    import xarray as xr

    l3 = write_l3_testset(tmp_path / "l3", shape=(20, 60, 60))
    f = l3["fields"]
    rng = np.random.default_rng(5)
    ana = np.where(f["ocean"][None], f["truth"] + 0.02 * rng.standard_normal(f["truth"].shape), np.nan)
    xr.Dataset({"ssh": (("time", "lat", "lon"), ana)},
               {"time": f["time"], "lat": f["lat"], "lon": f["lon"]}).to_zarr(tmp_path / "a.zarr")
    c2 = next(p for p in l3["files"] if "_c2_" in p.name)
    out = tmp_path / "eval"
    assert main(["evaluate", f"analysis={tmp_path / 'a.zarr'}", f"alongtrack={c2}", f"out_dir={out}",
                 "alongtrack_options.segment_km=150"]) == 0
    res = json.loads((out / "scores_alongtrack.json").read_text())
    assert {"mu", "sigma", "lambda_x_km", "rmse_m", "n_points"} <= set(res)
    assert res["evaluation"]["missions"] == ["c2"] and res["evaluation"]["segments"] > 0
    for name in ("alongtrack_psd.png", "alongtrack_score_time.png", "alongtrack_error_map.png"):
        assert (out / name).stat().st_size > 1000
    # direct reference
    import netCDF4

    with netCDF4.Dataset(c2) as ds:
        tt = netCDF4.num2date(ds["time"][:], ds["time"].units, only_use_cftime_datetimes=False)
        t = np.array([np.datetime64(x.isoformat()) for x in tt]).astype("datetime64[ns]")
        lon = ds["longitude"][:].filled(np.nan) - 360.0
        lat = ds["latitude"][:].filled(np.nan)
        ssh = (ds["sla_unfiltered"][:].filled(np.nan) + ds["mdt"][:].filled(np.nan) - ds["lwe"][:].filled(np.nan))
    tdays = (f["time"] - f["time"][0]) / np.timedelta64(1, "D")
    est = RegularGridInterpolator((tdays, f["lat"], f["lon"]), ana, bounds_error=False, fill_value=np.nan)(
        np.stack([(t - f["time"][0].astype("datetime64[ns]")) / np.timedelta64(1, "D"), lat, lon], axis=1))
    ok = np.isfinite(est) & np.isfinite(ssh) & (lon >= f["lon"][0] + 0.25) & (lon <= f["lon"][-1] - 0.25) \
        & (lat >= f["lat"][0] + 0.25) & (lat <= f["lat"][-1] - 0.25)
    day = t.astype("datetime64[D]")
    sc = []
    for d in np.unique(day[ok]):
        m = ok & (day == d)
        if m.sum() >= 10:
            sc.append(1 - np.sqrt(np.mean((est[m] - ssh[m]) ** 2)) / np.sqrt(np.mean(ssh[m] ** 2)))
    assert res["n_points"] == ok.sum()
    assert res["mu"] == pytest.approx(np.mean(sc), abs=1e-9)
    assert res["sigma"] == pytest.approx(np.std(sc), abs=1e-9)


def test_evaluate_needs_truth_or_alongtrack(tmp_path, capsys):
    assert main(["evaluate", f"analysis={tmp_path / 'a.zarr'}"]) == 2
    assert "alongtrack=FILES" in capsys.readouterr().err


def test_evaluate_bad_alongtrack_file_exit_2_and_nothing_written(tmp_path, capsys):
    import xarray as xr

    from oceanda.data.alongtrack_write import write_l3

    time = np.datetime64("2017-01-01") + np.arange(5).astype("timedelta64[D]")
    lat, lon = 33 + 0.1 * np.arange(10), -60 + 0.1 * np.arange(10)
    xr.Dataset({"ssh": (("time", "lat", "lon"), np.zeros((5, 10, 10)))},
               {"time": time, "lat": lat, "lon": lon}).to_zarr(tmp_path / "a.zarr")
    t = np.datetime64("2017-01-02") + np.arange(50).astype("timedelta64[s]")
    good = write_l3(tmp_path / "dt_global_c2_phy_l3_x.nc", time=t, lon=np.full(50, -59.5), lat=33.2 + 0.01 * np.arange(50),
                    sla_unfiltered=np.zeros(50), mdt=np.zeros(50), mission="c2")
    ds = xr.open_dataset(good, decode_times=False).load().drop_vars("sla_unfiltered")
    bad = tmp_path / "dt_global_c2_phy_l3_bad.nc"
    ds.to_netcdf(bad)
    out = tmp_path / "eval"
    assert main(["evaluate", f"analysis={tmp_path / 'a.zarr'}", f"alongtrack={bad}", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "oceanda evaluate: error:" in err and str(bad) in err and "'sla_unfiltered'" in err
    assert not out.exists()
