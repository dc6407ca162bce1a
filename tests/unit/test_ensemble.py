"""Matheron conditional ensembles: exact posterior draws for linear reconstructions, and the
``spde_oi`` method (posterior mean vs dense, calibrated 200-member ensemble)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oceanda.assim.base import PatchBatch
from oceanda.assim.ensemble import matheron_members
from oceanda.metrics.ensemble import spread_skill_members
from oceanda.assim.registry import build_method
from oceanda.errors import ConfigError
from oceanda.priors.spde import SPDEPrior, tau_for_std


def test_matheron_members_have_the_exact_posterior_covariance():
    rng = np.random.default_rng(0)
    n = 12
    M = rng.standard_normal((n, n))
    P = M @ M.T / n + 0.5 * np.eye(n)
    mu = rng.standard_normal(n)
    mask = rng.random(n) < 0.5
    R = 0.3
    Hm = np.eye(n)[mask]
    K = P @ Hm.T @ np.linalg.inv(Hm @ P @ Hm.T + R * np.eye(mask.sum()))
    post_cov = (np.eye(n) - K @ Hm) @ P

    def reconstruct(Y):  # exact Kalman-form posterior mean, NaN outside the mask ignored
        return mu + (np.nan_to_num(Y[:, mask]) - mu[mask]) @ K.T

    y = rng.standard_normal(n)
    N = 20000
    S = rng.multivariate_normal(mu, P, size=N)
    X, xm = matheron_members(reconstruct, y, mask, R, S, rng=1, include_mean=True)
    np.testing.assert_allclose(xm, reconstruct(np.where(mask, y, np.nan)[None])[0])
    C = np.cov(X.T)
    se = np.sqrt((np.outer(np.diag(post_cov), np.diag(post_cov)) + post_cov**2) / N)
    assert np.abs((C - post_cov) / se).max() < 5
    z = (X.mean(0) - xm) / np.sqrt(np.diag(post_cov) / N)
    assert np.abs(z).max() < 5
    # torch in, torch out
    Xt = matheron_members(lambda Y: torch.as_tensor(reconstruct(Y.numpy())), torch.as_tensor(y),
                          torch.as_tensor(mask), R, torch.as_tensor(S[:5]), rng=1)
    assert isinstance(Xt, torch.Tensor) and Xt.shape == (5, n)


def _nadir_mask(T, ny, nx, rng, tracks=2):
    mask = np.zeros((T, ny, nx), bool)
    for k in range(T):
        for _ in range(tracks):
            j0, slope = rng.integers(0, nx), rng.choice([-0.6, 0.6])
            ii = np.arange(ny)
            jj = np.round(j0 + slope * ii).astype(int)
            ok = (jj >= 0) & (jj < nx)
            mask[k, ii[ok], jj[ok]] = True
    return mask


CFG = dict(kappa=0.5, gamma=25.0, std=0.1, noise_std=0.02, mean=0.0, dt=1.0, alpha=2,
           length_unit_m=1000.0)


def _setup(ny=10, nx=12, T=5):
    dx = np.full((ny, nx), 5000.0) * np.cos(np.deg2rad(np.linspace(33, 34, ny)))[:, None]
    dy = np.full((ny, nx), 5550.0)
    ocean = np.ones((ny, nx), bool)
    ocean[4:6, 0:2] = False
    km = dict(dx=dx / 1000, dy=dy / 1000, ocean=ocean)
    area = float(np.mean((km["dx"] * km["dy"])[ocean]))
    prior = SPDEPrior(km["dx"], km["dy"], ocean, T=T, dt=1.0, alpha=2, kappa=0.5, gamma=25.0,
                      tau=tau_for_std(0.1, 0.5, 25.0, area))
    return dx, dy, ocean, prior


def test_spde_oi_mean_and_ensemble_match_exact_posterior():
    dx, dy, ocean, prior = _setup()
    T, (ny, nx) = prior.T, prior.shape
    rng = np.random.default_rng(3)
    method = build_method("spde_oi", members=200, **CFG)
    Q = prior.precision_dense().numpy()
    pooled_members, pooled_truth = [], []
    for rep in range(4):
        truth = prior.sample(1, rng=100 + rep)[0]
        mask = _nadir_mask(T, ny, nx, rng) & ocean[None]
        obs = np.where(mask, truth + 0.02 * rng.standard_normal(truth.shape), np.nan)
        mean, std, members = method.patch(obs, ocean, dx, dy, seed=rep)
        D = np.diag(mask.reshape(-1) / 0.02**2)
        Ppost = np.linalg.inv(Q + D)
        ref = Ppost @ (D @ np.nan_to_num(obs).reshape(-1))
        ref_std = np.sqrt(np.diag(Ppost)).reshape(T, ny, nx)
        # posterior mean: exact to the CG tolerance
        assert np.abs(mean.reshape(-1) - ref).max() < 1e-6 * np.abs(ref).max()
        # ensemble std vs exact posterior std: relative MC error 1/sqrt(2 (N - 1))
        z = (std / ref_std - 1.0) * np.sqrt(2 * 199)
        assert np.abs(z).max() < 5.0, np.abs(z).max()
        # members' mean vs exact mean within MC error
        zm = (members.mean(0) - mean) / (ref_std / np.sqrt(200))
        assert np.abs(zm).max() < 5.0
        pooled_members.append(members)
        pooled_truth.append(truth)
    # spread/skill with the (N + 1) / N correction over the 4 truths: 1 in expectation
    ratio = spread_skill_members(np.stack(pooled_members, 1), np.stack(pooled_truth))
    assert 0.85 < ratio < 1.15, ratio  # measured 1.011 (4 truths x 200 members)


def test_spde_oi_patch_batch_is_deterministic_and_batch_independent():
    dx, dy, ocean, prior = _setup(6, 7, 3)
    T, (ny, nx) = prior.T, prior.shape
    rng = np.random.default_rng(0)
    obs = np.where(_nadir_mask(T, ny, nx, rng), 0.1, np.nan)[None].repeat(2, 0)
    obs[1] *= -1

    def batch(sel):
        b = len(sel)
        return PatchBatch(
            obs=torch.as_tensor(obs[sel], dtype=torch.float32),
            ocean=torch.as_tensor(ocean)[None].repeat(b, 1, 1),
            lon=torch.as_tensor(np.array([np.arange(nx) + 10.0 * i for i in sel]),
                                dtype=torch.float32),
            lat=torch.as_tensor(np.array([np.arange(ny) + 30.0 for _ in sel]),
                                dtype=torch.float32),
            time=torch.zeros(b, T), dx_m=torch.as_tensor(dx, dtype=torch.float32)[None]
            .repeat(b, 1, 1), dy_m=torch.as_tensor(dy, dtype=torch.float32)[None].repeat(b, 1, 1))

    method = build_method("spde_oi", members=8, return_members=True, **CFG)
    both = method(batch([0, 1]))
    alone = method(batch([1]))
    assert both.mean.shape == (2, T, ny, nx) and both.members.shape == (2, 8, T, ny, nx)
    torch.testing.assert_close(both.members[1], alone.members[0])
    torch.testing.assert_close(both.std[1], alone.std[0])
    plain = build_method("spde_oi", **CFG)(batch([0]))
    assert plain.std is None and plain.members is None
    torch.testing.assert_close(plain.mean[0], both.mean[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(kappa=0.0), dict(noise_std=0.0), dict(members=1),
                                 dict(dt=-1.0), dict(mean="median"), dict(threads=0),
                                 dict(block_size=0), dict(factor="qr"), dict(solver="lu"),
                                 dict(backend="cholmod"), dict(solver="pcg", coarse=[2, 2])])
def test_spde_oi_bad_config(bad):
    with pytest.raises(ConfigError):
        build_method("spde_oi", **dict(CFG, **bad))


def test_spde_truth_stream_matches_prior_statistics():
    from types import SimpleNamespace

    from oceanda.priors.spde_truth import spde_truth

    ny = nx = 40
    grid = SimpleNamespace(dx_m=np.full((ny, nx), 5000.0), dy_m=np.full((ny, nx), 5000.0),
                           ocean=np.ones((ny, nx), bool))
    grid.ocean[:3, :3] = False
    fields = list(spde_truth(grid, 30, 0, dict(kappa=0.5, gamma=25.0, std=0.1), "cpu", None))
    X = np.stack(fields)
    assert X.shape == (30, ny, nx) and X.dtype == np.float32
    assert np.isnan(X[:, :3, :3]).all() and np.isfinite(X[:, 3:, 3:]).all()
    # same seed, same stream; the first field is the stationary draw of the prior
    again = next(iter(spde_truth(grid, 1, 0, dict(kappa=0.5, gamma=25.0, std=0.1), "cpu", None)))
    np.testing.assert_array_equal(again, X[0])
    # interior std ~ 0.1 (continuum formula; 30 correlated days: loose check)
    s = float(np.nanstd(X[:, 10:30, 10:30]))
    assert 0.05 < s < 0.2, s
    with pytest.raises(ConfigError, match="truth.speed"):
        spde_truth(grid, 2, 0, dict(speed=1.0), "cpu", None)


# spde_oi configurations x what is compared, one tolerance per pair (max difference relative to
# the reference's max): "mean" = the mean alone (no members) against the dense posterior mean,
# "members" = the mean and 6 members against those of the default configuration (same draws)
SPDE_OI_TOLERANCES = {
    ("default", "mean"): 1e-8,
    ("numba2", "mean"): 1e-8,
    ("whitened", "mean"): 1e-8,
    ("pcg", "members"): 1e-7,
    ("pcg_numba2", "members"): 1e-7,
    ("lu_block64", "members"): 1e-7,
    ("threads2_block4", "members"): 1e-7,
}
SPDE_OI_CONFIGS = {
    "default": dict(),
    "numba2": dict(backend="numba", threads=2),
    "whitened": dict(solver="whitened"),
    "pcg": dict(solver="pcg"),
    "pcg_numba2": dict(solver="pcg", backend="numba", threads=2),
    "lu_block64": dict(threads=1, block_size=64, factor="lu"),
    "threads2_block4": dict(threads=2, block_size=4),
}


def test_spde_oi_solvers_and_backends_give_the_exact_posterior():
    dx, dy, ocean, prior = _setup()
    T, (ny, nx) = prior.T, prior.shape
    rng = np.random.default_rng(11)
    truth = prior.sample(1, rng=2)[0]
    mask = _nadir_mask(T, ny, nx, rng) & ocean[None]
    obs = np.where(mask, truth + 0.02 * rng.standard_normal(truth.shape), np.nan)
    Q = prior.precision_dense().numpy()
    D = np.diag(mask.reshape(-1) / 0.02**2)
    dense = np.linalg.solve(Q + D, D @ np.nan_to_num(obs).reshape(-1)).reshape(T, ny, nx)

    def run(config, members):
        m = build_method("spde_oi", members=members, **dict(CFG, rtol=1e-10,
                                                            **SPDE_OI_CONFIGS[config]))
        return m.patch(obs, ocean, dx, dy, seed=4)

    ref_mean, _, ref_members = run("default", 6)
    for (config, what), tol in SPDE_OI_TOLERANCES.items():
        if what == "mean":
            mean, std, mem = run(config, 0)
            assert std is None and mem is None
            assert np.abs(mean - dense).max() < tol * np.abs(dense).max(), config
        else:
            mean, _, mem = run(config, 6)
            assert np.abs(mean - ref_mean).max() < tol * np.abs(ref_mean).max(), config
            assert np.abs(mem - ref_members).max() < tol * np.abs(ref_members).max(), config


def test_spde_oi_patch_overhanging_the_domain_takes_the_exact_spectral_path(monkeypatch):
    """Ocean cells filling a rectangle inside closed padding (a patch overhanging the domain)
    on a regular lon/lat grid: solved spectrally on the rectangle, equal on the ocean cells
    to the whole-patch sparse solve (the padding is decoupled by no-flux faces)."""
    from oceanda.priors.spde import posterior

    T, ny, nx = 4, 12, 10
    lat = np.linspace(35.0, 35.55, ny)
    rng = np.random.default_rng(5)
    # metric factors varying with latitude only, up to rounding-level noise along the rows
    dx = np.repeat((5566.0 * np.cos(np.deg2rad(lat)))[:, None], nx, 1) * (
        1.0 + 3e-12 * rng.standard_normal((ny, nx)))
    dy = np.full((ny, nx), 5550.0)
    ocean = np.zeros((ny, nx), bool)
    ocean[3:, :7] = True  # the domain's corner: padding above and to the right
    obs = np.where((rng.random((T, ny, nx)) < 0.2) & ocean[None],
                   0.1 * rng.standard_normal((T, ny, nx)), np.nan)
    calls = []
    spectral = posterior.SOLVERS["spectral"]
    monkeypatch.setitem(posterior.SOLVERS, "spectral",
                        lambda *a: calls.append(1) or spectral(*a))
    fast = build_method("spde_oi", members=4, **dict(CFG, rtol=1e-11))
    sparse = build_method("spde_oi", members=4, **dict(CFG, rtol=1e-11, solver="pcg"))
    mean, std, mem = fast.patch(obs, ocean, dx, dy, seed=1)
    assert calls
    ref, ref_std, _ = sparse.patch(obs, ocean, dx, dy, seed=1)
    assert len(calls) == 1
    oc = np.broadcast_to(ocean, mean.shape)
    assert np.abs(mean - ref)[oc].max() < 1e-9 * np.abs(ref[oc]).max()
    assert np.array_equal(mean[~oc], ref[~oc])  # the prior mean off the ocean in both
    assert np.isfinite(std[oc]).all() and np.isnan(std[~oc]).all()
    assert np.isfinite(mem[:, oc]).all() and mem.shape == (4, T, ny, nx)


@pytest.mark.parametrize("land", [False, True])
def test_spde_oi_with_the_oi_mean_is_the_exact_posterior_around_the_oi_analysis(land):
    """mean="oi": the prior mean is the OI analysis of the same observations (oi_patch, method=oi's
    settings); the analysis is the dense posterior mean mu + (Q + D)^{-1} D (y - mu) (open ocean:
    the spectral path; with land: the sparse one), and the patch refuses a missing mean."""
    from oceanda.assim.oi import oi_patch
    from oceanda.errors import InputError

    T, ny, nx = 4, 8, 9
    dx = np.full((ny, nx), 5000.0)
    dy = np.full((ny, nx), 5550.0)
    ocean = np.ones((ny, nx), bool)
    if land:
        ocean[3:5, 0:2] = False
    rng = np.random.default_rng(7)
    lon, lat, time = -60 + 0.05 * np.arange(nx), 35 + 0.05 * np.arange(ny), np.arange(T) + 3.0
    t, y, x = np.mgrid[0:T, 0:ny, 0:nx]
    truth = 0.5 + 0.3 * np.sin(0.5 * x + 0.2 * t) * np.cos(0.4 * y)
    mask = (rng.random((T, ny, nx)) < 0.3) & ocean[None]
    obs = np.where(mask, truth + 0.02 * rng.standard_normal(truth.shape), np.nan)
    oi_set = dict(oi_Lx_km=30.0, oi_Ly_km=40.0, oi_Lt_days=5.0, oi_noise_std=0.03)
    method = build_method("spde_oi", **dict(CFG, mean="oi", rtol=1e-11, **oi_set))
    b = PatchBatch(obs=torch.as_tensor(obs)[None], ocean=torch.as_tensor(ocean)[None],
                   lon=torch.as_tensor(lon)[None], lat=torch.as_tensor(lat)[None], time=torch.as_tensor(time)[None],
                   dx_m=torch.as_tensor(dx)[None], dy_m=torch.as_tensor(dy)[None])
    out = method(b).mean[0].numpy()
    mu = oi_patch(obs, lon, lat, time, Lx_km=30.0, Ly_km=40.0, Lt_days=5.0, R=0.03**2, solver="cholesky")
    prior = SPDEPrior(dx / 1000, dy / 1000, ocean, T=T, dt=1.0, alpha=2, kappa=0.5, gamma=25.0,
                      tau=tau_for_std(0.1, 0.5, 25.0, float(np.mean((dx * dy / 1e6)[ocean]))))
    Q = prior.precision_dense().numpy()
    D = np.diag(mask.reshape(-1) / 0.02**2)
    m = mu.reshape(-1)
    ref = (m + np.linalg.solve(Q + D, D @ (np.nan_to_num(obs).reshape(-1) - m))).reshape(T, ny, nx)
    oc = np.broadcast_to(ocean, ref.shape)
    assert np.abs(out - ref)[oc].max() < 1e-6 * np.abs(ref[oc]).max()
    assert np.abs(out - mu)[oc].max() > 1e-3  # a real correction of the OI
    with pytest.raises(InputError, match="mean='oi'"):
        method.patch(obs, ocean, dx, dy)
    with pytest.raises(ConfigError, match="oi_Lt_days"):
        build_method("spde_oi", **dict(CFG, mean="oi", oi_Lt_days=0.0))
