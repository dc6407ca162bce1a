"""Neural band prior ``x | z ~ N(mu(z; theta, s), Q(z; theta, s)^{-1})`` (Blanke et al. 2024).

Two fully connected networks of depth 4 and width 32 (Sec. 4, "Architecture") read the
current estimate ``z`` ``(B, d)`` (time-major trajectory, ``d = T*phi``) and a sinusoidal
positional embedding of the temperature ``s`` in ``[0, 1]``:

* the mean network gives ``mu = z + f_mu(z, s)`` (``residual=True``: the network learns the
  increment, which starts at zero) or ``mu = f_mu(z, s)`` (``residual=False``: a plain MLP,
  as the authors' public code). The residual mean co-adapts with the precision to the
  training observation times and generalises worse to unseen observation processes;
* the precision network gives a band factor ``L`` (``k = 2*phi`` sub-diagonals, positive
  diagonal) of the precision ``Q = L L^T + ridge * diag(L L^T)``, so ``Q`` is banded with
  bandwidth ``2*phi`` (:func:`oceanda.linalg.spd_band_from_raw`; the small relative ridge
  keeps every posterior precision factorisable in float64).

The MAP operator (3.2) ``A(z, y; theta, s) = (Q + H^T R^{-1} H)^{-1} (Q mu + H^T R^{-1} y)``
is one banded solve (:func:`oceanda.linalg.band_map`), differentiable by implicit
differentiation, so it is trained end-to-end on the reconstruction error. The networks
never see ``y`` or ``H``: one trained prior serves any observation process.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oceanda.errors import InputError


def sinusoidal_embedding(s: torch.Tensor, dim: int, max_period: float = 1e4, scale: float = 100.0) -> torch.Tensor:
    """Transformer-style positional embedding of ``s`` ``(B,)`` -> ``(B, dim)``:
    ``[sin(scale s w_j), cos(scale s w_j)]`` with ``w_j = max_period^{-j/(dim/2)}``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=s.dtype, device=s.device) / half)
    arg = scale * s.unsqueeze(-1) * freqs
    return torch.cat((torch.sin(arg), torch.cos(arg)), dim=-1)


def mlp(n_in: int, n_out: int, width: int = 32, depth: int = 4) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` units (SiLU), then a linear read-out."""
    layers: list[nn.Module] = []
    n = n_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.SiLU()]
        n = width
    layers.append(nn.Linear(n, n_out))
    return nn.Sequential(*layers)


class NeuralBandPrior(nn.Module):
    """Neural Gaussian prior with a band precision over trajectories of ``T`` states of
    dimension ``phi``.

    ``forward(z, s) -> (mu (B, d), Q_band (B, d, k+1))`` with ``k = bandwidth``
    (default ``2*phi``), row-lower storage ``Q_band[..., i, j] = Q[i, i-j]``.
    :meth:`assimilate` is the MAP operator (3.2).
    """

    def __init__(self, T: int, phi: int, bandwidth: int | None = None, width: int = 32, depth: int = 4,
                 emb_dim: int = 16, precision: bool = True, diag_floor: float = 1e-2, residual: bool = True,
                 ridge: float = 1e-6):
        super().__init__()
        self.T, self.phi = T, phi
        self.d = T * phi
        self.k = 2 * phi if bandwidth is None else int(bandwidth)
        if not 0 <= self.k < self.d:
            raise InputError(f"NeuralBandPrior: bandwidth {self.k} must be in [0, d={self.d})")
        self.emb_dim = emb_dim
        self.diag_floor = diag_floor
        self.ridge = ridge
        self.residual = residual
        self.mean_net = mlp(self.d + emb_dim, self.d, width, depth)
        if residual:
            nn.init.zeros_(self.mean_net[-1].weight)
            nn.init.zeros_(self.mean_net[-1].bias)
        self.has_precision = precision
        if precision:
            self.prec_net = mlp(self.d + emb_dim, self.d * (self.k + 1), width, depth)
            with torch.no_grad():
                self.prec_net[-1].weight.mul_(0.1)
                self.prec_net[-1].bias.zero_()

    def _input(self, z: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        if z.dim() != 2 or z.shape[-1] != self.d:
            raise InputError(f"NeuralBandPrior: z must be (B, {self.d}), got {tuple(z.shape)}")
        s = torch.as_tensor(s, dtype=z.dtype, device=z.device)
        s = s.expand(z.shape[0]) if s.dim() == 0 else s
        return torch.cat((z, sinusoidal_embedding(s, self.emb_dim)), dim=-1)

    def mean(self, z: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """``mu(z; theta, s)`` ``(B, d)``."""
        return self._mean(z, self._input(z, s))

    def _mean(self, z: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        out = self.mean_net(inp)
        return z + out if self.residual else out

    def forward(self, z: torch.Tensor, s: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu (B, d), Q_band (B, d, k+1))``, ``Q = L L^T`` with ``L`` from the network.

        ``Q`` is formed and returned in float64 whatever the network's dtype: ``L L^T`` with
        a small diagonal is ill-conditioned in float32 and its re-factorisation in the MAP
        would fail. ``L[i, i] = softplus(raw) + diag_floor`` keeps the diagonal away from 0;
        the relative ridge ``Q = L L^T + ridge * diag(L L^T)`` keeps ``Q`` and every posterior
        precision ``Q + H^T R^{-1} H`` factorisable in float64 however large the network makes
        the off-diagonals of ``L`` relative to its diagonal (without it, a ratio of a few
        hundred already makes the Cholesky fail; that stopped a training run, issue 14).
        """
        from oceanda.linalg import spd_band_from_raw

        if not self.has_precision:
            raise InputError("NeuralBandPrior built with precision=False has no precision network")
        inp = self._input(z, s)
        mu = self._mean(z, inp)
        raw = self.prec_net(inp).reshape(z.shape[0], self.d, self.k + 1)
        return mu, spd_band_from_raw(raw.double(), self.k, eps=self.diag_floor, ridge=self.ridge)

    def assimilate(self, z: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, R: float | torch.Tensor,
                   s: torch.Tensor | float) -> torch.Tensor:
        """MAP operator ``A(z, y; theta, s) = (Q + H^T R^{-1} H)^{-1} (Q mu + H^T R^{-1} y)``
        ``(B, d)``; ``y``, ``mask`` ``(B, d)`` (``H`` = selection by ``mask``). The banded
        solve runs in float64; the result has ``z``'s dtype."""
        from oceanda.linalg import band_map

        mu, Q = self(z, s)
        yo = torch.where(mask, y, torch.zeros_like(y)).double()
        R = R.double() if torch.is_tensor(R) else float(R)
        return band_map(mu.double(), Q, yo, mask, R).to(z.dtype)
