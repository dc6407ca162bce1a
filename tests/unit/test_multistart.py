"""Multi-start 4D-Var selection (oceanda.assim.multistart), the Gauss-Newton Hessian
log-determinant and the neural posterior draws that start it, against brute-force and
closed-form references (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from oceanda.assim.incremental import incremental_assimilation, posterior_draws, temperature_levels
from oceanda.assim.multistart import distinct_minima, laplace_mixture_mean, laplace_weights, lowest_cost
from oceanda.assim.var4d import WeakConstraint4DVar
from oceanda.dynamics import lorenz63
from oceanda.errors import NumericalError
from oceanda.linalg import band_to_dense
from oceanda.priors.empirical import block_tridiagonal_to_band
from oceanda.priors.neural_band import NeuralBandPrior

DT = torch.float64


def _candidates(seed=0, K=7, B=40, d=6):
    """Candidates clustered around a few centres (so that some coincide within tol), random
    costs, some invalid (non-finite or flagged)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, B, d, generator=g, dtype=DT)
    pick = torch.randint(0, 3, (K, B), generator=g)
    x = centres[pick, torch.arange(B)] + 0.02 * torch.randn(K, B, d, generator=g, dtype=DT)
    cost = 5 * torch.rand(K, B, generator=g, dtype=DT)
    cost[1, ::7] = math.nan
    x[2, ::5, 0] = math.inf
    valid = torch.rand(K, B, generator=g) > 0.15
    return x, cost, valid


def _brute_distinct(x, cost, tol, valid):
    K, B, _ = x.shape
    keep = np.zeros((K, B), bool)
    for b in range(B):
        ok = [k for k in range(K) if valid[k, b] and np.isfinite(cost[k, b]) and np.isfinite(x[k, b]).all()]
        kept = []
        for k in sorted(ok, key=lambda k: cost[k, b]):
            if all(np.sqrt(np.mean((x[k, b] - x[j, b]) ** 2)) > tol for j in kept):
                kept.append(k)
        keep[kept, b] = True
    return keep


@pytest.mark.parametrize("tol", [0.0, 0.05, 0.5])
def test_distinct_minima_matches_brute_force(tol):
    x, cost, valid = _candidates()
    keep = distinct_minima(x, cost, tol, valid)
    ref = _brute_distinct(x.numpy(), cost.numpy(), tol, valid.numpy())
    np.testing.assert_array_equal(keep.numpy(), ref)
    assert 0 < ref.sum() < ref.size  # the data exercise both outcomes


def test_lowest_cost_matches_brute_force_and_refuses_empty_windows():
    x, cost, valid = _candidates(1)
    got = lowest_cost(x, cost, valid)
    for b in range(x.shape[1]):
        ok = [k for k in range(x.shape[0]) if valid[k, b] and torch.isfinite(cost[k, b]) and torch.isfinite(x[k, b]).all()]
        k = min(ok, key=lambda k: float(cost[k, b]))
        torch.testing.assert_close(got[b], x[k, b], rtol=0, atol=0)
    with pytest.raises(NumericalError):
        lowest_cost(x, cost, torch.zeros_like(valid))


