"""Bootstrap particle smoother: on a linear-Gaussian state-space model its mean and spread
match the exact smoothing posterior (dense Gaussian conditioning, closed form) within
Monte-Carlo error; systematic resampling keeps floor/ceil(P w) copies; L63 sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oceanda.assim.particle import particle_smoother, systematic_resample
from oceanda.dynamics import lorenz63
from oceanda.errors import InputError

DT = torch.float64


def _dense_posterior(F, q2, m0, P0, T, y, mask, R):
    """Exact joint posterior of x_{0:T-1} (numpy): prior moments of the linear Gaussian
    chain built densely, then Kalman-form conditioning on the observed entries."""
    phi = F.shape[0]
    means = [m0]
    covs = [P0]
    for _ in range(T - 1):
        means.append(F @ means[-1])
        covs.append(F @ covs[-1] @ F.T + q2 * np.eye(phi))
    C = np.zeros((T * phi, T * phi))
    for s in range(T):
        Fk = np.eye(phi)
        for t in range(s, T):  # Cov(x_t, x_s) = F^{t-s} Cov(x_s)
            C[t * phi:(t + 1) * phi, s * phi:(s + 1) * phi] = Fk @ covs[s]
            C[s * phi:(s + 1) * phi, t * phi:(t + 1) * phi] = (Fk @ covs[s]).T
            Fk = F @ Fk
    mu = np.concatenate(means)
    obs = np.flatnonzero(mask.reshape(-1))
    K = C[:, obs] @ np.linalg.inv(C[np.ix_(obs, obs)] + R * np.eye(obs.size))
    mean = mu + K @ (y.reshape(-1)[obs] - mu[obs])
    cov = C - K @ C[obs]
    return mean.reshape(T, phi), np.sqrt(np.diag(cov)).reshape(T, phi)


def _filter_mean(F, q2, m0, P0, T, y, mask, R):
    """Kalman filter means (the smoother must differ from them: the test can fail)."""
    phi = F.shape[0]
    m, P, out = m0, P0, []
    for t in range(T):
        if t:
            m, P = F @ m, F @ P @ F.T + q2 * np.eye(phi)
        o = np.flatnonzero(mask[t])
        if o.size:
            H = np.eye(phi)[o]
            K = P @ H.T @ np.linalg.inv(H @ P @ H.T + R * np.eye(o.size))
            m, P = m + K @ (y[t, o] - H @ m), (np.eye(phi) - K @ H) @ P
        out.append(m)
    return np.stack(out)


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_linear_gaussian_matches_exact_smoother_within_mc_error(threshold):
    rng = np.random.default_rng(0)
    T, phi, B, P = 12, 2, 3, 20000
    th = 0.3
    F = 0.98 * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    q2, R = 0.05, 0.1
    m0, P0 = np.array([1.0, -0.5]), np.eye(phi)
    mask = np.zeros((B, T, phi), bool)
    mask[:, 2::3, 0] = True  # first component every third step: the smoother must reach back
    # observations drawn from the model itself
    x = np.zeros((B, T, phi))
    x[:, 0] = m0 + rng.standard_normal((B, phi))
    for t in range(1, T):
        x[:, t] = x[:, t - 1] @ F.T + np.sqrt(q2) * rng.standard_normal((B, phi))
    y = np.where(mask, x + np.sqrt(R) * rng.standard_normal(x.shape), 0.0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.as_tensor(m0) + torch.randn(P, phi, generator=g, dtype=DT)
    Ft = torch.as_tensor(F)
    res = particle_smoother(lambda z: z @ Ft.T, np.sqrt(q2), x0, torch.as_tensor(y), torch.as_tensor(mask), R,
                            generator=g, resample_threshold=threshold, max_bytes=2 * P * T * phi * 8 * 2)
    exact = [_dense_posterior(F, q2, m0, P0, T, y[b], mask[b], R) for b in range(B)]
    mean = np.stack([e[0] for e in exact])
    sd = np.stack([e[1] for e in exact])
    z = (res.mean.numpy() - mean) / sd  # error in posterior standard deviations
    ess = res.ess_min.numpy()
    assert ess.min() > 500 and res.n_unique0.min() > 100
    # the Monte-Carlo error of a weighted mean of ~ESS draws is ~1/sqrt(ESS) posterior sds
    # (early times: fewer distinct ancestors, so a margin of a few)
    assert np.sqrt((z ** 2).mean()) < 4.0 / np.sqrt(float(res.n_unique0.min()))
    assert np.abs(z).max() < 0.25
    np.testing.assert_allclose(res.std.numpy(), sd, rtol=0.1)
    # the filter mean is a different estimate at early times: the comparison above can fail
    filt = np.stack([_filter_mean(F, q2, m0, P0, T, y[b], mask[b], R) for b in range(B)])
    assert np.abs((filt - mean) / sd).max() > 1.0


def test_systematic_resampling_counts():
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.0, 0.0, 1.0, 0.0]], dtype=DT)
    logw = torch.log(w)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = systematic_resample(logw, g)
        counts = torch.stack([torch.bincount(r, minlength=4) for r in a]).to(DT)
        assert ((counts - 4 * w).abs() < 1.0).all()  # floor or ceil of P w_i
        assert (a[1] == 2).all()


def test_lorenz63_posterior_beats_prior_and_input_errors():
    dt, T = 0.025, 16
    g = torch.Generator().manual_seed(0)
    x0 = lorenz63.sample_attractor(2, dt, 300, dt ** 0.5, g)
    x = lorenz63.simulate(x0, T - 1, dt, dt ** 0.5, g)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, ::4, 0] = True
    y = torch.where(mask, x + 0.5 * torch.randn(x.shape, generator=g, dtype=DT), torch.zeros_like(x))
    pool = lorenz63.sample_attractor(4000, dt, 300, dt ** 0.5, g)
    res = particle_smoother(lambda z: lorenz63.step(z, dt), dt ** 0.5, pool, y, mask, 0.25, generator=g)
    prior_err = (pool.mean(0) - x).pow(2).mean().sqrt()
    post_err = (res.mean - x).pow(2).mean().sqrt()
    assert post_err < 0.2 * prior_err
    assert res.mean.shape == x.shape and res.ess_min.shape == (2,)
    with pytest.raises(InputError, match="x0_particles"):
        particle_smoother(lambda z: z, 0.1, pool[:, :2], y, mask, 0.25)
    with pytest.raises(InputError, match="resample_threshold"):
        particle_smoother(lambda z: z, 0.1, pool, y, mask, 0.25, resample_threshold=0.0)


def test_run_particle_smoother_uses_the_given_x0_particles():
    """``x0_particles`` replaces the attractor draws: a point mass at a window's true initial
    state makes the smoothed mean at t = 0 that state exactly (whole paths are resampled)."""
    from oceanda.validation import runner as R
    from oceanda.validation.data import PairSet, make_lorenz63

    data = make_lorenz63(8, 2, spinup_steps=100, seed=4)
    one = PairSet(*(getattr(data.test, k)[:1] for k in ("x", "y", "mask", "traj", "process")))
    x0 = data.norm.to_raw(one.x)[0, 0]
    s = R.ParticleSettings(n_particles=500, seed=0)
    res, _ = R.run_particle_smoother(data, one, s, x0_particles=x0.expand(500, 3))
    torch.testing.assert_close(res.mean[0, 0].double(), x0, rtol=0, atol=1e-5)
    default, _ = R.run_particle_smoother(data, one, s)  # the attractor's draws: spread at t = 0
    assert float((default.mean[0, 0].double() - x0).abs().max()) > 1e-3
