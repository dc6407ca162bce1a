"""Explicit time stepping shared by the toy models: RK4 and its tangent-linear model.

States are tensors ``x`` of shape ``(..., phi)`` (any leading ensemble/batch dims);
Jacobians are ``(..., phi, phi)`` with ``J[..., i, j] = d f_i / d x_j``. Everything is
device- and dtype-agnostic (float64 works unchanged).

References: Runge-Kutta 4 as in DAPPER ``dapper/mods/integration.py::rk4``; the tangent
linear of one RK4 step is the chain rule through its four stages.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Rhs = Callable[[torch.Tensor], torch.Tensor]


def rk4_step(rhs: Rhs, x: torch.Tensor, dt: float) -> torch.Tensor:
    """One classical Runge-Kutta-4 step of ``dx/dt = rhs(x)``; ``x`` ``(..., phi)``."""
    k1 = rhs(x)
    k2 = rhs(x + 0.5 * dt * k1)
    k3 = rhs(x + 0.5 * dt * k2)
    k4 = rhs(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def rk4_step_and_jacobian(
    rhs: Rhs, jac: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RK4 step and its Jacobian ``M = d step(x) / dx`` (tangent-linear model).

    With stages ``k1 = f(x)``, ``k2 = f(x + dt/2 k1)``, ... and ``K_i = d k_i / dx``:
    ``K1 = J(x)``, ``K2 = J(x + dt/2 k1) (I + dt/2 K1)``, ``K3 = J(x + dt/2 k2) (I + dt/2 K2)``,
    ``K4 = J(x + dt k3) (I + dt K3)`` and ``M = I + dt/6 (K1 + 2 K2 + 2 K3 + K4)``.

    Returns ``(x_next (..., phi), M (..., phi, phi))``.
    """
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    k1 = rhs(x)
    K1 = jac(x)
    x2 = x + 0.5 * dt * k1
    k2 = rhs(x2)
    K2 = jac(x2) @ (eye + 0.5 * dt * K1)
    x3 = x + 0.5 * dt * k2
    k3 = rhs(x3)
    K3 = jac(x3) @ (eye + 0.5 * dt * K2)
    x4 = x + dt * k3
    k4 = rhs(x4)
    K4 = jac(x4) @ (eye + dt * K3)
    x_next = x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    M = eye + (dt / 6.0) * (K1 + 2.0 * K2 + 2.0 * K3 + K4)
    return x_next, M


def integrate(
    step: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    n_steps: int,
    noise_std: float | torch.Tensor = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Trajectory ``x_0 .. x_{n_steps}`` of ``x_{t+1} = step(x_t) + noise_std * xi_t``.

    ``x0`` ``(..., phi)``; returns ``(..., n_steps + 1, phi)`` (time-major within each
    member). ``xi_t ~ N(0, I)`` drawn from ``generator`` (additive model noise; with
    ``noise_std = sqrt(dt)`` the noise covariance per step is ``dt I``).
    """
    out = [x0]
    x = x0
    for _ in range(n_steps):
        x = step(x)
        if not isinstance(noise_std, float) or noise_std != 0.0:
            xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + noise_std * xi
        out.append(x)
    return torch.stack(out, dim=-2)
