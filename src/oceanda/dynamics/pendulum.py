"""Damped pendulum, ensemble-vectorised, and its linearisation (damped oscillator).

    dq/dt = p
    dp/dt = -w0^2 sin(q) - alpha p

State ``x = (q, p)`` of shape ``(..., 2)``. The linearised model around the rest state
replaces ``sin q`` by ``q``: ``dx/dt = A x`` with ``A = [[0, 1], [-w0^2, -alpha]]``; it is
accurate only for small angles. Defaults ``w0^2 = 2``, ``alpha = 0.1``.
"""

from __future__ import annotations

import math

import torch

from oceanda.dynamics.integrate import integrate, rk4_step, rk4_step_and_jacobian

W0_SQ = 2.0
ALPHA = 0.1


def rhs(x: torch.Tensor, w0_sq: float = W0_SQ, alpha: float = ALPHA) -> torch.Tensor:
    """Time derivative ``dx/dt``; ``x`` ``(..., 2)`` -> ``(..., 2)``."""
    q, p = x.unbind(-1)
    return torch.stack((p, -w0_sq * torch.sin(q) - alpha * p), dim=-1)


def jacobian(x: torch.Tensor, w0_sq: float = W0_SQ, alpha: float = ALPHA) -> torch.Tensor:
    """Jacobian of :func:`rhs` ``(..., 2, 2)``: ``[[0, 1], [-w0^2 cos q, -alpha]]``."""
    q, _ = x.unbind(-1)
    one = torch.ones_like(q)
    zero = torch.zeros_like(q)
    return torch.stack(
        (torch.stack((zero, one), dim=-1), torch.stack((-w0_sq * torch.cos(q), -alpha * one), dim=-1)),
        dim=-2,
    )


def step(x: torch.Tensor, dt: float, w0_sq: float = W0_SQ, alpha: float = ALPHA) -> torch.Tensor:
    """One RK4 step of the nonlinear pendulum."""
    return rk4_step(lambda u: rhs(u, w0_sq, alpha), x, dt)


def step_and_jacobian(
    x: torch.Tensor, dt: float, w0_sq: float = W0_SQ, alpha: float = ALPHA
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RK4 step and its tangent-linear matrix ``(..., 2, 2)``."""
    return rk4_step_and_jacobian(lambda u: rhs(u, w0_sq, alpha), lambda u: jacobian(u, w0_sq, alpha), x, dt)


def linear_matrix(w0_sq: float = W0_SQ, alpha: float = ALPHA, dtype=torch.float64) -> torch.Tensor:
    """``A = [[0, 1], [-w0^2, -alpha]]`` of the linearised (damped-oscillator) model."""
    return torch.tensor([[0.0, 1.0], [-w0_sq, -alpha]], dtype=dtype)


def linear_step_matrix(dt: float, w0_sq: float = W0_SQ, alpha: float = ALPHA, dtype=torch.float64) -> torch.Tensor:
    """The RK4 step of the linear model is linear: ``x_{t+1} = M x_t``; returns ``M`` (2, 2)."""
    A = linear_matrix(w0_sq, alpha, dtype)
    _, M = rk4_step_and_jacobian(lambda u: u @ A.T, lambda u: A.expand(*u.shape[:-1], 2, 2),
                                 torch.zeros(2, dtype=dtype), dt)
    return M


def sample_initial(
    n: int,
    q_max: float = 0.75 * math.pi,
    p_max: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Initial conditions uniform on ``[-q_max, q_max] x [-p_max, p_max]`` ``(n, 2)``.

    The default box reaches angles of 135 degrees, far outside the linear regime, while
    staying below the separatrix for ``w0^2 = 2`` (the pendulum oscillates, never rotates).
    """
    u = 2.0 * torch.rand(n, 2, generator=generator, dtype=dtype) - 1.0
    return u * torch.tensor([q_max, p_max], dtype=dtype)


def simulate(x_init: torch.Tensor, n_steps: int, dt: float, noise_std: float = 0.0,
             generator: torch.Generator | None = None, w0_sq: float = W0_SQ,
             alpha: float = ALPHA) -> torch.Tensor:
    """Trajectories ``(..., n_steps + 1, 2)`` from ``x_init`` ``(..., 2)``."""
    return integrate(lambda x: step(x, dt, w0_sq, alpha), x_init, n_steps, noise_std, generator)
