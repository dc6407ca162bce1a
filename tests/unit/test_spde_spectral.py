"""Spectral form of separable SPDE priors (``oceanda.priors.spde.spectral``): every operation
against the dense ``Q`` assembled from the sparse blocks (float64), the sparse-path
solvers, and Monte-Carlo bounds for the draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oceanda.assim.ensemble import matheron_members
from oceanda.errors import ConfigError
from oceanda.priors.spde import SPDEPrior
from oceanda.priors.spde.precision import SPDEPrecision


def _lat_grid(ny, nx, lat0=33.0, lat1=43.0):
    """A regular lon/lat grid: dx shrinks with latitude (varies by row only)."""
    lat = np.linspace(lat0, lat1, ny)
    dx = np.repeat((5.566 * np.cos(np.deg2rad(lat)))[:, None], nx, 1)
    dy = np.full((ny, nx), 5.55)
    return dx, dy


def _prior(ny=7, nx=5, T=4, alpha=2, ocean=None, **kw):
    dx, dy = _lat_grid(ny, nx)
    params = dict(kappa=0.3, gamma=20.0, tau=2.0)
    params.update(kw)
    return SPDEPrior(dx, dy, ocean, T=T, dt=1.0, alpha=alpha, **params)


@pytest.mark.parametrize("alpha", [1, 2])
@pytest.mark.parametrize("T", [1, 2, 5])
def test_apply_solve_logdet_match_dense(alpha, T):
    P = _prior(T=T, alpha=alpha)
    spec = P.precision.spectrum()
    assert spec is not None
    Q = P.precision_dense().numpy()
    N = Q.shape[0]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((T, P.n, 3))
    QX = Q @ X.reshape(N, 3)
    np.testing.assert_allclose(spec.apply(X).reshape(N, 3), QX, rtol=0,
                               atol=1e-12 * np.abs(QX).max())
    ref = np.linalg.solve(Q, X.reshape(N, 3))
    cond = np.linalg.cond(Q)
    np.testing.assert_allclose(spec.solve(X).reshape(N, 3), ref, rtol=0,
                               atol=1e-15 * cond * np.abs(ref).max())
    ld = np.linalg.slogdet(Q)
    assert ld[0] > 0
    assert abs(spec.logdet() - ld[1]) <= 1e-9 * abs(ld[1]) + 1e-15 * cond
    assert abs(spec.logdet() - P.logdet()) <= 1e-8 * abs(ld[1])  # the sparse-factor log-det


def test_whitening_factors_qhat_and_sample_covariance_within_mc_error():
    P = _prior(ny=4, nx=3, T=3, alpha=2)
    spec = P.precision.spectrum()
    Q = P.precision_dense().numpy()
    N = Q.shape[0]
    # W W^T = Qhat^{-1} in the modes, so U-side: S^{1/2} U W W^T U^T S^{1/2} = Q^{-1}
    E = np.eye(N).reshape(P.T, P.n, N)
    cov = spec.sample(E).reshape(N, N)  # columns of S^{1/2} U W (with the z index relabelled)
    np.testing.assert_allclose(cov @ cov.T, np.linalg.inv(Q), atol=1e-10 * np.abs(
        np.linalg.inv(Q)).max())
    n_s = 40000
    draws = P.sample(n_s, rng=1, method="spectral").reshape(n_s, N)
    C = np.cov(draws.T)
    Ci = np.linalg.inv(Q)
    # Monte-Carlo standard error of a covariance entry: sqrt((C_ii C_jj + C_ij^2) / n)
    se = np.sqrt((np.outer(np.diag(Ci), np.diag(Ci)) + Ci**2) / n_s)
    assert np.max(np.abs(C - Ci) / se) < 5.0
    assert abs(draws.mean()) < 5 * np.sqrt(Ci.sum() / N**2 / n_s)


# the spectral posterior solver against the dense solve: test_spde.py's problems x solvers table


def test_spectral_matheron_members_are_calibrated():
    """Exact posterior draws: the ensemble variance matches the dense posterior variance
    within its Monte-Carlo error."""
    P = _prior(ny=6, nx=5, T=3, alpha=2)
    rng = np.random.default_rng(3)
    grid = (P.T, *P.shape)
    mask = rng.random(grid) < 0.3
    R = 0.05
    truth = P.sample(1, rng=rng, method="spectral")[0]
    y = np.where(mask, truth + np.sqrt(R) * rng.standard_normal(grid), 0.0)
    Q = P.precision_dense().numpy()
    post_var = np.diag(np.linalg.inv(Q + np.diag(mask.reshape(-1) / R))).reshape(grid)
    n_m = 400
    S = P.sample(n_m, rng=rng, method="spectral")

    def recon(Y):
        return P.posterior_mean(np.nan_to_num(Y), mask, R, rtol=1e-10, solver="spectral")

    members = matheron_members(recon, y, mask, R, S, rng=rng)
    ratio = members.var(0, ddof=1).mean() / post_var.mean()
    # var of a sample variance ~ 2 sigma^4 / (n - 1); averaging over cells only shrinks it
    assert abs(ratio - 1.0) < 4 * np.sqrt(2.0 / (n_m - 1))


@pytest.mark.parametrize("case", ["land", "kappa_along_rows", "advection", "anisotropic",
                                  "time_varying", "white_init"])
def test_non_separable_priors_fall_back_to_sparse_factors(case):
    ny, nx, T = 6, 5, 3
    kw = {}
    ocean = None
    if case == "land":
        ocean = np.ones((ny, nx), bool)
        ocean[2, 2] = False
    elif case == "kappa_along_rows":
        kw["kappa"] = torch.linspace(0.2, 0.4, nx).repeat(ny, 1)
    elif case == "advection":
        kw["mx"] = 0.5
    elif case == "anisotropic":
        kw.update(beta=5.0, vx=0.6, vy=0.8)
    elif case == "time_varying":
        kw["kappa"] = torch.linspace(0.2, 0.4, T)[:, None, None].expand(T, ny, nx).clone()
    elif case == "white_init":
        kw["init"] = "white"
    P = _prior(ny, nx, T, ocean=ocean, **kw)
    assert P.precision.spectrum() is None
    grid = (T, ny, nx)
    mask = np.zeros(grid, bool)
    mask[:, 1, :] = True
    with pytest.raises(ConfigError, match="separable"):
        P.posterior_mean(np.zeros(grid), mask, 0.1, solver="spectral")
    with pytest.raises(ConfigError, match="separable"):
        P.sample(2, method="spectral")
    # auto still solves (sparse path): compare with dense
    y = np.where(mask, 1.0, 0.0)
    Q = P.precision_dense().numpy()
    D = np.diag(mask.reshape(-1) / 0.1)
    ref = np.linalg.solve(Q + D, D @ y.reshape(-1)).reshape(grid)
    np.testing.assert_allclose(P.posterior_mean(y, mask, 0.1, rtol=1e-11), ref,
                               atol=1e-7 * np.abs(ref).max())


def test_row_varying_kappa_and_tau_stay_separable():
    ny, nx = 6, 4
    kappa = torch.linspace(0.2, 0.5, ny)[:, None].expand(ny, nx).clone()
    P = _prior(ny, nx, 3, kappa=kappa)
    spec = P.precision.spectrum()
    assert spec is not None
    Q = P.precision_dense().numpy()
    X = np.random.default_rng(4).standard_normal((3, P.n, 2))
    np.testing.assert_allclose(spec.apply(X).reshape(-1, 2), Q @ X.reshape(-1, 2),
                               atol=1e-12 * np.abs(Q).max() * np.abs(X).max())


def test_bad_sample_method():
    with pytest.raises(ConfigError, match="method"):
        _prior().sample(1, method="fft")
    with pytest.raises(ConfigError, match="solver"):
        _prior().posterior_mean(np.zeros((4, 7, 5)), np.ones((4, 7, 5), bool), 1.0,
                                solver="fft")


def test_torch_spectral_path_matches_numpy_and_dense():
    """The torch (GPU-ready) path on CPU: same posterior as the dense solve; same draws as
    the numpy spectral sampler for the same white noise."""
    from oceanda.priors.spde.spectral import TorchSeparableSpectrum

    P = _prior(ny=8, nx=6, T=4, alpha=2, mean=0.3)
    rng = np.random.default_rng(5)
    grid = (P.T, *P.shape)
    mask = rng.random(grid) < 0.2
    Y = np.where(mask[None], rng.standard_normal((2, *grid)), 0.0)
    R = 0.1
    Q = P.precision_dense().numpy()
    D = np.diag(mask.reshape(-1) / R)
    mu = np.full(Q.shape[0], 0.3)
    ref = np.stack([np.linalg.solve(Q + D, Q @ mu + D @ y.reshape(-1)).reshape(grid)
                    for y in Y])
    X, info = P.posterior_mean(Y, mask, R, rtol=1e-12, device="cpu", return_info=True)
    assert info.converged
    np.testing.assert_allclose(X, ref, atol=1e-9 * np.abs(ref).max())
    ts = TorchSeparableSpectrum(P.precision.spectrum(), device="cpu")
    Z = rng.standard_normal((P.T, P.n, 3))
    np.testing.assert_allclose(ts.sample(torch.as_tensor(Z)).numpy(), P.precision.spectrum().sample(Z),
                               atol=1e-13)
    with pytest.raises(ConfigError, match="device"):
        P.posterior_mean(Y[0], mask, R, solver="pcg", device="cpu")


@pytest.mark.gpu
def test_torch_spectral_path_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    P = _prior(ny=16, nx=12, T=5, alpha=2)
    rng = np.random.default_rng(6)
    grid = (P.T, *P.shape)
    mask = rng.random(grid) < 0.1
    y = np.where(mask, rng.standard_normal(grid), 0.0)
    xc = P.posterior_mean(y, mask, 0.1, rtol=1e-10, device="cpu")
    xg = P.posterior_mean(y, mask, 0.1, rtol=1e-10, device="cuda")
    np.testing.assert_allclose(xg, xc, atol=1e-8 * np.abs(xc).max())


def test_threaded_kernels_match_serial():
    """threads=2: parallel numba kernels and DCT workers give the serial results."""
    dx, dy = _lat_grid(9, 7)
    kw = dict(T=4, dt=1.0, alpha=2, kappa=0.3, gamma=20.0, tau=2.0)
    P1 = SPDEPrior(dx, dy, None, threads=1, **kw)
    P2 = SPDEPrior(dx, dy, None, threads=2, **kw)
    rng = np.random.default_rng(7)
    grid = (4, 9, 7)
    mask = rng.random(grid) < 0.3
    Y = np.where(mask[None], rng.standard_normal((3, *grid)), 0.0)
    x1 = P1.posterior_mean(Y, mask, 0.1, rtol=1e-10)
    x2 = P2.posterior_mean(Y, mask, 0.1, rtol=1e-10)
    np.testing.assert_allclose(x2, x1, atol=1e-12 * np.abs(x1).max())
    np.testing.assert_allclose(P2.sample(5, rng=3, method="spectral"),
                               P1.sample(5, rng=3, method="spectral"), atol=1e-13)


def test_spectrum_size_guard_falls_back_to_sparse(monkeypatch):
    P = _prior(ny=7, nx=5, T=2)
    monkeypatch.setattr(SPDEPrecision, "spectral_max_bytes", 8 * 5 * 7 * 7 - 1)
    assert P.precision.spectrum() is None
    P2 = _prior(ny=7, nx=5, T=2)
    monkeypatch.setattr(SPDEPrecision, "spectral_max_bytes", 8 * 5 * 7 * 7)
    assert P2.precision.spectrum() is not None