def test_laplace_mixture_mean_is_the_weighted_mean_of_distinct_minima():
    x, cost, valid = _candidates(2)
    logdet = torch.randn(cost.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    keep = distinct_minima(x, cost, 0.05, valid)
    mean, pi = laplace_mixture_mean(x, cost, logdet, keep)
    for b in range(x.shape[1]):
        ks = keep[:, b].nonzero().squeeze(-1).tolist()
        lw = np.array([-float(cost[k, b]) - 0.5 * float(logdet[k, b]) for k in ks])
        w = np.exp(lw - lw.max())
        w /= w.sum()
        ref = sum(wi * x[k, b].numpy() for wi, k in zip(w, ks))
        np.testing.assert_allclose(mean[b].numpy(), ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(pi[ks, b].numpy(), w, rtol=1e-12)
    assert float(pi[~keep].abs().max()) == 0.0


def test_duplicate_starts_count_once():
    x, cost, valid = _candidates(3)
    logdet = torch.zeros_like(cost)
    keep = distinct_minima(x, cost, 0.05, valid)
    mean, _ = laplace_mixture_mean(x, cost, logdet, keep)
    x2, c2, v2 = torch.cat((x, x[:3])), torch.cat((cost, cost[:3])), torch.cat((valid, valid[:3]))
    mean2, _ = laplace_mixture_mean(x2, c2, torch.zeros_like(c2), distinct_minima(x2, c2, 0.05, v2))
    torch.testing.assert_close(mean2, mean, rtol=1e-12, atol=1e-12)


def test_laplace_mixture_is_the_mean_of_a_separated_gaussian_mixture_posterior():
    """p(x) ∝ exp(-J(x)), J = min_k c_k + h_k (x - m_k)^2 / 2 with well-separated basins: the
    posterior mean by quadrature equals the Laplace-mixture mean of the minima (m_k, c_k, h_k)."""
    m, c, h = np.array([-4.0, 0.5, 5.0]), np.array([0.5, 0.3, 2.0]), np.array([5.0, 60.0, 20.0])
    grid = np.linspace(-10, 12, 400001)
    J = np.min(c[:, None] + 0.5 * h[:, None] * (grid[None] - m[:, None]) ** 2, axis=0)
    p = np.exp(-(J - J.min()))
    exact = float((grid * p).sum() / p.sum())
    x = torch.tensor(m, dtype=DT).reshape(3, 1, 1)
    mean, _ = laplace_mixture_mean(x, torch.tensor(c, dtype=DT).reshape(3, 1), torch.log(torch.tensor(h, dtype=DT))
                                   .reshape(3, 1), torch.ones(3, 1, dtype=torch.bool))
    assert abs(float(mean) - exact) < 1e-6, (float(mean), exact)
    # the lowest cost alone is the narrow middle basin, a lobe away from the mean (-2.2)
    assert abs(float(lowest_cost(x, torch.tensor(c, dtype=DT).reshape(3, 1))) - exact) > 2.0


def test_weights_need_a_kept_minimum():
    with pytest.raises(NumericalError):
        laplace_weights(torch.zeros(2, 3, dtype=DT), torch.zeros(2, 3, dtype=DT), torch.zeros(2, 3, dtype=torch.bool))


def test_hessian_logdet_matches_dense_slogdet():
    dt, T = 0.05, 10
    var = WeakConstraint4DVar(lambda x: lorenz63.step_and_jacobian(x, dt), dt * torch.eye(3, dtype=DT), 0.16,
                              torch.tensor([0.0, 0.0, 23.6], dtype=DT), 64.0 * torch.eye(3, dtype=DT))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, T, 3, generator=g, dtype=DT) * 5 + torch.tensor([0.0, 0.0, 23.6], dtype=DT)
    y = x + 0.4 * torch.randn(x.shape, generator=g, dtype=DT)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, ::3, 0] = True
    got = var.hessian_logdet(x, y, mask)
    _, _, D, S = var.linearise(x, y, mask)
    dense = band_to_dense(block_tridiagonal_to_band(D, S))
    torch.testing.assert_close(got, torch.linalg.slogdet(dense).logabsdet, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("n_levels", [0, 2])
def test_posterior_draws_have_the_mean_and_covariance_of_the_map_posterior(n_levels):
    torch.manual_seed(0)
    T, phi, n = 4, 3, 40000
    prior = NeuralBandPrior(T, phi, width=8).double()
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, T * phi, generator=g, dtype=DT)
    y = torch.randn(2, T * phi, generator=g, dtype=DT)
    mask = torch.rand(2, T * phi, generator=g) < 0.4
    R = 0.3
    levels = temperature_levels(n_levels)
    x_l, draws = posterior_draws(prior, z0, y, mask, R, levels, n, torch.Generator().manual_seed(2))
    torch.testing.assert_close(x_l, incremental_assimilation(prior, z0, y, mask, R, levels), rtol=1e-12, atol=1e-12)
    assert draws.shape == (n, 2, T * phi)
    _, path = incremental_assimilation(prior, z0, y, mask, R, levels, return_path=True)
    z = z0.clone()  # cold update: z_(k+1) = z_k + (s_k - s_(k+1)) (x_k - z0)
    for k in range(n_levels):
        z = z + (levels[k] - levels[k + 1]) * (path[k] - z0)
    with torch.no_grad():
        _, Q = prior(z, levels[-1])
    for b in range(2):
        P = band_to_dense(Q[b]) + torch.diag(mask[b].double() / R)
        cov = torch.linalg.inv(P)
        d = draws[:, b] - x_l[b]
        emp = d.T @ d / n
        sd = cov.diagonal().sqrt()
        # Monte-Carlo error of a covariance entry ~ sd_i sd_j / sqrt(n): 5 sigma
        assert float(((emp - cov) / torch.outer(sd, sd)).abs().max()) < 5 / math.sqrt(n) * 1.5
        assert float((d.mean(0) / sd).abs().max()) < 5 / math.sqrt(n)


