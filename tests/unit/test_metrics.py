"""Data-challenge scores and ensemble scores on synthetic signals with known answers.

References: closed forms (white-noise RMSE, scaled daily errors), the analytic crossing
of the filter transfer function for lambda, a Gauss-Seidel relaxation for the gap fill,
numerical integration (scipy.integrate.quad) and Monte Carlo for the CRPS, exchangeable
synthetic ensembles for the spread-skill ratio.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.integrate import quad
from scipy.ndimage import correlate1d
from scipy.optimize import brentq
from scipy.stats import norm

from oceanda.errors import InputError
from oceanda.metrics import (
    crps,
    crps_ensemble,
    crps_gaussian,
    leaderboard,
    psd_scores,
    rmse_m,
    rmse_scores,
    spread_skill,
)
from oceanda.metrics.fill import laplace_fill
from oceanda.metrics.spectral import contour_minima

DX = 0.05  # deg


def random_field(shape=(64, 12, 128), seed=0, offset=0.3, std=0.1):
    """Periodic Gaussian field with random phases and a red (time, lon) spectrum."""
    rng = np.random.default_rng(seed)
    T, ny, nx = shape
    kt = np.fft.fftfreq(T)[:, None, None]
    kx = np.fft.fftfreq(nx, d=DX)[None, None, :]
    spec = (1.0 + (kx / 0.2) ** 2 + (kt / 0.05) ** 2) ** -2.0
    w = np.fft.fft2(rng.standard_normal(shape), axes=(0, 2)) * np.sqrt(spec)
    s = np.real(np.fft.ifft2(w, axes=(0, 2)))
    return offset + std * s / s.std()


def as_da(values, start="2012-10-01"):
    T, ny, nx = values.shape
    coords = {"time": pd.date_range(start, periods=T), "lat": 33.0 + DX * np.arange(ny), "lon": -65.0 + DX * np.arange(nx)}
    return xr.DataArray(values, dims=("time", "lat", "lon"), coords=coords)


def gaussian_kernel(sigma):
    r = int(4 * sigma + 0.5)
    n = np.arange(-r, r + 1)
    w = np.exp(-0.5 * (n / sigma) ** 2)
    return n, w / w.sum()


def boxcar_kernel(width):
    n = np.arange(width) - width // 2
    return n, np.full(width, 1.0 / width)


def analytic_lambda(n, w, step):
    """Wavelength where 1 - |1 - H(k)|^2 = 0.5 for the symmetric kernel (n, w), H its
    transfer function H(k) = sum_n w_n cos(2 pi k n step): the first crossing from k = 0."""
    H = lambda k: float(np.sum(w * np.cos(2 * np.pi * k * n * step)))  # noqa: E731
    score = lambda k: 1.0 - (1.0 - H(k)) ** 2 - 0.5  # noqa: E731
    ks = np.linspace(1e-6, 0.5 / step, 4000)
    vals = np.array([score(k) for k in ks])
    i = int(np.flatnonzero(vals < 0)[0])
    return 1.0 / brentq(score, ks[i - 1], ks[i])


# ----------------------------------------------------------------- identity, RMSE scores


def test_truth_against_itself_mu_one_and_no_finite_lambda():
    truth = as_da(random_field((32, 6, 64)))
    row = leaderboard(truth, truth.copy())
    assert row["mu"] == 1.0 and row["sigma_t"] == 0.0 and row["rmse_m"] == 0.0
    assert row["lambda_x_deg"] is None and row["lambda_t_days"] is None
    assert "all scales resolved" in psd_scores(truth, truth).note


def test_mu_closed_form_for_white_noise():
    s = random_field((48, 12, 64), seed=1)
    sigma = 0.03
    noise = np.random.default_rng(2).standard_normal(s.shape) * sigma
    sc = rmse_scores(as_da(s), as_da(s + noise))
    rms_truth = np.sqrt(np.mean(s**2))  # RMS of the SSH itself, as in the challenge
    n = s.size
    # RMSE^2 is a mean of n chi^2_1 * sigma^2: relative std of RMSE ~ 1/sqrt(2n)
    tol = 4 * sigma / rms_truth / np.sqrt(2 * n)
    assert abs(sc.mu - (1 - sigma / rms_truth)) < tol
    assert abs(sc.rmse_m - sigma) < 4 * sigma / np.sqrt(2 * n)


def test_sigma_t_closed_form_for_scaled_daily_errors():
    s = random_field((20, 6, 32), seed=3)
    c = np.random.default_rng(4).uniform(-0.4, 0.4, size=s.shape[0])
    sc = rmse_scores(as_da(s), as_da(s * (1 + c[:, None, None])))
    # error = c_t s  =>  RMSE_t = |c_t| RMS_t  =>  daily score = 1 - |c_t|
    np.testing.assert_allclose(sc.score_t.values, 1 - np.abs(c), rtol=0, atol=1e-12)
    assert sc.sigma_t == pytest.approx(np.std(1 - np.abs(c)), abs=1e-12)  # ddof = 0 as xarray
    err2 = (c[:, None, None] * s) ** 2
    assert sc.mu == pytest.approx(1 - np.sqrt(err2.mean()) / np.sqrt((s**2).mean()), abs=1e-12)


def test_rmse_uses_cells_finite_in_both_and_ocean():
    rng = np.random.default_rng(5)
    s = random_field((10, 8, 16), seed=5)
    a = s + 0.05 * rng.standard_normal(s.shape)
    a[rng.random(a.shape) < 0.2] = np.nan
    s2 = s.copy()
    s2[0, 0, :] = np.nan
    ocean = np.ones((8, 16), bool)
    ocean[:3, :4] = False
    ocean_da = xr.DataArray(ocean.astype("i1"), dims=("lat", "lon"), coords={"lat": as_da(s)["lat"], "lon": as_da(s)["lon"]})
    sc = rmse_scores(as_da(s2), as_da(a), ocean_da)
    v = np.isfinite(s2) & np.isfinite(a) & ocean[None]
    e2 = np.where(v, (a - s2) ** 2, 0.0)
    t2 = np.where(v, s2**2, 0.0)
    assert sc.n_valid == v.sum()
    assert sc.rmse_m == pytest.approx(np.sqrt(e2.sum() / v.sum()), rel=1e-12)
    assert sc.mu == pytest.approx(1 - np.sqrt(e2.sum() / t2.sum()), rel=1e-12)
    daily = 1 - np.sqrt(e2.sum((1, 2)) / t2.sum((1, 2)))
    np.testing.assert_allclose(sc.score_t.values, daily, rtol=1e-12)
    assert rmse_m(as_da(s2), as_da(a), ocean_da) == pytest.approx(sc.rmse_m, rel=1e-12)


def test_leaderboard_tolerates_roundoff_and_rejects_offset_grids():
    truth = as_da(random_field((16, 8, 32), seed=13))
    ana = truth + 0.01 * np.cos(np.arange(32))
    box = [-65.0, -63.5, float(truth.lat[2]), 40.0]
    ref = leaderboard(truth, ana, box=box)
    nudged = ana.assign_coords(lat=ana.lat - 1e-9)  # the box edge now cuts the analysis one row later
    assert leaderboard(truth, nudged, box=box) == ref
    with pytest.raises(InputError, match="do not match: 'lon'"):
        leaderboard(truth, ana.assign_coords(lon=ana.lon + DX / 3), box=box)


def test_no_valid_cell_raises():
    s = random_field((8, 4, 8))
    with pytest.raises(InputError, match="nothing to evaluate"):
        rmse_scores(as_da(s), as_da(np.full_like(s, np.nan)))


# ----------------------------------------------------------------- spectral scores


@pytest.mark.parametrize("kernel,arg", [(gaussian_kernel, 3.0), (gaussian_kernel, 5.0), (boxcar_kernel, 9)])
def test_lambda_x_recovers_smoothing_scale(kernel, arg):
    s = random_field((48, 8, 128), seed=6)
    n, w = kernel(arg)
    a = correlate1d(s, w, axis=2, mode="wrap", origin=0)
    r = psd_scores(as_da(s), as_da(a))
    expected = analytic_lambda(n, w, DX)
    assert r.lambda_x_deg == pytest.approx(expected, rel=0.15)
    # a purely spatial filter leaves every period resolved: lambda_t is the shortest one
    assert r.lambda_t_days == pytest.approx(float(r.score["wavelength_time"].min()), rel=1e-9)


def test_lambda_t_recovers_time_smoothing_scale():
    s = random_field((128, 8, 64), seed=7)
    n, w = gaussian_kernel(2.0)
    a = correlate1d(s, w, axis=0, mode="wrap")
    r = psd_scores(as_da(s), as_da(a))
    assert r.lambda_t_days == pytest.approx(analytic_lambda(n, w, 1.0), rel=0.15)
    assert r.lambda_x_deg == pytest.approx(float(r.score["wavelength_lon"].min()), rel=1e-9)


def test_lambda_x_with_land_gap_filled():
    s = random_field((48, 12, 128), seed=8)
    n, w = gaussian_kernel(3.0)
    a = correlate1d(s, w, axis=2, mode="wrap")
    a[:, 2:5, 10:20] = np.nan  # an island of missing analysis
    r = psd_scores(as_da(s), as_da(a))
    assert r.filled_fraction == pytest.approx(30 / (12 * 128))
    assert r.lambda_x_deg == pytest.approx(analytic_lambda(n, w, DX), rel=0.15)


def test_contour_minima_on_analytic_surface():
    wl_x = 1.0 / np.linspace(0.1, 10.0, 400)  # wavelengths, decreasing as in the challenge
    wl_t = 1.0 / np.linspace(1 / 60, 0.5, 200)
    # score = 1 - (a / lambda_x)^2 crosses 0.5 at lambda_x = a sqrt(2), at every period
    a = 0.5
    score = np.broadcast_to(1 - (a / wl_x[None, :]) ** 2, (wl_t.size, wl_x.size))
    lx, lt, note = contour_minima(score, wl_x, wl_t)
    assert note is None
    assert lx == pytest.approx(a * np.sqrt(2), rel=2e-3)
    assert lt == pytest.approx(wl_t.min(), rel=1e-12)
    assert contour_minima(np.ones_like(score), wl_x, wl_t)[:2] == (None, None)
    assert "no scale resolved" in contour_minima(np.zeros_like(score), wl_x, wl_t)[2]


def test_psd_needs_regular_spacing_and_enough_samples():
    s = as_da(random_field((16, 4, 16)))
    with pytest.raises(InputError, match="at least"):
        psd_scores(s.isel(time=slice(0, 4)), s.isel(time=slice(0, 4)))
    irregular = s.isel(lon=[0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
    with pytest.raises(InputError, match="regularly spaced 'lon'"):
        psd_scores(irregular, irregular)


def gauss_seidel_fill(f, valid, iters=20000):
    """Reference: Gauss-Seidel relaxation of Laplace's equation in the gaps (Neumann border)."""
    u = np.where(valid, f, 0.0)
    ny, nx = f.shape
    gaps = list(zip(*np.nonzero(~valid)))
    for _ in range(iters):
        for j, i in gaps:
            nb = [u[jj, ii] for jj, ii in ((j - 1, i), (j + 1, i), (j, i - 1), (j, i + 1)) if 0 <= jj < ny and 0 <= ii < nx]
            u[j, i] = sum(nb) / len(nb)
    return u


