"""Spread calibration of the SPDE-4DVarNet members (oceanda.train.spread) on synthetic
ensembles: the fitted c satisfies the spread-error identity, per-patch factors enter as the
method applies them, and the training patches are drawn as specified."""

from __future__ import annotations

import numpy as np
import pytest

from oceanda.errors import InputError
from oceanda.train.spread import calibration_fit, fit_spread_scale, mode_factors, pick_patches


def _ensemble(P=3, N=12, T=4, H=5, W=5, seed=0):
    rng = np.random.default_rng(seed)
    net = rng.normal(size=(P, T, H, W))
    truth = net + rng.normal(size=net.shape)                     # error std 1
    mem = net[:, None] + 0.4 * rng.normal(size=(P, N, T, H, W))  # under-dispersed members
    ocean = np.ones((P, T, H, W), bool)
    ocean[:, :, 0, 0] = False
    return {"net": net, "truth": truth, "mem": mem, "ocean": ocean, "r_obs": np.array([0.5, 1.0, 2.0])[:P]}


@pytest.mark.parametrize("mode", ["global", "obs_std"])
def test_fitted_scale_meets_the_spread_error_identity(mode):
    A = _ensemble()
    N = A["mem"].shape[1]
    cal = calibration_fit(A, T=4, mode=mode)
    r = mode_factors(A, mode)[:, None]                            # (P, 1, 1, 1, 1) over members
    c = cal["spread_scale"]
    scaled = A["net"][:, None] + c * r * (A["mem"] - A["net"][:, None])   # what the method returns
    sel = A["ocean"]
    var = scaled.var(axis=1, ddof=1)[sel].mean()
    mse = ((scaled.mean(axis=1) - A["truth"]) ** 2)[sel].mean()
    assert (N + 1) / N * var == pytest.approx(mse, rel=1e-10)
    # the same c as fit_spread_scale on the r-scaled members (independent route)
    mem_r = np.moveaxis(A["net"][:, None] + r * (A["mem"] - A["net"][:, None]), 1, 0)
    assert c == pytest.approx(fit_spread_scale(mem_r, A["net"], A["truth"], sel)["spread_scale"], rel=1e-12)
    assert cal["spread_skill_after"] == pytest.approx(1.0, rel=1e-10)   # with the (N + 1) / N correction
    assert cal["crps_at_optimum"] <= min(cal["crps_at_fitted"], cal["crps_at_1"]) + 1e-12
    assert len(cal["per_patch"]) == 3 and len(cal["per_day"]) == 4


def test_pick_patches_draws_distinct_windows_with_ocean_and_observations():
    ocean = np.ones((20, 20), bool)
    ocean[:, :8] = False                                          # land on the left
    obs = np.full((30, 20, 20), np.nan)
    obs[:, ::3, ::2] = 1.0
    starts = pick_patches(ocean, obs, nt=30, T=5, size=8, n=6, rng=np.random.default_rng(0),
                          min_ocean=0.5, min_obs=10)
    assert len(starts) == len(set(starts)) == 6 and starts == sorted(starts)
    for t, y, x in starts:
        oc = ocean[y:y + 8, x:x + 8]
        assert 0 <= t <= 25 and oc.mean() >= 0.5
        assert np.isfinite(obs[t:t + 5, y:y + 8, x:x + 8][:, oc]).sum() >= 10
    with pytest.raises(InputError, match="patches found"):
        pick_patches(ocean, obs, nt=30, T=5, size=8, n=6, rng=np.random.default_rng(0), min_obs=10 ** 6)