def _band_gaussians(K, B, d, k, seed):
    """``K x B`` random SPD band precisions (diagonally dominant) and means."""
    g = torch.Generator().manual_seed(seed)
    band = torch.rand(K, B, d, k + 1, generator=g, dtype=DT) - 0.5
    band = torch.where(torch.arange(d)[:, None] >= torch.arange(k + 1), band, 0.0)
    band[..., 0] = 2.0 * k + 0.5 + 3.0 * torch.rand(K, B, d, generator=g, dtype=DT)
    mean = 3.0 * torch.randn(K, B, d, generator=g, dtype=DT)
    return mean, band


def test_importance_mean_is_exact_when_the_proposal_is_the_target():
    """One Gaussian component as proposal and target: every weight is 1/M (ESS = M) and the
    estimate is the plain average of the proposal's draws (same generator)."""
    from oceanda.assim.multistart import importance_mean
    from oceanda.linalg import band_logdet, band_matvec, band_sample

    mean, band = _band_gaussians(1, 3, 5, 2, seed=1)
    ld = band_logdet(band)

    def log_target(xs, b):
        diff = xs - mean[0, b]
        return -0.5 * (diff * band_matvec(band[0, b], diff)).sum(-1)

    est, ess = importance_mean(mean, band, ld, torch.ones(1, 3, dtype=DT), log_target, 64,
                               torch.Generator().manual_seed(4))
    torch.testing.assert_close(ess, torch.full((3,), 64.0, dtype=DT), rtol=1e-10, atol=0)
    g = torch.Generator().manual_seed(4)
    torch.multinomial(torch.ones(3, 1, dtype=DT), 64, replacement=True, generator=g)  # same draws as inside
    z = torch.randn(3, 64, 5, generator=g, dtype=DT)
    draws = band_sample(mean[0].unsqueeze(1), band[0].unsqueeze(1), z)
    torch.testing.assert_close(est, draws.mean(1), rtol=1e-12, atol=1e-12)
    with pytest.raises(NumericalError, match="window 0"):
        importance_mean(mean, band, ld, torch.ones(1, 3, dtype=DT), lambda xs, b: torch.full_like(xs[:, 0], -math.inf),
                        8)


def test_importance_mean_corrects_the_mixture_weights_to_the_exact_posterior_mean():
    """Target: a two-component Gaussian mixture with weights 0.8 / 0.2 (closed-form mean);
    proposal: the same components with weights 0.5 / 0.5, widened 1.3x. The IS estimate
    converges to the target's mean (within 5 Monte-Carlo standard errors, computed), not to
    the proposal's."""
    from oceanda.assim.multistart import importance_mean
    from oceanda.linalg import band_logdet, band_matvec

    K, B, d = 2, 4, 4
    mean, band = _band_gaussians(K, B, d, 1, seed=2)
    ld = band_logdet(band)
    alpha = torch.tensor([0.8, 0.2], dtype=DT)
    exact = (alpha[:, None, None] * mean).sum(0)  # (B, d)

    def log_target(xs, b):
        t = []
        for k in range(K):
            diff = xs - mean[k, b]
            t.append(alpha[k].log() + 0.5 * ld[k, b] - 0.5 * (diff * band_matvec(band[k, b], diff)).sum(-1))
        return torch.logsumexp(torch.stack(t), 0)

    M = 20000
    pi = torch.full((K, B), 0.5, dtype=DT)
    est, ess = importance_mean(mean, band, ld, pi, log_target, M, torch.Generator().manual_seed(7), widen=1.3,
                               max_rows=2 * M)
    proposal_mean = (pi.unsqueeze(-1) * mean).sum(0)
    # standard error of a self-normalised estimate ~ (spread of the target) / sqrt(ESS)
    spread = ((alpha[:, None, None] * (mean - exact) ** 2).sum(0) + 1.0).sqrt()
    err = (est - exact).abs()
    assert bool((err < 5 * spread / ess.sqrt().unsqueeze(-1)).all()), (err.max(), ess)
    assert float((proposal_mean - exact).abs().max()) > 20 * float(err.max())  # the correction is real
    assert bool((ess > 0.3 * M).all()) and bool((ess < M).all())
