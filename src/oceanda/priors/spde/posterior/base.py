"""The interface shared by the posterior solvers of an SPDE prior.

A solver is a function ``solve(problem: Problem, opts: Options) -> (X, CGInfo)`` returning
the exact posterior means ``X`` ``(k, T, ny, nx)``::

    x = (Q + D)^{-1} (Q mu + D y),   D = H^T R^{-1} H

of ``problem``'s ``k`` right-hand sides (one mask) and one
:class:`~oceanda.linalg.sparse.CGInfo` for all (iterations, each column's relative residual
on the system its module names, converged). The registry is
:data:`oceanda.priors.spde.posterior.SOLVERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from oceanda.linalg.sparse import CGInfo

if TYPE_CHECKING:
    from oceanda.priors.spde.prior import SPDEPrior


@dataclass(frozen=True)
class Options:
    """Options of the solvers (each reads those it needs).

    rtol, maxiter: relative residual and iteration cap of the iterative solvers.
    block: several right-hand sides by block CG (else column by column).
    block_size: right-hand sides per block (``None``: as many as fit in about 1 GiB).
    coarse: ``(h, ht)`` coarse space-time spacing (two-level solver).
    device: torch device of the spectral solver's covariance products (``None``: numpy).
    """

    rtol: float = 1e-8
    maxiter: int = 5000
    block: bool = True
    block_size: int | None = None
    coarse: tuple[int, int] | None = None
    device: Any = None


@dataclass(frozen=True)
class Problem:
    """One posterior solve: ``prior``, observations ``Y`` ``(k, T, ny, nx)`` (read where
    ``mask``), ``mask`` ``(T, ny, nx)`` bool, observation-error variances ``Rv``
    ``(T, ny, nx)`` (> 0 where ``mask``)."""

    prior: SPDEPrior
    Y: np.ndarray
    mask: np.ndarray
    Rv: np.ndarray

    @property
    def k(self) -> int:
        return self.Y.shape[0]

    def state_form(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(diag D (T, n, 1), D``-weighted innovations ``U = mask (y - mu)`` ``(T, n, k),
        mu (T, n, 1))`` for the solvers in state space (``D = H^T R^{-1} H``)."""
        P, mask, grid = self.prior, self.mask, self.mask.shape
        Ri = np.where(mask, 1.0 / np.where(mask, self.Rv, 1.0), 0.0).reshape(P.T, P.n, 1)
        mean = P._mean_np()
        innov = np.where(mask[None], self.Y - mean.reshape(grid)[None], 0.0)
        U = np.moveaxis(innov.reshape(self.k, P.T, P.n), 0, -1)  # (T, n, k)
        return Ri, U, mean[:, :, None]

    def fields(self, X: np.ndarray) -> np.ndarray:
        """``(T, n, k)`` -> ``(k, T, ny, nx)``."""
        return np.moveaxis(X, -1, 0).reshape(self.k, *self.mask.shape)


Solver = Callable[[Problem, Options], "tuple[np.ndarray, CGInfo]"]


def solve_columns(B: np.ndarray, bs: int, rtol: float, solve_block, solve_cols
                  ) -> tuple[np.ndarray, CGInfo]:
    """Solve the right-hand sides ``B`` ``(N, k)`` ``bs`` columns at a time: ``solve_block``
    (block CG) for chunks of several columns, ``solve_cols`` (column-wise CG) for single
    ones, both ``Bc -> (Xc, CGInfo)``; one :class:`CGInfo` for all (most iterations, every
    column's residual, converged within ``10 rtol``)."""
    N, k = B.shape
    X = np.empty((N, k))
    its, rels = 0, []
    for c0 in range(0, k, bs):
        c1 = min(k, c0 + bs)
        solve = solve_block if c1 - c0 > 1 else solve_cols
        xc, inf = solve(np.ascontiguousarray(B[:, c0:c1]))
        X[:, c0:c1] = xc
        its = max(its, inf.iterations)
        rels.append(inf.rel_residual)
    rel = np.concatenate(rels)
    return X, CGInfo(its, rel, bool(np.all(rel <= 10 * rtol)))
