"""Posterior mean by PCG on ``(Q + D) x = Q mu + D y`` with a coarse space-time space.

The balancing (BNN) preconditioner::

    (I - Z E^{-1} Z^T A) Q^{-1} (I - A Z E^{-1} Z^T) + Z E^{-1} Z^T,   A = Q + D,  E = Z^T A Z

with ``Z`` the tensor-product hat functions of a coarse space-time grid (every ``h`` cells,
every ``ht`` frames: ``coarse=(h, ht)``). ``A Z`` and ``E`` need only sparse products (the
assembled :meth:`~oceanda.priors.spde.precision.SPDEPrecision.csr`, no solve); ``Q^{-1}`` is
:meth:`~oceanda.priors.spde.precision.SPDEPrecision.solve` (the pair of sweeps). The coarse
space removes the large eigenvalues that many correlated observations put on smooth modes,
so it pays when observations are precise relative to the prior. Stops at
``||b - A x|| <= rtol ||b||``; right-hand sides column by column.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from oceanda.errors import ConfigError
from oceanda.linalg.sparse import CGInfo, batched_pcg
from oceanda.priors.spde.posterior.base import Options, Problem


def hats(n: int, h: int) -> sp.csr_matrix:
    """``(n, m)`` piecewise-linear hat functions on nodes ``0, h, 2h, .., n-1``."""
    nodes = np.unique(np.r_[np.arange(0, n, h), n - 1])
    x = np.arange(n)[:, None]
    left = np.r_[nodes[0], nodes[:-1]][None, :]
    right = np.r_[nodes[1:], nodes[-1]][None, :]
    nd = nodes[None, :]
    up = np.where((x >= left) & (x <= nd) & (nd > left), (x - left) / np.maximum(nd - left, 1), 0.0)
    down = np.where((x > nd) & (x <= right) & (right > nd),
                    (right - x) / np.maximum(right - nd, 1), 0.0)
    H = up + down
    H[nodes, np.arange(len(nodes))] = 1.0
    return sp.csr_matrix(H)


def solve(problem: Problem, opts: Options) -> tuple[np.ndarray, CGInfo]:
    """Posterior means ``(k, T, ny, nx)`` by two-level PCG (module docstring)."""
    if opts.coarse is None:
        raise ConfigError("posterior_mean: solver='two_level' needs coarse=(h, ht)")
    h, ht = (int(c) for c in opts.coarse)
    if h < 1 or ht < 1:
        raise ConfigError(f"coarse spacing must be >= 1 cell / frame, got {opts.coarse}")
    P = problem.prior
    Q = P.precision
    Ri, U, mu = problem.state_form()
    T, n, k = P.T, P.n, U.shape[-1]
    ny, nx = P.shape
    N = T * n
    Z = sp.kron(sp.kron(hats(T, ht), hats(ny, h)), hats(nx, h), format="csc")
    d = Ri.reshape(-1)
    AZ = sp.csr_matrix(Q.csr() @ Z + sp.diags(d) @ Z)
    E = (Z.T @ AZ).toarray()
    cf = sla.cho_factor(0.5 * (E + E.T))
    ZT, AZT = Z.T.tocsr(), AZ.T.tocsr()

    def A(X):
        return Q.apply(X.reshape(T, n, -1)).reshape(N, -1) + d[:, None] * X

    def prec(Rr):
        c = sla.cho_solve(cf, ZT @ Rr)
        y_ = Q.solve((Rr - AZ @ c).reshape(T, n, -1)).reshape(N, -1)
        return y_ - Z @ sla.cho_solve(cf, AZT @ y_) + Z @ c

    X, info = batched_pcg(A, (Ri * U).reshape(N, k), precond=prec, rtol=opts.rtol,
                          maxiter=opts.maxiter)
    return problem.fields(X.reshape(T, n, k) + mu), info
