"""Posterior mean by a sparse direct solve: ``(Q + D) d = D (y - mu)``, ``x = mu + d``.

One sparse LDL^T of the assembled ``Q + D`` (:class:`~oceanda.linalg.sparse.SPDFactor`,
SuperLU in symmetric mode with a fill-reducing order; ``Q``:
:meth:`~oceanda.priors.spde.precision.SPDEPrecision.csr`), then one solve per right-hand
side. Exact to rounding, no iteration; its factor fills in quickly with the window (the
space-time graph is 3-D), so it is the reference for small windows, not the production path.
The reported residual is ``||b - (Q + D) d|| / ||b||``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from oceanda.linalg.sparse import CGInfo, SPDFactor
from oceanda.priors.spde.posterior.base import Options, Problem


def solve(problem: Problem, opts: Options) -> tuple[np.ndarray, CGInfo]:
    """Posterior means ``(k, T, ny, nx)`` by one sparse factorisation (module docstring)."""
    P = problem.prior
    Ri, U, mu = problem.state_form()
    T, n, k = P.T, P.n, U.shape[-1]
    A = sp.csr_matrix(P.precision.csr() + sp.diags(Ri.reshape(-1)))
    b = (Ri * U).reshape(T * n, k)
    d = SPDFactor(0.5 * (A + A.T), name="SPDE posterior precision Q + D").solve(b)
    bn = np.maximum(np.linalg.norm(b, axis=0), np.finfo(float).tiny)
    rel = np.linalg.norm(b - A @ d, axis=0) / bn
    return problem.fields(d.reshape(T, n, k) + mu), CGInfo(0, rel, True)