def test_laplace_fill_matches_gauss_seidel_and_keeps_linear_fields():
    rng = np.random.default_rng(9)
    f = rng.standard_normal((1, 7, 9))
    valid = rng.random((1, 7, 9)) > 0.35
    valid[0, 0, 0] = True
    (filled,) = laplace_fill([f], valid)
    np.testing.assert_allclose(filled[0], gauss_seidel_fill(f[0], valid[0], iters=3000), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(filled[valid], f[valid])
    # a linear field is harmonic: an interior hole is filled exactly
    jj, ii = np.mgrid[0:10, 0:12]
    lin = (0.3 * jj - 0.7 * ii + 2.0)[None].astype(float)
    hole = np.ones_like(lin, bool)
    hole[0, 3:7, 4:9] = False
    np.testing.assert_allclose(laplace_fill([np.where(hole, lin, np.nan)], hole)[0], lin, atol=1e-12)
    with pytest.raises(InputError, match="no valid"):
        laplace_fill([lin], np.zeros_like(hole))


# ----------------------------------------------------------------- ensemble scores


@pytest.mark.parametrize("y,mu,sigma", [(0.3, 0.0, 1.0), (-1.7, 0.4, 0.5), (2.0, 2.1, 0.05)])
def test_crps_gaussian_matches_integral(y, mu, sigma):
    f = lambda x: norm.cdf(x, mu, sigma) ** 2  # noqa: E731
    g = lambda x: (1 - norm.cdf(x, mu, sigma)) ** 2  # noqa: E731
    ref = quad(f, -np.inf, y, epsabs=1e-13)[0] + quad(g, y, np.inf, epsabs=1e-13)[0]
    assert crps_gaussian(y, mu, sigma) == pytest.approx(ref, rel=1e-8)
    assert crps_gaussian(y, mu, 0.0) == pytest.approx(abs(y - mu))


def test_fair_crps_matches_pairwise_formula_and_is_unbiased():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((5, 7, 3))
    y = rng.standard_normal((7, 3))
    n = x.shape[0]
    pairs = np.abs(x[:, None] - x[None, :]).sum((0, 1))
    ref = np.abs(x - y).mean(0) - pairs / (2 * n * (n - 1))
    np.testing.assert_allclose(crps_ensemble(y, x, axis=0), ref, rtol=1e-12, atol=1e-14)
    # unbiased: the mean over many 4-member ensembles drawn from N(0, 1) is the Gaussian CRPS
    m = 200_000
    draws = rng.standard_normal((4, m))
    vals = crps_ensemble(np.full(m, 0.7), draws, axis=0)
    assert abs(vals.mean() - crps_gaussian(0.7, 0.0, 1.0)) < 4 * vals.std() / np.sqrt(m)


def _ensemble(shape=(40, 20, 20), n_members=5, sigma=0.1, seed=11):
    rng = np.random.default_rng(seed)
    mean = random_field(shape, seed=seed)
    truth = mean + sigma * rng.standard_normal(shape)
    members = mean[None] + sigma * rng.standard_normal((n_members, *shape))
    mem = xr.DataArray(members, dims=("member", "time", "lat", "lon"), coords=as_da(mean).coords)
    return as_da(truth), as_da(mean), mem, sigma


def test_spread_skill_is_one_for_calibrated_ensembles():
    truth, mean, members, sigma = _ensemble()
    n_cells = truth.size
    # relative MC error of a ratio of two chi-square means over n_cells cells: ~ 1 / sqrt(n_cells)
    tol = 4 / np.sqrt(n_cells)
    assert spread_skill(truth, members.mean("member"), members) == pytest.approx(1.0, abs=tol)
    std = xr.full_like(truth, sigma)
    assert spread_skill(truth, mean, std) == pytest.approx(1.0, abs=tol)
    assert spread_skill(truth, mean, std / 2) == pytest.approx(0.5, abs=tol)


def test_crps_of_members_and_of_gaussian_agree_in_expectation():
    truth, mean, members, sigma = _ensemble(n_members=4, seed=12)
    std = xr.full_like(truth, sigma)
    c_gauss = crps(truth, mean=mean, std=std)
    c_members = crps(truth, members)
    per_cell = crps_ensemble(truth.values, members.values, axis=0)
    assert c_members == pytest.approx(per_cell.mean(), rel=1e-12)
    assert abs(c_members - c_gauss) < 4 * per_cell.std() / np.sqrt(per_cell.size)
    # E CRPS(N(m, s^2), y) for y ~ N(m, s^2) = E|X - Y| - E|X - X'| / 2 = 2s/sqrt(pi) - s/sqrt(pi)
    assert c_gauss == pytest.approx(sigma / np.sqrt(np.pi), rel=0.03)


if __name__ == "__main__":  # measured lambda recovery: python3 tests/unit/test_metrics.py
    cases = [("lon", "Gaussian sigma = 3 cells (0.15 deg)", gaussian_kernel(3.0)),
             ("lon", "Gaussian sigma = 5 cells (0.25 deg)", gaussian_kernel(5.0)),
             ("lon", "boxcar 9 cells (0.45 deg)", boxcar_kernel(9)),
             ("time", "Gaussian sigma = 2 days", gaussian_kernel(2.0))]
    for dim, label, (n, w) in cases:
        if dim == "lon":
            s = random_field((48, 8, 128), seed=6)
            r = psd_scores(as_da(s), as_da(correlate1d(s, w, axis=2, mode="wrap")))
            got, want, unit = r.lambda_x_deg, analytic_lambda(n, w, DX), "deg"
        else:
            s = random_field((128, 8, 64), seed=7)
            r = psd_scores(as_da(s), as_da(correlate1d(s, w, axis=0, mode="wrap")))
            got, want, unit = r.lambda_t_days, analytic_lambda(n, w, 1.0), "days"
        print(f"lambda_{'x' if dim == 'lon' else 't'}  {label:38s} measured {got:7.4f} {unit:4s} analytic {want:7.4f} {unit:4s} "
              f"error {100 * (got / want - 1):+5.1f}%")
