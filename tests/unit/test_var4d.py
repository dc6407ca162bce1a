"""Weak-constraint 4D-Var: gradient / Hessian assembly, linear-Gaussian case == Kalman
smoother (Rauch-Tung-Striebel), nonlinear L63 convergence; block-tridiagonal band layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oceanda.linalg import band_to_dense
from oceanda.assim.var4d import MixtureBackground, WeakConstraint4DVar
from oceanda.dynamics import lorenz63
from oceanda.errors import InputError
from oceanda.priors.empirical import (
    LinearMarkovPrior,
    block_tridiagonal_to_band,
    markov_precision_blocks,
)

DT = torch.float64


def _rts_smoother(F, Qm, m0, P0, y, mask, R):
    """Kalman filter + Rauch-Tung-Striebel smoother (numpy, one trajectory): the exact
    posterior mean of the linear-Gaussian state-space model."""
    T, phi = y.shape
    mf, Pf, mp, Pp = [], [], [], []
    m, P = m0, P0
    for t in range(T):
        if t > 0:
            m, P = F @ m, F @ P @ F.T + Qm
        mp.append(m), Pp.append(P)
        obs = np.flatnonzero(mask[t])
        if obs.size:
            H = np.eye(phi)[obs]
            S = H @ P @ H.T + R * np.eye(obs.size)
            K = P @ H.T @ np.linalg.inv(S)
            m = m + K @ (y[t, obs] - H @ m)
            P = (np.eye(phi) - K @ H) @ P
        mf.append(m), Pf.append(P)
    ms = [None] * T
    ms[-1] = mf[-1]
    for t in range(T - 2, -1, -1):
        C = Pf[t] @ F.T @ np.linalg.inv(Pp[t + 1])
        ms[t] = mf[t] + C @ (ms[t + 1] - mp[t + 1])
    return np.stack(ms)


def _linear_problem(seed=0, B=3, T=12, phi=3):
    g = np.random.default_rng(seed)
    F = np.eye(phi) + 0.1 * g.standard_normal((phi, phi))
    A = g.standard_normal((phi, phi))
    Qm = 0.05 * (A @ A.T + phi * np.eye(phi)) / phi
    A = g.standard_normal((phi, phi))
    P0 = A @ A.T + np.eye(phi)
    m0 = g.standard_normal(phi)
    y = g.standard_normal((B, T, phi))
    mask = g.random((B, T, phi)) < 0.3
    return F, Qm, m0, P0, y, mask, 0.2


def test_block_tridiagonal_band_layout():
    g = torch.Generator().manual_seed(0)
    T, phi = 5, 3
    D = torch.randn(2, T, phi, phi, generator=g, dtype=DT)
    D = D + D.transpose(-1, -2)
    S = torch.randn(2, T - 1, phi, phi, generator=g, dtype=DT)
    dense = torch.zeros(2, T * phi, T * phi, dtype=DT)
    for t in range(T):
        dense[:, t * phi:(t + 1) * phi, t * phi:(t + 1) * phi] = D[:, t]
    for t in range(T - 1):
        dense[:, (t + 1) * phi:(t + 2) * phi, t * phi:(t + 1) * phi] = S[:, t]
        dense[:, t * phi:(t + 1) * phi, (t + 1) * phi:(t + 2) * phi] = S[:, t].transpose(-1, -2)
    band = block_tridiagonal_to_band(D, S)
    assert band.shape == (2, T * phi, 2 * phi)
    torch.testing.assert_close(band_to_dense(band), dense, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_4dvar_one_gauss_newton_step_is_kalman_smoother(seed):
    F, Qm, m0, P0, y, mask, R = _linear_problem(seed)
    t = lambda a: torch.as_tensor(a, dtype=DT)  # noqa: E731
    Ft = t(F)
    var = WeakConstraint4DVar(
        lambda x: (x @ Ft.T, Ft.expand(*x.shape[:-1], 3, 3)), t(Qm), R, t(m0), t(P0),
        max_iter=1, lm_init=0.0, adaptive=False,
    )
    x_init = torch.randn(y.shape, dtype=DT, generator=torch.Generator().manual_seed(seed)) * 5
    res = var.solve(x_init, t(y), torch.as_tensor(mask))
    ref = np.stack([_rts_smoother(F, Qm, m0, P0, y[b], mask[b], R) for b in range(y.shape[0])])
    np.testing.assert_allclose(res.x.numpy(), ref, rtol=0, atol=1e-9)
    assert res.iters.tolist() == [1, 1, 1]
    # the same posterior mean through the linear-Markov prior (information form, banded MAP)
    prior = LinearMarkovPrior(Ft, t(Qm), t(m0), t(P0), y.shape[1])
    z = prior.map(t(y).reshape(3, -1), torch.as_tensor(mask).reshape(3, -1), R)
    np.testing.assert_allclose(z.reshape(ref.shape).numpy(), ref, rtol=0, atol=1e-9)


def _l63_var(T=16, **kw):
    dt = 0.025
    return WeakConstraint4DVar(
        lambda x: lorenz63.step_and_jacobian(x, dt), dt * torch.eye(3, dtype=DT), 0.16,
        torch.tensor([0.0, 0.0, 23.5], dtype=DT), 60.0 * torch.eye(3, dtype=DT), **kw,
    )


def _l63_window(T=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = lorenz63.sample_attractor(B, 0.025, spinup_steps=300, generator=g)
    x = lorenz63.simulate(x0, T - 1, 0.025, noise_std=0.025 ** 0.5, generator=g)
    mask = torch.zeros(B, T, 3, dtype=torch.bool)
    mask[:, ::4, 0] = True
    y = x + 0.4 * torch.randn(x.shape, generator=g, dtype=DT)
    return x, y, mask


def test_gradient_and_gauss_newton_hessian_match_autograd():
    var = _l63_var()
    x, y, mask = _l63_window()
    xp = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=DT))
    J, g, D, S = var.linearise(xp, y, mask)
    xr = xp.clone().requires_grad_(True)
    Ja = var.cost(xr, y, mask)
    (ga,) = torch.autograd.grad(Ja.sum(), xr)
    torch.testing.assert_close(J, Ja.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(g, ga, rtol=1e-10, atol=1e-9)
    # Gauss-Newton Hessian = J_r^T J_r with residuals r(x) (weights as Cholesky factors)
    Lq = torch.linalg.cholesky(var.Qm_inv)
    Lb = torch.linalg.cholesky(var.B_inv)

    def resid(flat):
        xx = flat.reshape(1, *x.shape[1:])
        nxt, _ = var.model(xx[:, :-1])
        r0 = (xx[:, 0] - var.xb) @ Lb
        rq = ((xx[:, 1:] - nxt) @ Lq).reshape(-1)
        ro = (torch.where(mask[:1], xx - y[:1], torch.zeros_like(xx)) / var.R.sqrt()).reshape(-1)
        return torch.cat([r0.reshape(-1), rq, ro])

    Jr = torch.autograd.functional.jacobian(resid, xp[0].reshape(-1))
    G = block_tridiagonal_to_band(D, S)[:1]
    torch.testing.assert_close(band_to_dense(G)[0], Jr.T @ Jr, rtol=1e-10, atol=1e-8)


def test_markov_blocks_constant_model_match_dense():
    F, Qm, m0, P0, *_ = _linear_problem(2)
    t = lambda a: torch.as_tensor(a, dtype=DT)  # noqa: E731
    T, phi = 6, 3
    D, S = markov_precision_blocks(t(F), torch.linalg.inv(t(Qm)), torch.linalg.inv(t(P0)), T)
    # dense: L^T S^-1 L with L block bidiagonal (I, -F)
    Lm = torch.eye(T * phi, dtype=DT)
    for k in range(1, T):
        Lm[k * phi:(k + 1) * phi, (k - 1) * phi:k * phi] = -t(F)
    Sinv = torch.block_diag(torch.linalg.inv(t(P0)), *[torch.linalg.inv(t(Qm))] * (T - 1))
    torch.testing.assert_close(band_to_dense(block_tridiagonal_to_band(D, S)), Lm.T @ Sinv @ Lm,
                               rtol=1e-12, atol=1e-10)


def test_l63_4dvar_converges_and_decreases_cost():
    var = _l63_var(max_iter=40, ftol=1e-8, decrement_tol=None)
    x, y, mask = _l63_window(seed=4)
    x_init = x + 1.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    res = var.solve(x_init, y, mask)
    hist = torch.stack(res.history)  # (k+1, B)
    for b in range(hist.shape[1]):
        h = hist[:, b][~torch.isnan(hist[:, b])]
        assert bool((h[1:] <= h[:-1] + 1e-12).all()), "cost must not increase"
    assert bool(res.converged.all())
    # the minimiser is a stationary point: gradient ~ 0
    _, g, _, _ = var.linearise(res.x, y, mask)
    assert float(g.abs().max()) < 1e-2
    # from near the truth it finds a trajectory closer to the truth than the start
    assert float((res.x - x).pow(2).mean()) < float((x_init - x).pow(2).mean())


def test_input_errors():
    from oceanda.errors import InputError

    var = _l63_var()
    x, y, mask = _l63_window()
    with pytest.raises(InputError, match="x_init"):
        var.solve(x[..., :2], y, mask)
    with pytest.raises(InputError, match="mask"):
        var.solve(x, y, mask[:, :3])


def test_decrement_stop_is_near_the_minimum_and_earlier():
    """Stopping on the predicted decrease (< decrement_tol) ends within ~tol of the cost
    reached by running to a tight relative tolerance, in no more iterations."""
    x, y, mask = _l63_window(seed=6)
    x_init = x + 1.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    tight = _l63_var(max_iter=60, ftol=1e-12, decrement_tol=None).solve(x_init, y, mask)
    loose = _l63_var(max_iter=60, ftol=0.0, decrement_tol=0.05).solve(x_init, y, mask)
    assert bool(loose.converged.all())
    assert bool((loose.iters <= tight.iters).all())
    assert float((loose.cost - tight.cost).max()) < 0.1


def test_empirical_gaussian_map_is_conditional_mean():
    """Kalman-form MAP of the moment-matched Gaussian == mu + P[:, o] (P[o, o] + R I)^-1 (y_o - mu_o)."""
    from oceanda.priors.empirical import EmpiricalGaussian

    g = np.random.default_rng(3)
    X = g.standard_normal((200, 12)) @ g.standard_normal((12, 12))
    prior = EmpiricalGaussian.fit(torch.as_tensor(X))
    y = torch.as_tensor(g.standard_normal((4, 12)))
    mask = torch.as_tensor(g.random((4, 12)) < 0.3)
    mask[0] = False  # no observation: the prior mean
    out = prior.map(y, mask, 0.3).numpy()
    mu, P = prior.mean.numpy(), prior.cov.numpy()
    np.testing.assert_allclose(P, np.cov(X.T) + 1e-6 * np.eye(12), rtol=1e-12, atol=1e-12)
    for b in range(4):
        o = np.flatnonzero(mask[b].numpy())
        ref = mu + P[:, o] @ np.linalg.solve(P[np.ix_(o, o)] + 0.3 * np.eye(o.size), y[b].numpy()[o] - mu[o])
        np.testing.assert_allclose(out[b], ref, rtol=0, atol=1e-10)


def _mixture(K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, 3, 3, generator=g, dtype=DT)
    covs = A @ A.transpose(-1, -2) * 20.0 + 5.0 * torch.eye(3, dtype=DT)
    means = torch.tensor([[-8.0, -8.0, 25.0], [8.0, 8.0, 25.0], [0.0, 0.0, 15.0]], dtype=DT)[:K]
    return MixtureBackground(torch.tensor([0.5, 0.3, 0.2], dtype=DT)[:K], means, covs)


def test_mixture_background_one_component_is_the_gaussian_background():
    """K = 1 gives the Gaussian term exactly: the same cost, gradient, Hessian band and minimum."""
    xb, B = torch.tensor([0.0, 0.0, 23.5], dtype=DT), 60.0 * torch.eye(3, dtype=DT)
    gauss = _l63_var(max_iter=20)
    mix = _l63_var(max_iter=20, background=MixtureBackground(torch.ones(1, dtype=DT), xb[None], B[None]))
    x, y, mask = _l63_window(seed=6)
    xp = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=DT)
    for a, b in zip(gauss.linearise(xp, y, mask), mix.linearise(xp, y, mask)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gauss.solve(xp, y, mask).x, mix.solve(xp, y, mask).x, rtol=1e-9, atol=1e-9)


def test_mixture_background_cost_gradient_and_block():
    """Cost = -log of the mixture density (scipy) up to one constant; gradient = autograd's
    (and gradcheck); the Gauss-Newton block = sum_k r_k C_k^-1 with scipy's responsibilities."""
    from scipy.stats import multivariate_normal

    bg = _mixture()
    x0 = torch.tensor([[-6.0, -7.0, 24.0], [5.0, 9.0, 28.0], [0.5, -1.0, 14.0], [20.0, -20.0, 40.0]], dtype=DT)
    comps = [multivariate_normal(bg.means[k].numpy(), torch.linalg.inv(bg.prec[k]).numpy()) for k in range(3)]
    w = bg.log_w.exp().numpy()
    dens = np.stack([w[k] * comps[k].pdf(x0.numpy()) for k in range(3)], -1)  # (B, K)
    c = bg.cost(x0).numpy() + np.log(dens.sum(-1))
    np.testing.assert_allclose(c, c[0], rtol=0, atol=1e-10)  # one constant for every x0
    xr = x0.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(bg.cost(xr).sum(), xr)
    g, H = bg.gradient_and_block(x0)
    torch.testing.assert_close(g, ga, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: bg.cost(z), (x0.clone().requires_grad_(True),))
    r = dens / dens.sum(-1, keepdims=True)
    torch.testing.assert_close(H, torch.einsum("bk,kij->bij", torch.as_tensor(r), bg.prec), rtol=1e-9, atol=1e-12)


