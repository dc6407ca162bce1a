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
