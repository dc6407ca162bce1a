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
    if update not in UPDATES:
        raise ConfigError(f"update must be one of {UPDATES}, got {update!r}")
    z = z0
    path = []
    x_k = z0
    for k, s in enumerate(levels):
        x_k = prior.assimilate(z, y, mask, R, s) if conditional else prior.mean(z, s)
        path.append(x_k)
        s_next = levels[k + 1] if k + 1 < len(levels) else 0.0
        step = (s - s_next) if update == "cold" else s
        z = z + step * (x_k - z0)
    return (x_k, path) if return_path else x_k