def test_4dvar_with_mixture_background_gradient_and_convergence():
    var = _l63_var(max_iter=60, ftol=1e-10, decrement_tol=None, background=_mixture())
    x, y, mask = _l63_window(seed=8)
    xp = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=DT)
    J, g, _, _ = var.linearise(xp, y, mask)
    xr = xp.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(var.cost(xr, y, mask).sum(), xr)
    torch.testing.assert_close(J, var.cost(xp, y, mask), rtol=1e-12, atol=0)
    torch.testing.assert_close(g, ga, rtol=1e-10, atol=1e-9)
    res = var.solve(xp, y, mask)
    assert bool(res.converged.all())
    _, g, _, _ = var.linearise(res.x, y, mask)
    assert float(g.abs().max()) < 1e-3


def test_mixture_fit_recovers_a_known_mixture_and_refuses_bad_input():
    truth = _mixture(K=2, seed=1)
    g = torch.Generator().manual_seed(2)
    n = 20000
    comp = (torch.rand(n, generator=g, dtype=DT) < truth.log_w.exp()[1]).long()
    L = torch.linalg.cholesky(torch.linalg.inv(truth.prec))
    x = truth.means[comp] + (L[comp] @ torch.randn(n, 3, 1, generator=g, dtype=DT)).squeeze(-1)
    fit = MixtureBackground.fit(x, 2, seed=0)
    order = fit.means[:, 0].argsort()  # truth: component 0 at x = -8, component 1 at x = +8
    torch.testing.assert_close(fit.means[order], truth.means, rtol=0, atol=0.3)
    torch.testing.assert_close(fit.log_w.exp()[order], truth.log_w.exp(), rtol=0, atol=0.02)
    torch.testing.assert_close(torch.linalg.inv(fit.prec[order]), torch.linalg.inv(truth.prec), rtol=0.1, atol=1.0)
    with pytest.raises(InputError, match="too few"):
        MixtureBackground.fit(x[:5], 2)
    with pytest.raises(InputError, match="weights"):
        MixtureBackground(torch.tensor([1.0, -1.0], dtype=DT), truth.means, torch.linalg.inv(truth.prec))
    with pytest.raises(InputError, match="positive definite"):
        MixtureBackground(torch.ones(1, dtype=DT), truth.means[:1], -torch.eye(3, dtype=DT)[None])


def test_mixture_sample_moments_match_the_mixture():
    """Mean and covariance of 200000 draws against the mixture's closed-form moments."""
    bg = _mixture()
    w, C = bg.log_w.exp(), torch.linalg.inv(bg.prec)
    mean = (w[:, None] * bg.means).sum(0)
    d = bg.means - mean
    cov = (w[:, None, None] * (C + d[:, :, None] * d[:, None, :])).sum(0)
    x = bg.sample(200000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.1)
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0.03, atol=0.5)
