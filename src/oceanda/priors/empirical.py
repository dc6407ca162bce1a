"""Gaussian trajectory priors for first guesses: empirical (moment-matched) and linear-Markov.

Trajectories are time-major: ``x`` ``(B, T, phi)`` flattened to ``d = T*phi``.

* :class:`EmpiricalGaussian` -- mean and dense covariance of a set of training
  trajectories (the "coarse Gaussian approximate of p(x)" of Blanke et al. 2024, Sec. 4.2);
  its MAP is computed in Kalman form with a dense ``d x d`` solve (``d`` is ~100 here).
* :class:`LinearMarkovPrior` -- the Gaussian law of ``x_{t+1} = M x_t + eta_t``,
  ``eta_t ~ N(0, Qm)``, ``x_0 ~ N(m0, P0)``; its precision ``L^T S^{-1} L`` (``L`` block
  bidiagonal with ``I`` / ``-M``, ``S = diag(P0, Qm, ..., Qm)``) is block-tridiagonal, hence
  banded with ``2*phi - 1`` sub-diagonals, and its MAP is one banded solve
  (:func:`oceanda.linalg.band_map`). This is the pendulum's first guess (Sec. 4.1).

:func:`markov_precision_blocks` assembles the block-tridiagonal precision for time-varying
``M_t``; weak-constraint 4D-Var (:mod:`oceanda.assim.var4d`) reuses it for its Gauss-Newton
Hessian. :func:`block_tridiagonal_to_band` converts blocks to the row-lower band storage of
:mod:`oceanda.linalg` (``band[..., i, j] = A[..., i, i - j]``).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from oceanda.errors import InputError


@lru_cache(maxsize=32)
def _band_gather_index(T: int, phi: int) -> tuple[torch.Tensor, int]:
    """Flat gather indices mapping ``cat(D.flat, S.flat, [0])`` to the band entries."""
    d = T * phi
    k = 2 * phi - 1
    n_diag = T * phi * phi
    zero_at = n_diag + (T - 1) * phi * phi
    i = torch.arange(d).unsqueeze(1).expand(d, k + 1)
    j = torch.arange(k + 1).unsqueeze(0).expand(d, k + 1)
    c = i - j
    t, a = i // phi, i % phi
    tc, b = torch.div(c, phi, rounding_mode="floor"), torch.remainder(c, phi)
    idx = torch.full((d, k + 1), zero_at, dtype=torch.long)
    same = (c >= 0) & (tc == t)
    prev = (c >= 0) & (tc == t - 1)
    idx[same] = (t * phi * phi + a * phi + b)[same]
    idx[prev] = (n_diag + (t - 1) * phi * phi + a * phi + b)[prev]
    return idx, k


def block_tridiagonal_to_band(D: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Row-lower band of the symmetric block-tridiagonal matrix with diagonal blocks
    ``D`` ``(..., T, phi, phi)`` and sub-diagonal blocks ``S`` ``(..., T-1, phi, phi)``
    (``S[t]`` is block ``(t+1, t)``). Returns ``(..., T*phi, 2*phi)`` (``k = 2*phi - 1``)."""
    *lead, T, phi, _ = D.shape
    idx, k = _band_gather_index(T, phi)
    flat = torch.cat(
        (D.reshape(*lead, -1), S.reshape(*lead, -1), torch.zeros(*lead, 1, dtype=D.dtype, device=D.device)),
        dim=-1,
    )
    return flat[..., idx.to(D.device).reshape(-1)].reshape(*lead, T * phi, k + 1)


