"""Lorenz-63: the three-variable convection model (Lorenz 1963), ensemble-vectorised.

    du1/dt = sigma (u2 - u1)
    du2/dt = rho u1 - u2 - u1 u3
    du3/dt = u1 u2 - beta u3

with the chaotic parameters sigma = 10, rho = 28, beta = 8/3. States ``x`` have shape
``(..., 3)``; every function works on any leading dims, any float dtype and device.

Parts (as DAPPER's ``mods/Lorenz63``): :func:`rhs`, :func:`jacobian` (of ``rhs``),
:func:`step` (RK4), :func:`step_and_jacobian` (RK4 tangent-linear model), :data:`x0`, and
:func:`sample_attractor` (initial conditions on the attractor by spin-up).
"""

from __future__ import annotations

import torch

from oceanda.dynamics.integrate import integrate, rk4_step, rk4_step_and_jacobian

SIGMA = 10.0
RHO = 28.0
BETA = 8.0 / 3.0

#: a point near the attractor (DAPPER's ``x0``)
x0 = (1.509, -1.531, 25.46)


def rhs(x: torch.Tensor) -> torch.Tensor:
    """Time derivative ``dx/dt``; ``x`` ``(..., 3)`` -> ``(..., 3)``."""
    u1, u2, u3 = x.unbind(-1)
    return torch.stack((SIGMA * (u2 - u1), RHO * u1 - u2 - u1 * u3, u1 * u2 - BETA * u3), dim=-1)


def jacobian(x: torch.Tensor) -> torch.Tensor:
    """Jacobian of :func:`rhs`, ``J[..., i, j] = d rhs_i / d x_j``, shape ``(..., 3, 3)``."""
    u1, u2, u3 = x.unbind(-1)
    one = torch.ones_like(u1)
    zero = torch.zeros_like(u1)
    rows = (
        torch.stack((-SIGMA * one, SIGMA * one, zero), dim=-1),
        torch.stack((RHO - u3, -one, -u1), dim=-1),
        torch.stack((u2, u1, -BETA * one), dim=-1),
    )
    return torch.stack(rows, dim=-2)


def step(x: torch.Tensor, dt: float) -> torch.Tensor:
    """One RK4 step of length ``dt``."""
    return rk4_step(rhs, x, dt)


def step_and_jacobian(x: torch.Tensor, dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One RK4 step and its tangent-linear matrix ``M = d step / dx`` ``(..., 3, 3)``."""
    return rk4_step_and_jacobian(rhs, jacobian, x, dt)


def sample_attractor(
    n: int,
    dt: float,
    spinup_steps: int = 2000,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``n`` independent states on the attractor: random starts near :data:`x0` run for
    ``spinup_steps`` RK4 steps (with the same additive model noise as the data, so that the
    states follow the noisy system's stationary distribution). Returns ``(n, 3)``."""
    start = torch.tensor(x0, dtype=dtype) + 5.0 * torch.randn(n, 3, generator=generator, dtype=dtype)
    traj_last = start
    for _ in range(spinup_steps):
        traj_last = step(traj_last, dt)
        if noise_std:
            traj_last = traj_last + noise_std * torch.randn(n, 3, generator=generator, dtype=dtype)
    return traj_last


def simulate(x_init: torch.Tensor, n_steps: int, dt: float, noise_std: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Trajectories ``(..., n_steps + 1, 3)`` from ``x_init`` ``(..., 3)`` with additive noise."""
    return integrate(lambda x: step(x, dt), x_init, n_steps, noise_std, generator)
