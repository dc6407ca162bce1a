"""Toy models: Jacobians and tangent-linear models against finite differences (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from oceanda.dynamics import integrate, lorenz63, pendulum


def _fd_jacobian(f, x, eps=1e-6):
    """Central finite-difference Jacobian of ``f`` at ``x`` ``(phi,)``."""
    cols = []
    for j in range(x.shape[-1]):
        e = torch.zeros_like(x)
        e[j] = eps
        cols.append((f(x + e) - f(x - e)) / (2 * eps))
    return torch.stack(cols, dim=-1)


def _points(phi, seed, scale):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(5, phi, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("x", list(_points(3, 0, 10.0)) + [torch.tensor(lorenz63.x0, dtype=torch.float64)])
def test_lorenz63_rhs_jacobian_fd(x):
    J = lorenz63.jacobian(x)
    torch.testing.assert_close(J, _fd_jacobian(lorenz63.rhs, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("x", list(_points(2, 1, 2.0)))
def test_pendulum_rhs_jacobian_fd(x):
    torch.testing.assert_close(pendulum.jacobian(x), _fd_jacobian(pendulum.rhs, x), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dt", [0.01, 0.025, 0.1])
def test_lorenz63_step_tlm_fd(dt):
    for x in _points(3, 2, 8.0) + torch.tensor([0.0, 0.0, 25.0], dtype=torch.float64):
        _, M = lorenz63.step_and_jacobian(x, dt)
        torch.testing.assert_close(M, _fd_jacobian(lambda u: lorenz63.step(u, dt), x), rtol=0, atol=1e-6)


def test_pendulum_step_tlm_fd():
    for x in _points(2, 3, 2.0):
        _, M = pendulum.step_and_jacobian(x, 0.1)
        torch.testing.assert_close(M, _fd_jacobian(lambda u: pendulum.step(u, 0.1), x), rtol=0, atol=1e-8)


def test_step_tlm_gradcheck():
    """The tangent-linear matrix is the derivative autograd finds (vector-Jacobian products)."""
    x = _points(3, 4, 5.0).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: lorenz63.step(u, 0.025), (x,), eps=1e-6, atol=1e-6)
    _, M = lorenz63.step_and_jacobian(x.detach(), 0.025)
    J_auto = torch.func.vmap(torch.func.jacrev(lambda u: lorenz63.step(u, 0.025)))(x.detach())
    torch.testing.assert_close(M, J_auto, rtol=0, atol=1e-12)


def test_ensemble_vectorised_matches_loop():
    X = _points(3, 5, 8.0).reshape(5, 1, 3).expand(5, 4, 3).contiguous()
    nxt, M = lorenz63.step_and_jacobian(X, 0.025)
    for i in range(5):
        n1, M1 = lorenz63.step_and_jacobian(X[i, 0], 0.025)
        torch.testing.assert_close(nxt[i, 2], n1, rtol=0, atol=1e-13)
        torch.testing.assert_close(M[i, 3], M1, rtol=0, atol=1e-13)


def test_rk4_fourth_order_on_linear_oscillator():
    """RK4 of the damped oscillator against the closed-form exp(A t): error ~ dt^4."""
    A = pendulum.linear_matrix()
    x0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    errs = []
    for n in (20, 40):
        dt = 2.0 / n
        M = pendulum.linear_step_matrix(dt)
        x = torch.linalg.matrix_power(M, n) @ x0
        errs.append(float((x - torch.linalg.matrix_exp(2.0 * A) @ x0).norm()))
    assert 12.0 < errs[0] / errs[1] < 20.0  # 2^4 = 16


def test_pendulum_small_angle_linear_limit_and_energy():
    x = torch.tensor([1e-4, 0.0], dtype=torch.float64)
    M = pendulum.linear_step_matrix(0.1)
    torch.testing.assert_close(pendulum.step(x, 0.1), M @ x, rtol=1e-7, atol=0)
    # undamped: energy p^2/2 + w0^2 (1 - cos q) conserved to RK4 accuracy over 100 steps
    traj = pendulum.simulate(torch.tensor([2.0, 0.0], dtype=torch.float64), 100, 0.05, alpha=0.0)
    E = 0.5 * traj[:, 1] ** 2 + pendulum.W0_SQ * (1 - torch.cos(traj[:, 0]))
    assert float((E - E[0]).abs().max()) < 1e-5


def test_lorenz63_attractor_statistics():
    g = torch.Generator().manual_seed(0)
    x = lorenz63.sample_attractor(64, 0.025, spinup_steps=400, generator=g)
    traj = lorenz63.simulate(x, 200, 0.025)
    # long-run moments of L63 (sigma=10, rho=28, beta=8/3): E[u3] ~ 23.5, std(u1) ~ 7.9
    assert 21.0 < float(traj[..., 2].mean()) < 26.0
    assert 6.5 < float(traj[..., 0].std()) < 9.5
    assert math.isfinite(float(traj.abs().max()))


def test_integrate_noise_variance():
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(20000, 2, dtype=torch.float64)
    traj = integrate.integrate(lambda x: x, x0, 1, noise_std=math.sqrt(0.025), generator=g)
    var = float(traj[:, 1].var())
    assert abs(var - 0.025) < 0.0015