def markov_precision_blocks(
    M: torch.Tensor, Qm_inv: torch.Tensor, P0_inv: torch.Tensor, T: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of ``J^T W J`` for the residuals ``x_0 - m0`` (weight ``P0^{-1}``) and
    ``x_t - M_{t-1} x_{t-1}`` (weight ``Qm^{-1}``), ``t = 1..T-1``.

    ``M`` is ``(..., T-1, phi, phi)`` (time-varying tangent-linear models) or ``(phi, phi)``;
    ``Qm_inv`` is ``(phi, phi)``, ``P0_inv`` ``(phi, phi)`` or per sample ``(..., phi, phi)``. Returns ``D`` ``(..., T, phi, phi)`` with
    ``D_0 = P0^{-1} + M_0^T Qm^{-1} M_0``, ``D_t = Qm^{-1} + M_t^T Qm^{-1} M_t``,
    ``D_{T-1} = Qm^{-1}``, and ``S`` ``(..., T-1, phi, phi)`` with ``S_t = -Qm^{-1} M_t``.
    """
    phi = Qm_inv.shape[-1]
    if M.dim() == 2:
        M = M.expand(T - 1, phi, phi)
    MtQM = M.transpose(-1, -2) @ Qm_inv @ M
    lead = M.shape[:-3]
    D = torch.zeros(*lead, T, phi, phi, dtype=M.dtype, device=M.device)
    D[..., 0, :, :] = P0_inv
    D[..., 1:, :, :] += Qm_inv
    D[..., :-1, :, :] += MtQM
    S = -(Qm_inv @ M)
    return D, S


class EmpiricalGaussian:
    """Moment-matched Gaussian ``N(mu, P)`` of flattened trajectories ``(N, d)``.

    :meth:`map` returns the MAP / BLUE in Kalman form
    ``x = mu + P H^T (H P H^T + R)^{-1} (y - H mu)`` for a selection ``H`` given by a
    per-sample boolean mask; it is computed as one dense ``d x d`` solve per sample with
    ``S = M P M + diag(R on observed, 1 elsewhere)``, ``M = diag(mask)``, which equals the
    ``m x m`` innovation system padded with an identity.
    """

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        if cov.shape != (mean.shape[-1], mean.shape[-1]):
            raise InputError(f"EmpiricalGaussian: covariance shape {tuple(cov.shape)} != (d, d) for d={mean.shape[-1]}")
        self.mean = mean
        self.cov = cov

    @classmethod
    def fit(cls, x: torch.Tensor, jitter: float = 1e-6) -> EmpiricalGaussian:
        """Empirical mean and covariance (``1/(N-1)``) of ``x`` ``(N, d)`` plus ``jitter * I``."""
        if x.dim() != 2 or x.shape[0] < 2:
            raise InputError(f"EmpiricalGaussian.fit: need (N >= 2, d) samples, got {tuple(x.shape)}")
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / (x.shape[0] - 1)
        cov = cov + jitter * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        return cls(mean, cov)

    def map(self, y: torch.Tensor, mask: torch.Tensor, R: float | torch.Tensor) -> torch.Tensor:
        """Kalman-form MAP ``(B, d)``; ``y``, ``mask`` ``(B, d)`` (``y`` ignored off-mask)."""
        mu = self.mean.to(y.dtype)
        P = self.cov.to(y.dtype)
        m = mask.to(y.dtype)
        R = torch.as_tensor(R, dtype=y.dtype, device=y.device)
        S = m.unsqueeze(-1) * P * m.unsqueeze(-2)
        S = S + torch.diag_embed(torch.where(mask, R.expand_as(m), torch.ones_like(m)))
        innov = torch.where(mask, y - mu, torch.zeros_like(y))
        w = torch.linalg.solve(S, innov.unsqueeze(-1)).squeeze(-1) * m
        return mu + w @ P.T


class LinearMarkovPrior:
    """Gaussian prior of a linear-Gaussian state-space model over ``T`` steps.

    ``x_0 ~ N(m0, P0)``, ``x_{t+1} = M x_t + eta_t``, ``eta_t ~ N(0, Qm)``. The mean is
    ``m_t = M^t m0``; the precision (block-tridiagonal, see :func:`markov_precision_blocks`)
    is held as a row-lower band with ``2*phi - 1`` sub-diagonals.
    """

    def __init__(self, M: torch.Tensor, Qm: torch.Tensor, m0: torch.Tensor, P0: torch.Tensor, T: int):
        phi = M.shape[-1]
        self.T, self.phi = T, phi
        means = [m0]
        for _ in range(T - 1):
            means.append(M @ means[-1])
        self.mean = torch.stack(means).reshape(T * phi)
        D, S = markov_precision_blocks(M, torch.linalg.inv(Qm), torch.linalg.inv(P0), T)
        self.precision_band = block_tridiagonal_to_band(D, S)

    def map(self, y: torch.Tensor, mask: torch.Tensor, R: float | torch.Tensor) -> torch.Tensor:
        """``(Q + H^T R^{-1} H)^{-1} (Q mu + H^T R^{-1} y)`` ``(B, d)`` by one banded solve."""
        from oceanda.linalg import band_map

        B = y.shape[0]
        mu = self.mean.to(y.dtype).expand(B, -1)
        Q = self.precision_band.to(y.dtype).expand(B, -1, -1)
        return band_map(mu, Q, torch.where(mask, y, torch.zeros_like(y)), mask, R)
