"""Incremental neural data assimilation (Blanke et al. 2024, Algorithm 2) and its
unconditional cold-diffusion ablation.

Temperatures ``s_k = 1 - k/(l+1)``, ``k = 0..l`` (:func:`temperature_levels`): ``s_0 = 1`` is
the first guess ``z_0`` itself, and the estimates of (3.4) are ``z_k = s_k z_0 + (1 - s_k) x``.
Algorithm 2 iterates, for ``k = 0..l``,

    x_k     = A(z_k, y; theta, s_k)                       (MAP under the neural prior)
    z_{k+1} = z_k + (s_k - s_{k+1}) (x_k - z_0)           (update="cold", s_{l+1} = 0)
    z_{k+1} = z_k + s_k (x_k - z_0)                       (update="printed")

``"cold"`` is the cold-diffusion sampler of Bansal et al. (``z <- z - D(x_k, s_k) +
D(x_k, s_{k+1})`` with ``D(x, s) = s z_0 + (1-s) x``): if ``x_k = x`` it moves ``z_k`` exactly to
``z_{k+1}`` of (3.4). ``"printed"`` is the update as printed in the paper's Algorithm 2; it
leaves the training distribution after the first step. The estimate returned is the last
MAP output ``x_l`` (it honours the observations through the MAP).

:func:`posterior_draws` samples the Gaussian posterior of the last MAP step,
``N(x_l, (Q + H^T R^{-1} H)^{-1})`` with ``Q`` the learned precision at ``(z_l, s_l)``: the
spread the neural prior itself assigns to its estimate (starts for multi-start 4D-Var).

The unconditional ablation (``conditional=False``) replaces the MAP by the prior mean,
``x_k = mu(z_k; theta, s_k)``: the observations enter only through ``z_0``.
"""

from __future__ import annotations

import torch

from oceanda.errors import ConfigError
from oceanda.priors.neural_band import NeuralBandPrior

UPDATES = ("cold", "printed")


def temperature_levels(n_levels: int) -> list[float]:
    """``[s_0, ..., s_l] = [1 - k/(l+1) for k = 0..l]`` for ``l = n_levels``
    (``l = 0``: the one-shot operator (3.3) at ``s = 1``)."""
    if n_levels < 0:
        raise ConfigError(f"n_levels must be >= 0, got {n_levels}")
    return [1.0 - k / (n_levels + 1) for k in range(n_levels + 1)]


def _step(levels: list[float], k: int, update: str) -> float:
    """The factor of ``x_k - z0`` in the update of ``z_k`` (module docstring; ``s_{l+1} = 0``)."""
    s_next = levels[k + 1] if k + 1 < len(levels) else 0.0
    return (levels[k] - s_next) if update == "cold" else levels[k]


def _iterate(prior, z0, y, mask, R, levels, update, conditional):
    """Algorithm 2: ``(x_l, [x_0, ..., x_l], z_l)``, ``z_l`` the input of the last MAP step."""
    if update not in UPDATES:
        raise ConfigError(f"update must be one of {UPDATES}, got {update!r}")
    z = z_last = z0
    path = []
    x_k = z0
    for k, s in enumerate(levels):
        x_k = prior.assimilate(z, y, mask, R, s) if conditional else prior.mean(z, s)
        path.append(x_k)
        z_last = z
        z = z + _step(levels, k, update) * (x_k - z0)
    return x_k, path, z_last


@torch.no_grad()
def incremental_assimilation(
    prior: NeuralBandPrior,
    z0: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    R: float | torch.Tensor,
    levels: list[float],
    update: str = "cold",
    conditional: bool = True,
    return_path: bool = False,
):
    """Algorithm 2 from ``z0`` ``(B, d)`` with observations ``y``/``mask`` ``(B, d)``.

    Returns ``x_l`` ``(B, d)``, or ``(x_l, [x_0, ..., x_l])`` with ``return_path``.
    """
    x_k, path, _ = _iterate(prior, z0, y, mask, R, levels, update, conditional)
    return (x_k, path) if return_path else x_k


@torch.no_grad()
def posterior_draws(
    prior: NeuralBandPrior,
    z0: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    R: float | torch.Tensor,
    levels: list[float],
    n: int,
    generator: torch.Generator,
    update: str = "cold",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_l (B, d), draws (n, B, d))``: Algorithm 2's estimate and ``n`` draws of the
    Gaussian posterior of its last MAP step (module docstring), float64."""
    from oceanda.linalg import band_add_diagonal, band_sample

    x_l, _, z_l = _iterate(prior, z0, y, mask, R, levels, update, True)
    _, Q = prior(z_l, levels[-1])
    R = R.double() if torch.is_tensor(R) else float(R)
    w = torch.where(mask, 1.0 / torch.as_tensor(R, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    post = band_add_diagonal(Q, w.expand_as(Q[..., 0]))
    noise = torch.randn((n, *x_l.shape), generator=generator, dtype=torch.float64)
    return x_l.double(), band_sample(x_l.double(), post, noise)
