"""OI against independent references: the dense Gaussian conditional (numpy, explicit
distances) and the information form solved with scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch

from oceanda.assim.base import PatchBatch
from oceanda.assim.oi import EARTH_RADIUS_KM, OptimalInterpolation, oi_patch
from oceanda.assim.registry import build_method
from oceanda.errors import ConfigError


def _tiny(seed=0, T=4, H=5, W=6, frac=0.3):
    rng = np.random.default_rng(seed)
    lon = -60.0 + 0.25 * np.arange(W)
    lat = 35.0 + 0.25 * np.arange(H)
    time = np.arange(T, dtype=float)
    obs = rng.normal(0.3, 0.2, (T, H, W))
    obs[rng.random((T, H, W)) > frac] = np.nan
    return obs, lon, lat, time


def _coords(lon, lat, time):
    lat0 = np.deg2rad(lat.mean())
    t, yy, xx = np.meshgrid(time, lat, lon, indexing="ij")
    xkm = EARTH_RADIUS_KM * np.cos(lat0) * np.deg2rad(xx - lon.mean())
    ykm = EARTH_RADIUS_KM * np.deg2rad(yy - lat.mean())
    return t.ravel(), ykm.ravel(), xkm.ravel()


def _dense_cov(lon, lat, time, Lx, Ly, Lt, s2):
    t, y, x = _coords(lon, lat, time)
    d2 = (((x[:, None] - x[None]) / Lx) ** 2 + ((y[:, None] - y[None]) / Ly) ** 2
          + ((t[:, None] - t[None]) / Lt) ** 2)
    return s2 * np.exp(-d2)


KW = dict(Lx_km=60.0, Ly_km=40.0, Lt_days=3.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oi_equals_dense_gaussian_conditional(seed):
    obs, lon, lat, time = _tiny(seed)
    R, mu, s2 = 0.05**2, 0.1, 0.04
    got = oi_patch(obs, lon, lat, time, R=R, mean=mu, sigma2=s2, **KW)
    C = _dense_cov(lon, lat, time, KW["Lx_km"], KW["Ly_km"], KW["Lt_days"], s2)
    o = np.flatnonzero(np.isfinite(obs.ravel()))
    y = obs.ravel()[o]
    ref = mu + C[:, o] @ np.linalg.solve(C[np.ix_(o, o)] + R * np.eye(o.size), y - mu)
    np.testing.assert_allclose(got.ravel(), ref, rtol=0, atol=1e-10)


def test_oi_equals_information_form_scipy():
    """x = (C^-1 + H^T R^-1 H)^-1 (C^-1 mu + H^T R^-1 y), distances by scipy cdist."""
    obs, lon, lat, time = _tiny(3, T=3, H=4, W=5, frac=0.4)
    R, mu, s2 = 0.03**2, -0.2, 0.09
    got = oi_patch(obs, lon, lat, time, R=R, mean=mu, sigma2=s2, **KW)
    t, y, x = _coords(lon, lat, time)
    pts = np.stack([x / KW["Lx_km"], y / KW["Ly_km"], t / KW["Lt_days"]], axis=1)
    C = s2 * np.exp(-scipy.spatial.distance.cdist(pts, pts, "sqeuclidean"))
    C += 1e-9 * s2 * np.eye(len(C))  # Gaussian kernels are near-singular: tiny jitter
    mask = np.isfinite(obs.ravel())
    Qp = np.linalg.inv(C)
    A = Qp + np.diag(mask / R)
    b = Qp @ np.full(mask.size, mu) + np.where(mask, np.nan_to_num(obs.ravel()), 0) / R
    ref = scipy.linalg.solve(A, b, assume_a="pos")
    np.testing.assert_allclose(got.ravel(), ref, rtol=0, atol=1e-5)


def test_oi_patch_estimates_and_empty_patch():
    obs, lon, lat, time = _tiny(4)
    y = obs[np.isfinite(obs)]
    R = 0.05**2
    est = oi_patch(obs, lon, lat, time, R=R, **KW)
    explicit = oi_patch(obs, lon, lat, time, R=R, mean=y.mean(),
                        sigma2=max(y.var() - R, R), **KW)
    np.testing.assert_array_equal(est, explicit)
    empty = np.full_like(obs, np.nan)
    np.testing.assert_array_equal(oi_patch(empty, lon, lat, time, R=R, mean=0.7, **KW), 0.7)


def test_oi_method_batch_matches_patchwise_and_is_batch_independent():
    pats = [_tiny(s) for s in range(3)]
    B = len(pats)
    obs = torch.tensor(np.stack([p[0] for p in pats]))
    T, H, W = obs.shape[1:]
    batch = PatchBatch(
        obs=obs, ocean=torch.ones(B, H, W, dtype=torch.bool),
        lon=torch.tensor(np.stack([p[1] for p in pats])),
        lat=torch.tensor(np.stack([p[2] for p in pats])),
        time=torch.tensor(np.stack([p[3] for p in pats])),
        dx_m=torch.full((B, H, W), 5e3), dy_m=torch.full((B, H, W), 5e3))
    method = build_method("oi", **KW, noise_std=0.05)
    assert isinstance(method, OptimalInterpolation)
    out = method(batch).mean
    assert out.shape == obs.shape and out.dtype == torch.float64
    for b in range(B):
        one = method(PatchBatch(**{k: getattr(batch, k)[b:b + 1] for k in
                                   ("obs", "ocean", "lon", "lat", "time", "dx_m", "dy_m")}))
        assert torch.equal(one.mean[0], out[b])
        ref = oi_patch(*pats[b], R=0.05**2, **KW)
        np.testing.assert_array_equal(out[b].numpy(), ref)


def test_oi_config_errors():
    with pytest.raises(ConfigError, match="Lx_km"):
        build_method("oi", Lx_km=-1.0)
    with pytest.raises(ConfigError, match="bogus"):
        build_method("oi", bogus=1)
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("nope")
    obs, lon, lat, time = _tiny(0)
    with pytest.raises(ConfigError, match="max_obs"):
        oi_patch(obs, lon, lat, time, R=0.01, max_obs=3, **KW)


# ----------------------------------------------------------------- fast solver (solver="cg")
def _tracks(seed, T=15, H=60, W=60, frac=None):
    """Nadir-like patch (two straight tracks a day) or, with ``frac``, a SWOT-density one
    (``frac`` of the cells observed); smooth truth + noise."""
    rng = np.random.default_rng(seed)
    lon = -62.0 + 0.05 * np.arange(W)
    lat = 36.0 + 0.05 * np.arange(H)
    time = np.arange(T, dtype=float)
    tt, yy, xx = np.meshgrid(time, np.arange(H), np.arange(W), indexing="ij")
    truth = 0.3 * np.sin(xx / 17 + yy / 23 + 0.7 * tt) + 0.1 * np.cos(yy / 9)
    sel = np.zeros((T, H, W), bool)
    if frac is None:
        ys = np.arange(H)
        for t in range(T):
            for _ in range(2):
                xs = np.round(rng.uniform(0, W) + rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * ys).astype(int)
                ok = (xs >= 0) & (xs < W)
                sel[t, ys[ok], xs[ok]] = True
    else:
        sel = rng.random((T, H, W)) < frac
    obs = np.where(sel, truth + 0.02 * rng.normal(size=sel.shape), np.nan)
    return obs, lon, lat, time


def _rel_inc(a, ref, mu):
    """max |a - ref| / max |ref - mu|: difference relative to the analysis increment."""
    return np.abs(a - ref).max() / np.abs(ref - mu).max()


@pytest.mark.parametrize("seed", [0, 1])
def test_oi_cg_path_equals_dense_conditional(seed, monkeypatch):
    """Every patch through the CG (no direct shortcut) == the dense Gaussian conditional."""
    import oceanda.assim.oi as oi_mod

    monkeypatch.setattr(oi_mod, "DIRECT_MAX_OBS", 0)
    obs, lon, lat, time = _tiny(seed, T=5, H=7, W=8, frac=0.4)
    R, mu, s2 = 0.05**2, 0.1, 0.04
    info = {}
    got = oi_patch(obs, lon, lat, time, R=R, mean=mu, sigma2=s2, solver="cg", info=info, **KW)
    assert info["path"] == "cg" and info["iterations"] >= 1
    C = _dense_cov(lon, lat, time, KW["Lx_km"], KW["Ly_km"], KW["Lt_days"], s2)
    o = np.flatnonzero(np.isfinite(obs.ravel()))
    ref = mu + C[:, o] @ np.linalg.solve(C[np.ix_(o, o)] + R * np.eye(o.size), obs.ravel()[o] - mu)
    np.testing.assert_allclose(got.ravel(), ref, rtol=0, atol=1e-9 * np.abs(ref - mu).max())


def test_separable_obs_cov_products_and_preconditioner_against_dense():
    """H C H^T w, C H^T w and the Woodbury preconditioner against dense matrices (float64)."""
    from oceanda.assim.oi import SeparableObsCov, gaussian_1d, local_km

    obs, lon, lat, time = _tiny(5, T=6, H=9, W=10, frac=0.5)
    idx = tuple(np.ascontiguousarray(v, dtype=np.int64) for v in np.nonzero(np.isfinite(obs)))
    xk, yk = local_km(lon, lat)
    s2, R = 0.04, 0.05**2
    op = SeparableObsCov(idx, obs.shape, gaussian_1d(time, time, 3.0), gaussian_1d(yk, yk, 40.0),
                         gaussian_1d(xk, xk, 60.0), s2)
    C = _dense_cov(lon, lat, time, 60.0, 40.0, 3.0, s2)
    o = np.ravel_multi_index(idx, obs.shape)
    w = np.random.default_rng(0).normal(size=o.size)
    scale = np.abs(C).max() * np.abs(w).sum()
    np.testing.assert_allclose(op.matvec(w), C[np.ix_(o, o)] @ w, rtol=0, atol=1e-12 * scale)
    np.testing.assert_allclose(op.cov_ht(w).ravel(), C[:, o] @ w, rtol=0, atol=1e-12 * scale)
    pre = op.woodbury_preconditioner(R)
    assert pre is not None
    # the preconditioner is the inverse of an SPD matrix R I + G G^T with G G^T <= H C H^T:
    # symmetric, and its inverse P satisfies R I <= P <= R I + H C H^T
    Pinv = pre(np.eye(o.size))
    np.testing.assert_allclose(Pinv, Pinv.T, rtol=0, atol=1e-10 / R)
    P = np.linalg.inv(Pinv)
    A = C[np.ix_(o, o)] + R * np.eye(o.size)
    assert np.linalg.eigvalsh(P - R * np.eye(o.size)).min() > -1e-9
    assert np.linalg.eigvalsh(A - P).min() > -1e-9


@pytest.mark.parametrize("case", ["nadir", "swot", "one", "none"])
def test_oi_cg_matches_cholesky_to_1e6(case):
    """The default solver vs the exact Cholesky path: <= 1e-6 of the analysis increment on a
    nadir-density patch (~1,000 observations), a SWOT-density one (10 % of the cells: ~5,000),
    a single observation and an empty patch."""
    if case == "swot":
        obs, lon, lat, time = _tracks(1, frac=0.1)
    else:
        obs, lon, lat, time = _tracks(0)
    if case == "one":
        keep = np.argwhere(np.isfinite(obs))[7]
        one = np.full_like(obs, np.nan)
        one[tuple(keep)] = obs[tuple(keep)]
        obs = one
    if case == "none":
        obs = np.full_like(obs, np.nan)
    kw = dict(Lx_km=100.0, Ly_km=100.0, Lt_days=10.0, R=0.05**2)
    if case == "one":  # the patch's own mean would make the increment zero
        kw.update(mean=0.0, sigma2=0.04)
    info = {}
    fast = oi_patch(obs, lon, lat, time, info=info, **kw)
    exact = oi_patch(obs, lon, lat, time, solver="cholesky", **kw)
    if case == "none":
        np.testing.assert_array_equal(fast, exact)
        return
    if case in ("nadir", "swot"):
        assert info["path"] == "cg" and info["m"] > 800
    assert _rel_inc(fast, exact, kw.get("mean", np.nanmean(obs))) <= 1e-6


def test_oi_solver_config_errors():
    with pytest.raises(ConfigError, match="solver"):
        build_method("oi", solver="lu")
    with pytest.raises(ConfigError, match="rtol"):
        build_method("oi", rtol=0)
    obs, lon, lat, time = _tiny(0)
    with pytest.raises(ConfigError, match="solver"):
        oi_patch(obs, lon, lat, time, R=0.01, solver="qr", **KW)
    from oceanda.assim.fourdvarnet import FourDVarNetMethod
    from oceanda.weights import default_checkpoint

    with pytest.raises(ConfigError, match="oi_solver"):
        FourDVarNetMethod(str(default_checkpoint()), oi_solver="dense")


def test_oi_initialised_4dvarnet_fast_first_guess_matches_exact():
    """The shipped (init="oi") 4DVarNet from the fast OI first guess == from the exact one,
    to float32 rounding, on a 15 x 64 x 64 patch with ~3,000 observations (CG path)."""
    from oceanda.assim.fourdvarnet import FourDVarNetMethod
    from oceanda.weights import default_checkpoint

    obs, lon, lat, time = _tracks(2, T=15, H=64, W=64, frac=0.05)
    B, T, H, W = 1, *obs.shape
    batch = PatchBatch(obs=torch.tensor(obs[None], dtype=torch.float32),
                       ocean=torch.ones(B, H, W, dtype=torch.bool),
                       lon=torch.tensor(lon[None]), lat=torch.tensor(lat[None]),
                       time=torch.tensor(time[None]), dx_m=torch.full((B, H, W), 4.4e3),
                       dy_m=torch.full((B, H, W), 5.5e3))
    fast = FourDVarNetMethod(str(default_checkpoint()))(batch).mean.double()
    exact = FourDVarNetMethod(str(default_checkpoint()), oi_solver="cholesky")(batch).mean.double()
    assert np.isfinite(obs).sum() > 800
    assert float((fast - exact).abs().max()) <= 1e-5 * float(exact.std())
